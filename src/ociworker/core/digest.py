"""Content digests and the canonical JSON they are computed over (pure)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, NewType

Digest = NewType("Digest", str)

_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


def sha256_bytes(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no insignificant white space.

    Digests of ops and cache keys are computed over this, so the same value
    always hashes the same, whatever dict order it was built in.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_of(value: Any) -> Digest:
    return sha256_bytes(canonical_json(value))


def is_digest(text: str) -> bool:
    return bool(_DIGEST_RE.match(text))


def check_digest(text: str) -> Digest:
    """Validate a digest string before it is ever used in a path."""
    if not is_digest(text):
        from ociworker.errors import UserError

        raise UserError(f"invalid digest {text!r}: want sha256:<64 hex digits>")
    return Digest(text)


def hex_part(digest: str) -> str:
    return check_digest(digest).split(":", 1)[1]
