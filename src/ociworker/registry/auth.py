"""Authentication challenges: the sans-IO half of the bearer-token flow.

The client does the requests. Where credentials come from is not this
package's business: it is handed a ``core.session.Credentials`` per job (the
docker config reader lives in ``ociworker.session.credentials``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header (RFC 7235)."""

    scheme: str  # lower case: "bearer", "basic"
    params: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return None


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
# Unquoted values are looser than RFC 7235 tokens: some registries send bare URLs.
_PARAM_RE = re.compile(rf"\s*({_TOKEN})\s*=\s*({_QUOTED}|[^\s,\"]+)\s*(,|$)")
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?:\s+|$)")


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse ``Bearer realm="...",service="...",scope="a:b:pull,push"``.

    Quoted values may contain commas (push scopes do), so a naive split on ","
    would break them; params are read one ``key=value`` at a time instead.
    """
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(header):
        if header[pos] in " ,":
            pos += 1
            continue
        m = _SCHEME_RE.match(header, pos)
        if m is None:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: list[tuple[str, str]] = []
        while pos < len(header):
            p = _PARAM_RE.match(header, pos)
            if p is None:
                break
            value = p.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params.append((p.group(1).lower(), value))
            pos = p.end()
        challenges.append(Challenge(scheme=scheme, params=tuple(params)))
    return challenges
