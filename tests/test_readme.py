"""The README stays true: every option listed, the quick start is two commands."""

from __future__ import annotations

import re
from pathlib import Path

from fps_kernels.config import KernelsPluginConfig

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_option_is_in_the_table() -> None:
    listed = set(re.findall(r"^\| `(\w+)` \|", README, flags=re.MULTILINE))
    assert listed == set(KernelsPluginConfig.model_fields)


def test_quick_start_is_two_commands_and_ci_runs_the_test_one() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quick_start)
    assert len(commands) == 2
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_every_gateway_option_is_in_its_table() -> None:
    from fps_kernels.gateway.config import GatewayConfig

    listed = set(re.findall(r"^\| `gateway\.(\w+)` \|", README, flags=re.MULTILINE))
    assert listed == set(GatewayConfig.model_fields)
