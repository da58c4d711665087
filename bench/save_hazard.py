"""The file-truncation hazard of fps-yjs/fps-contents 0.6.4, measured under server-side execution.

    python bench/save_hazard.py                       # 3 rounds of 40 s, both settings
    python bench/save_hazard.py --rounds 5 --seconds 60 --modes paced

fps-yjs 0.6.4 cancels a save on every change of the document, even inside fps-contents'
`write_content` (file opened "wt", then written): a change at that moment leaves the file at
0 bytes. For each round, a notebook with a large output (so that a write takes a while) runs
a server-side cell that prints about once per `document_save_delay` (1 s, fps-yjs's default),
the worst rhythm, with no page open; a thread reads the file's size every 2 ms. Every save
empties the file for the few ms of its write; a cut save leaves it empty until a later save
succeeds, or for good. Reported per setting of `kernels.wait_for_saves`: the empty moments,
the longest, the cut saves (empty for 0.5 s or more), and how the file ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import nbformat  # noqa: E402

from tests.conftest import JupyverseServer  # noqa: E402
from tests.ydoc_client import document_id  # noqa: E402

FILLER = "print('x' * 2_000_000)"


def printer(seconds: float, period: float) -> str:
    return (
        "import time\n"
        f"for i in range({int(seconds / period)}):\n"
        "    print(f'line {i}', flush=True)\n"
        f"    time.sleep({period})"
    )


class SizeWatch(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.reads = 0
        self.stretches: list[float] = []  # how long the file stayed empty, each time
        self.stop = threading.Event()

    def run(self) -> None:
        since: float | None = None
        while not self.stop.is_set():
            try:
                size = os.stat(self.path).st_size
            except OSError:
                size = -1
            self.reads += 1
            now = time.monotonic()
            if size == 0 and since is None:
                since = now
            elif size != 0 and since is not None:
                self.stretches.append(now - since)
                since = None
            time.sleep(0.002)
        if since is not None:
            self.stretches.append(time.monotonic() - since)


async def one_round(server: JupyverseServer, index: int, seconds: float) -> dict[str, Any]:
    period = 1.0 + 0.01 * (index % 3)
    name = f"hazard{index}.ipynb"
    path = server.root / name
    cells = [
        {"cell_type": "code", "id": "filler", "source": FILLER},
        {"cell_type": "code", "id": "printer", "source": printer(seconds, period)},
    ]
    notebook = {
        "cells": [{**c, "metadata": {}, "outputs": [], "execution_count": None} for c in cells],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook))
    lines = int(seconds / period)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        with server.client() as client:
            doc_id = document_id(client, name)
        kernel = (await http.post("/api/kernels", json={"name": "python3"})).json()["id"]
        # fps-yjs loads a document when a client joins its room: one joins, then leaves.
        from tests.ydoc_client import room

        async with room(server, doc_id):
            await asyncio.sleep(1)
            for cell_id in ("filler", "printer"):
                response = await http.post(
                    f"/api/kernels/{kernel}/execute",
                    json={"document_id": doc_id, "cell_id": cell_id},
                )
                assert response.status_code == 202, response.text
        watch = SizeWatch(path)
        watch.start()
        deadline = time.monotonic() + seconds + 60
        outcome = "incomplete"
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            text = path.read_text() if path.exists() else ""
            if not text:
                continue
            try:
                cells_now = {c["id"]: c for c in json.loads(text)["cells"]}
            except ValueError:
                continue
            if cells_now["printer"]["execution_count"] is not None:
                got = "".join(o.get("text", "") for o in cells_now["printer"]["outputs"])
                complete = got.count("line ") == lines
                outcome = "complete" if complete else "lines missing"
                break
        await asyncio.sleep(3)  # the saves after the end
        watch.stop.set()
        watch.join()
        final = path.read_text() if path.exists() else ""
        if not final:
            outcome = "EMPTY FOR GOOD"
        else:
            try:
                nbformat.validate(nbformat.reads(final, as_version=4))
            except Exception as error:  # noqa: BLE001 - reported, not raised
                outcome += f", invalid ({type(error).__name__})"
        await http.delete(f"/api/kernels/{kernel}")
    # A save empties the file for the few ms of its write; a cancelled one, until the next
    # save that succeeds (at least document_save_delay later), or for good.
    cut = [round(t, 2) for t in watch.stretches if t >= 0.5]
    return {
        "period": period,
        "empty_moments": len(watch.stretches),
        "longest_empty_ms": round(1000 * max(watch.stretches, default=0)),
        "cut_saves": len(cut),
        "end": outcome,
    }


async def measure(mode: str, rounds: int, seconds: float) -> list[dict[str, Any]]:
    import tempfile

    home = Path(tempfile.mkdtemp(prefix=f"save-hazard-{mode}-"))
    server = JupyverseServer(
        home,
        kernels={"require_yjs": True, "wait_for_saves": mode == "paced"},
        yjs=True,
    )
    server.start()
    try:
        return [await one_round(server, i, seconds) for i in range(rounds)]
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--modes", default="unpaced,paced")
    args = parser.parse_args()
    for mode in args.modes.split(","):
        results = asyncio.run(measure(mode, args.rounds, args.seconds))
        for result in results:
            print(f"{mode:8} {json.dumps(result)}", flush=True)
        cut = sum(1 for r in results if r["cut_saves"] or "EMPTY" in r["end"])
        print(f"{mode:8} rounds with a cut save: {cut}/{len(results)}", flush=True)


if __name__ == "__main__":
    main()
