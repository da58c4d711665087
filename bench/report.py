"""Results over rounds, ratios to the direct way, and the markdown table."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from workloads import Measure, MeasureWays, Way


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    #: the issue's target for ws/direct (at most for times, at least for throughputs)
    target: float | None = None
    #: counts are shown, but a ratio of them means nothing
    ratio: bool = True


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    measure: Measure | MeasureWays
    ways: tuple[Way, ...]
    metrics: tuple[Metric, ...]
    timeout: float
    #: `measure` is a MeasureWays: every way measured in one go, interleaved; its ratios are
    #: the median of the per-round ratios (the ways of one round ran side by side)
    interleaved: bool = False


@dataclass(frozen=True)
class Failure:
    workload: str
    way: str
    round: int
    reason: str
    correctness: bool
    timed_out: bool = False


@dataclass
class Results:
    samples: dict[tuple[str, str], list[dict[str, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    failures: list[Failure] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    memory_error: str = ""

    def add(self, workload: Workload, way: Way, metrics: dict[str, float], round_no: int) -> None:
        self.samples[(workload.key, way.name)].append({**metrics, "round": round_no})

    def values(self, workload: Workload, way: Way, metric: Metric) -> list[float]:
        return [s[metric.key] for s in self.samples[(workload.key, way.name)] if metric.key in s]

    def by_round(self, workload: Workload, way: Way, metric: Metric) -> dict[float, float]:
        return {
            s["round"]: s[metric.key]
            for s in self.samples[(workload.key, way.name)]
            if metric.key in s
        }

    def failed(self, workload: Workload, way: Way) -> list[Failure]:
        return [f for f in self.failures if f.workload == workload.key and f.way == way.name]


def fmt(value: float) -> str:
    if value >= 1000 or float(value).is_integer():
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio_text(ratio: float, metric: Metric, base: str = "direct") -> str:
    return f"{ratio:.2f}x slower" if not metric.higher_is_better else f"{ratio:.2f} of {base}"


def target_text(ratio: float | None, metric: Metric) -> str:
    if metric.target is None:
        return ""
    sign = "≥" if metric.higher_is_better else "≤"
    want = f"{sign}{metric.target:g}" + ("" if metric.higher_is_better else "x")
    if ratio is None:
        return f"{want}: not measured"
    met = ratio >= metric.target if metric.higher_is_better else ratio <= metric.target
    return f"{want}: {'met' if met else 'MISSED'}"


def _ratio(
    results: Results, workload: Workload, metric: Metric, way: Way, base: Way, median: float
) -> float | None:
    """median / the median of `base`, for a way other than `base` (None if not measured);
    for an interleaved workload, the median of the per-round ratios."""
    values = results.values(workload, base, metric)
    if way == base or not metric.ratio or not values:
        return None
    if workload.interleaved:
        ratios = round_ratios(results, workload, metric, way, base)
        return statistics.median(ratios) if ratios else None
    return median / statistics.median(values)


def round_ratios(
    results: Results, workload: Workload, metric: Metric, way: Way, base: Way
) -> list[float]:
    """way/base of every round both were measured in."""
    ours = results.by_round(workload, way, metric)
    theirs = results.by_round(workload, base, metric)
    return [ours[r] / theirs[r] for r in sorted(ours) if r in theirs and theirs[r]]


def _ratio_cell(
    results: Results, workload: Workload, metric: Metric, way: Way, base: Way, ratio: float | None
) -> str:
    if ratio is None:
        return ""
    text = ratio_text(ratio, metric, "raw" if base.kind == "raw" else "direct")
    if workload.interleaved:
        ratios = round_ratios(results, workload, metric, way, base)
        text += f" (rounds {min(ratios):.2f}–{max(ratios):.2f})"
    return text


def _row(
    results: Results, workload: Workload, metric: Metric, way: Way, direct: Way, raw: Way
) -> str:
    values = results.values(workload, way, metric)
    failures = results.failed(workload, way)
    cells = [f"{workload.key}. {workload.title}", metric.label, way.name]
    if not values:
        reason = failures[0].reason if failures else "no data"
        return "| " + " | ".join([*cells, f"failed: {reason}", "", "", "", "", ""]) + " |"
    median = statistics.median(values)
    cells += [fmt(median), fmt(min(values)), fmt(max(values))]
    ratio = _ratio(results, workload, metric, way, direct, median)
    cells.append(_ratio_cell(results, workload, metric, way, direct, ratio))
    vs_raw = _ratio(results, workload, metric, way, raw, median)
    cells.append(_ratio_cell(results, workload, metric, way, raw, vs_raw))
    cells.append(target_text(ratio, metric) if way.kind == "ws" else "")
    if failures:
        cells[-1] += f" ({len(failures)} round(s) failed)"
    return "| " + " | ".join(cells) + " |"


def table(results: Results, workloads: list[Workload], direct: Way, raw: Way) -> str:
    lines = [
        "| workload | metric | way | median | min | max | vs direct | vs raw ZMQ | target |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    for workload in workloads:
        for metric in workload.metrics:
            for way in workload.ways:
                lines.append(_row(results, workload, metric, way, direct, raw))
    lines.append(_memory_row(results))
    return "\n".join(lines)


def _memory_row(results: Results) -> str:
    label = "| server memory | MiB per idle kernel | jupyverse | "
    if results.memory_error:
        return label + f"failed: {results.memory_error} | | | | | |"
    m = results.memory
    per = m["mib_per_kernel"]
    detail = (
        f"RSS {fmt(m['rss_0_kernels_mib'])} MiB with 0 kernels, "
        f"{fmt(m['rss_n_kernels_mib'])} MiB with {m['kernels']:.0f}"
    )
    verdict = "met" if per < 2 else "MISSED"
    return label + f"{per:.2f} | | | {detail} | | <2 MiB: {verdict} |"
