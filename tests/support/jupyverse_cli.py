"""The `jupyverse` command as tests run it: the same configuration, a longer start timeout.

Asphalt gives the root component 10 s to start, imports of the whole JupyterLab stack
included; on a loaded 2-core machine that is not always enough, and the `jupyverse` command
has no option to change it.
"""

from __future__ import annotations

import argparse

from asphalt.core.cli import run
from jupyverse_api.cli import get_config

START_TIMEOUT = 120


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--set", dest="set_", action="append", default=[])
    parser.add_argument("--disable", action="append", default=[])
    args = parser.parse_args()
    overrides = [f"component.components.{option}" for option in args.set_]
    overrides += [
        f"component.host={args.host}",
        f"component.port={args.port}",
        "component.open_browser=False",
        f"start_timeout={START_TIMEOUT}",
    ]
    run.callback(
        unsafe=False,
        loop=None,
        set_=overrides,
        service=None,
        configfile=[get_config(tuple(args.disable))],
    )


if __name__ == "__main__":
    main()
