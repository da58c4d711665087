"""HMAC signing of Jupyter messages, and the replay check on what a kernel sends.

Pure code: no I/O, so it can be tested without a kernel.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Sequence

_SCHEME_PREFIX = "hmac-"


class SignatureError(ValueError):
    """A message whose signature is missing, wrong or replayed."""


class Signer:
    """Signs and checks the four signed parts of a message (header, parent, metadata, content)."""

    def __init__(self, key: bytes | str, scheme: str = "hmac-sha256") -> None:
        if not scheme.startswith(_SCHEME_PREFIX):
            raise ValueError(f"Unsupported signature scheme {scheme!r}: it must start with 'hmac-'")
        digest_name = scheme[len(_SCHEME_PREFIX) :]
        try:
            self._digest = getattr(hashlib, digest_name)
        except AttributeError:
            raise ValueError(f"Unsupported signature scheme {scheme!r}") from None
        self.key = key.encode() if isinstance(key, str) else key
        self.scheme = scheme

    @property
    def enabled(self) -> bool:
        # An empty key means the kernel neither signs nor checks (allowed by the spec).
        return bool(self.key)

    def sign(self, parts: Sequence[bytes]) -> bytes:
        if not self.key:
            return b""
        mac = hmac.new(self.key, digestmod=self._digest)
        for part in parts[:4]:
            mac.update(part)
        return mac.hexdigest().encode("ascii")

    def check(self, signature: bytes, parts: Sequence[bytes]) -> None:
        """Raise SignatureError unless `signature` is the right one for `parts`."""
        if not self.key:
            return
        if not signature:
            raise SignatureError("unsigned message")
        if not hmac.compare_digest(signature, self.sign(parts)):
            raise SignatureError("invalid signature")


class ReplayGuard:
    """Remembers the last `size` signatures seen, so that a replayed message is refused.

    Bounded: the oldest signatures are forgotten first.
    """

    def __init__(self, size: int = 65536) -> None:
        self._size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def check(self, signature: bytes) -> None:
        if not signature:
            return
        if signature in self._seen:
            raise SignatureError("duplicate signature (replayed message)")
        self._seen[signature] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)

    def clear(self) -> None:
        self._seen.clear()
