"""Git URLs as BuildKit's ``gitutil.ParseGitRef`` reads them (plus ``file://``):
which strings name a repository, their ``#REF:SUBDIR`` fragment, and how a URL
is shown with its credentials redacted. Pure: the frontend (``ADD git...``),
the CLI and the git source all read URLs here."""

from __future__ import annotations

import posixpath
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field

from ociworker.errors import ConfigError, UnsafePathError

#: schemes of a git URL; BuildKit takes the first four, ``file`` is ours
SCHEMES = ("https", "http", "git", "ssh", "file")
_PROTO_RE = re.compile(r"^[a-zA-Z0-9]+://")
#: ``user@host:path``: ssh in git's scp-like syntax (sshutil.IsImplicitSSHTransport)
_SCP_RE = re.compile(r"^[A-Za-z0-9_.-]+@[A-Za-z0-9.-]+:")
FULL_SHA_RE = re.compile(r"^[0-9a-fA-F]{40}$")
SHORT_SHA_RE = re.compile(r"^[0-9a-fA-F]{4,39}$")
#: what git's check-ref-format refuses, and a leading "-" (an option to git)
_BAD_REF_RE = re.compile(r"(^-)|(\.\.)|([\x00-\x20\x7f~^:?*\[\\])|(@\{)|(//)|(^/)|(/$)|(\.lock$)")
# The userinfo runs to the authority's last "@": a password holding an "@" is
# hidden whole, as BuildKit's RedactCredentials (url.Parse) does.
_USERINFO_RE = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)([^/\s]+)@")
REDACTED = "xxxxx"
#: the build arg that keeps ``.git`` in a git context (BuildKit's name)
KEEP_GIT_DIR_ARG = "BUILDKIT_CONTEXT_KEEP_GIT_DIR"
TOKEN_SECRET = "GIT_AUTH_TOKEN"
#: the user name a token is sent with (BuildKit's, which GitHub and GitLab accept)
TOKEN_USER = "x-access-token"


@dataclass(frozen=True)
class GitRef:
    """A parsed ``URL#REF:SUBDIR``. ``remote`` has no password in it; the
    URL's credentials, if any, are kept apart and never shown."""

    remote: str
    scheme: str
    host: str
    ref: str = ""
    subdir: str = ""
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)

    @property
    def shown(self) -> str:
        """The URL as the user gave it, credentials redacted."""
        text = self.remote
        if self.password or (self.username and self.scheme in ("http", "https")):
            scheme, _, rest = text.partition("://")
            user = f"{self.username}:{REDACTED}" if self.password else REDACTED
            text = f"{scheme}://{user}@{rest}"
        frag = self.ref + (":" + self.subdir if self.subdir else "")
        return text + ("#" + frag if frag else "")

    @property
    def key(self) -> str:
        """What names the repository in caches and cache keys (no credentials)."""
        return self.remote


def is_git_url(text: str) -> bool:
    try:
        parse_git_ref(text)
    except ConfigError:
        return False
    return True


def is_remote_context(text: str) -> bool:
    """A build context the worker fetches: a git URL, or an http(s) URL (a tarball)."""
    return text.startswith(("http://", "https://")) or is_git_url(text)


def parse_git_ref(text: str) -> GitRef:
    """``URL#REF:SUBDIR`` as BuildKit's ParseGitRef reads it: ``github.com/...``
    is https; a URL with a scheme must have a git one, and an http(s) one a
    path ending in ``.git`` (other http URLs are tarball contexts); else
    ``user@host:path``. REF empty means the remote's HEAD."""
    if text.startswith(("./", "../")):
        raise ConfigError(f"{text!r} is a local path, not a git URL")
    url, _, frag = text.partition("#")
    github = url.startswith("github.com/")
    if github:
        # BuildKit's one bare host form: no .git suffix needed
        url = "https://" + url
    username = password = ""
    if _PROTO_RE.match(url):
        u = urllib.parse.urlsplit(url)
        scheme = u.scheme.lower()
        if scheme not in SCHEMES:
            raise ConfigError(f"unknown git protocol {scheme!r} in {redact(text)!r}")
        if scheme in ("http", "https") and not u.path.endswith(".git") and not github:
            raise ConfigError(f"{redact(text)!r} is not a git URL (its path ends not in .git)")
        host = u.hostname or ""
        if scheme != "file" and not host:
            raise ConfigError(f"git URL {redact(text)!r} has no host")
        netloc = u.netloc.rpartition("@")[2]
        if scheme in ("http", "https"):
            username = urllib.parse.unquote(u.username or "")
            password = urllib.parse.unquote(u.password or "")
        elif u.username:
            if u.password:
                raise ConfigError(f"a password in a {scheme}:// git URL is not supported")
            netloc = f"{u.username}@{netloc}"
        remote = urllib.parse.urlunsplit((scheme, netloc, u.path, u.query, ""))
    elif _SCP_RE.match(url):
        scheme = "ssh"
        host = url.partition("@")[2].partition(":")[0]
        remote = url
    else:
        raise ConfigError(f"{redact(text)!r} is not a git URL")
    ref, _, subdir = frag.partition(":")
    out = GitRef(remote, scheme, host, ref, subdir, username, password)
    check_ref(ref, out.shown)
    return GitRef(remote, scheme, host, ref, clean_subdir(subdir, out.shown), username, password)


def check_ref(ref: str, shown: str) -> None:
    """A ref git would accept, and no option: it reaches git's command line."""
    if ref and _BAD_REF_RE.search(ref):
        raise ConfigError(f"invalid git ref {ref!r} for {shown}")


def clean_subdir(subdir: str, shown: str) -> str:
    """SUBDIR relative to the checkout's root; one that climbs out is refused."""
    if not subdir:
        return ""
    out = posixpath.normpath("/" + subdir).lstrip("/")
    if ".." in posixpath.normpath(subdir).split("/"):
        raise UnsafePathError(
            f"git context {shown}: subdirectory {subdir!r} is outside the repository"
        )
    return "" if out == "." else out


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every URL's password (an http URL's lone user, a token
    maybe, too) and every one of ``secrets`` replaced by xxxxx."""

    def sub(m: re.Match[str]) -> str:
        user, colon, _ = m.group(2).partition(":")
        if colon:
            return f"{m.group(1)}{user}:{REDACTED}@"
        if m.group(1).lower().startswith("http"):
            return f"{m.group(1)}{REDACTED}@"
        return m.group(0)

    out = _USERINFO_RE.sub(sub, text)
    for s in secrets:
        if s:
            out = out.replace(s, REDACTED)
    return out
