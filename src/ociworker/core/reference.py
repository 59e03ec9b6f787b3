"""Image references with Docker's normalization (pure).

``busybox`` means ``docker.io/library/busybox:latest``; the first path component
is a registry domain only when it looks like one (has a dot or a port, is
``localhost``, or has upper case letters, which a repository name never has).
The grammar follows distribution/reference so that names we accept are names
every registry and ``docker`` accept too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ociworker.core.digest import Digest, is_digest
from ociworker.errors import UserError

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?$"
)
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_ANY_DIGEST_RE = re.compile(
    r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$"
)
_HEX64_RE = re.compile(r"^[a-f0-9]{64}$")


@dataclass(frozen=True)
class Reference:
    """A normalized image reference; at least one of ``tag`` and ``digest`` is set
    when it comes from ``parse_reference``."""

    domain: str
    path: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def repository(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def api_reference(self) -> str:
        """What goes after ``/manifests/``: the digest wins over the tag, as in Docker."""
        if self.digest is not None:
            return self.digest
        return self.tag or DEFAULT_TAG

    def familiar_name(self) -> str:
        """The repository as ``docker`` prints it (``busybox``, ``user/app``)."""
        if self.domain != DEFAULT_DOMAIN:
            return self.repository
        rest = self.path
        if rest.startswith(OFFICIAL_REPO_PREFIX) and "/" not in rest[len(OFFICIAL_REPO_PREFIX) :]:
            rest = rest[len(OFFICIAL_REPO_PREFIX) :]
        return rest

    def familiar(self) -> str:
        return self.familiar_name() + self._suffix()

    def with_digest(self, digest: Digest) -> Reference:
        return replace(self, digest=digest)

    def with_tag(self, tag: str | None) -> Reference:
        if tag is not None and not _TAG_RE.match(tag):
            raise UserError(f"invalid tag {tag!r}")
        return replace(self, tag=tag)

    def _suffix(self) -> str:
        out = ""
        if self.tag is not None:
            out += ":" + self.tag
        if self.digest is not None:
            out += "@" + self.digest
        return out

    def __str__(self) -> str:
        return self.repository + self._suffix()


def parse_reference(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalize ``text``; a reference with neither tag nor digest gets
    ``latest`` unless ``default_tag`` is false. Raises ``UserError``."""
    original = text
    if not text:
        raise UserError("invalid reference format: empty image name")
    if _HEX64_RE.match(text):
        # Docker refuses these: they read like an image ID, not a name.
        raise UserError(
            f"invalid repository name ({text}), cannot specify 64-byte hexadecimal strings"
        )
    name, digest = _split_digest(text, original)
    name, tag = _split_tag(name, original)
    domain, path = _split_domain(name)
    if path != path.lower():
        raise UserError(
            f"invalid reference format: repository name ({path}) must be lowercase: {original!r}"
        )
    if not _DOMAIN_RE.match(domain):
        raise UserError(f"invalid reference format: bad registry domain {domain!r}: {original!r}")
    if not _PATH_RE.match(path):
        raise UserError(f"invalid reference format: bad repository name {path!r}: {original!r}")
    if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise UserError(
            f"invalid reference format: repository name longer than "
            f"{NAME_TOTAL_LENGTH_MAX} characters: {original!r}"
        )
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def _split_digest(text: str, original: str) -> tuple[str, Digest | None]:
    name, at, dgst = text.partition("@")
    if not at:
        return text, None
    if not _ANY_DIGEST_RE.match(dgst):
        raise UserError(f"invalid reference format: bad digest {dgst!r}: {original!r}")
    if not is_digest(dgst):
        raise UserError(
            f"unsupported digest {dgst!r} in {original!r}: "
            "only sha256 (lower-case hex) is supported"
        )
    return name, Digest(dgst)


def _split_tag(name: str, original: str) -> tuple[str, str | None]:
    # A colon before the last slash belongs to a registry port, not to a tag.
    colon = name.rfind(":")
    if colon == -1 or "/" in name[colon:]:
        return name, None
    tag = name[colon + 1 :]
    if not _TAG_RE.match(tag):
        raise UserError(f"invalid reference format: bad tag {tag!r}: {original!r}")
    return name[:colon], tag


def _split_domain(name: str) -> tuple[str, str]:
    slash = name.find("/")
    first = name[:slash] if slash != -1 else ""
    looks_like_domain = slash != -1 and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    )
    if looks_like_domain:
        domain, path = first, name[slash + 1 :]
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_REPO_PREFIX + path
    return domain, path
