"""Where kernels' connection files live."""

from __future__ import annotations

import os
from pathlib import Path

from jupyter_core.paths import jupyter_runtime_dir


def runtime_dir() -> Path:
    """The Jupyter runtime directory, created private to this user if missing."""
    path = Path(jupyter_runtime_dir())
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    return path
