"""The last kernelspecs a gateway gave, kept on disk so that a server started while the
gateway does not answer still lists them.

One file per gateway URL in the Jupyter runtime directory (private to the user), written
whole (a temporary file renamed over it) and readable by the user only. What is read back is
checked like a fresh answer of the gateway; a file that is not ours or is broken is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class RememberedSpecs:
    def __init__(self, directory: Path, url: str) -> None:
        self.url = url
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        self.path = directory / f"fps-kernels-gateway-{digest}.json"
        self._saved = ""

    def load(self) -> dict[str, Any] | None:
        """The kernelspecs answer last saved for this URL, if any."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.warning("Cannot read the gateway's last kernelspecs %s: %s", self.path, error)
            return None
        try:
            data = json.loads(text)
        except ValueError:
            logger.warning("Ignoring %s: not JSON", self.path)
            return None
        if not isinstance(data, dict) or data.get("url") != self.url:
            logger.warning("Ignoring %s: not the kernelspecs of %s", self.path, self.url)
            return None
        specs = data.get("kernelspecs")
        if not isinstance(specs, dict):
            return None
        self._saved = json.dumps(specs, sort_keys=True)
        return specs

    def save(self, specs: dict[str, Any]) -> None:
        """Keep `specs` (the gateway's answer), when it changed; a failure is only logged."""
        text = json.dumps(specs, sort_keys=True)
        if text == self._saved:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".fps-kernels-")
            try:
                with os.fdopen(handle, "w") as file:  # mkstemp makes it 0600
                    json.dump({"url": self.url, "kernelspecs": specs}, file)
                os.replace(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as error:
            logger.warning("Cannot keep the gateway's kernelspecs in %s: %s", self.path, error)
            return
        self._saved = text
