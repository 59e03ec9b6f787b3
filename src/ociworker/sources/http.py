"""HTTP(S) sources (``ADD URL``): download a file into the content store, and
skip the download when the server says it has not changed.

Each URL keeps a small record (ETag, Last-Modified, content digest, the file
name the response gave) under the worker's state dir; the next fetch sends
``If-None-Match`` / ``If-Modified-Since`` from it, and a ``304`` answers with
the recorded digest, whose blob is still in the content store. That digest is
what the step's cache key is made of (as BuildKit's http source): an unchanged
remote file keeps every step after it cached, a changed one re-runs them.
Credentials in a URL are sent (httpx makes them Basic auth) but never written
to a record or an error: records are named by a hash of the URL and every
message shows the URL redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import email.utils
import hashlib
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest
from ociworker.core.gitref import redact
from ociworker.errors import DigestMismatchError, UserError, WorldError
from ociworker.fs.atomic import write_atomic
from ociworker.registry.neterrors import reason

#: BuildKit's name for a download whose URL and response name no file
UNNAMED = "__unnamed__"


@dataclass(frozen=True)
class Fetched:
    """What a URL resolved to: the blob in the content store and how to name it."""

    digest: Digest
    filename: str
    #: Last-Modified as seconds since the epoch (the file's mtime), or None
    mtime: float | None
    #: whether the server answered 304 (nothing was downloaded)
    not_modified: bool = False


def disposition_filename(header: str) -> str:
    """The ``filename`` of a Content-Disposition header, reduced to its base name."""
    if not header:
        return ""
    msg = email.message.Message()
    msg["content-disposition"] = header
    name = msg.get_filename() or ""
    if not name or name.endswith("/"):
        return ""
    base = posixpath.basename(name.replace("\\", "/"))
    return "" if base in (".", "..") else base


def _mtime(header: str) -> float | None:
    if not header:
        return None
    try:
        return email.utils.parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


class HttpFetcher:
    """Conditional downloads of URLs into ``content`` (records under ``state``;
    None keeps no records: every fetch downloads)."""

    def __init__(
        self, content: ContentStore, state: Path | None, transport: httpx.AsyncBaseTransport | None
    ) -> None:
        self._content = content
        self._state = state
        self._transport = transport
        self._locks: dict[str, asyncio.Lock] = {}

    def blob_path(self, digest: Digest) -> Path:
        """Where a fetched content lies (read it; never write it)."""
        return self._content.blob_path(digest)

    def _record_path(self, url: str) -> Path | None:
        if self._state is None:
            return None
        return self._state / (hashlib.sha256(url.encode()).hexdigest() + ".json")

    def _load(self, url: str) -> dict[str, Any]:
        path = self._record_path(url)
        if path is None:
            return {}
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(rec, dict) or not self._content.has(str(rec.get("digest", ""))):
            return {}  # the blob was pruned: download again
        return rec

    def _save(self, url: str, rec: dict[str, Any]) -> None:
        path = self._record_path(url)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(rec).encode())

    async def fetch(self, url: str, filename: str = "", checksum: str = "") -> Fetched:
        """The content of ``url`` (downloaded, or the recorded one on a 304).
        ``filename``: the name to give the file (else Content-Disposition's,
        else ``__unnamed__``); ``checksum``: the digest the content must have."""
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            got = await self._fetch(url, filename)
        if checksum and got.digest != checksum:
            # BuildKit's words (source/http: validatePinnedChecksum)
            raise DigestMismatchError(
                f"digest mismatch for {redact(url)}: {got.digest} (expected: {checksum})"
            )
        return got

    async def _fetch(self, url: str, filename: str) -> Fetched:
        shown = redact(url)
        rec = self._load(url)
        headers = {"User-Agent": "ociworker"}
        if rec.get("etag"):
            headers["If-None-Match"] = rec["etag"]
        if rec.get("last_modified"):
            headers["If-Modified-Since"] = rec["last_modified"]
        try:
            async with (
                httpx.AsyncClient(
                    transport=self._transport, follow_redirects=True, timeout=60.0
                ) as client,
                client.stream("GET", url, headers=headers) as resp,
            ):
                if resp.status_code == 304 and rec:
                    return Fetched(
                        Digest(rec["digest"]),
                        filename or rec.get("disposition") or UNNAMED,
                        _mtime(rec.get("last_modified", "")),
                        not_modified=True,
                    )
                if not 200 <= resp.status_code < 300:
                    # BuildKit: "invalid response status 404"; the URL named, redacted
                    raise UserError(
                        f"failed to load {shown}: invalid response status {resp.status_code}"
                    )
                ingest = self._content.ingest()
                with ingest:
                    # decoded as Go's client decodes a Content-Encoding; an archive
                    # served as such (a .tar.gz) is stored as it is
                    async for chunk in resp.aiter_bytes(1 << 20):
                        await asyncio.to_thread(ingest.write, chunk)
                    digest = await asyncio.to_thread(ingest.commit)
                etag = resp.headers.get("etag", "")
                last_modified = resp.headers.get("last-modified", "")
                disposition = disposition_filename(resp.headers.get("content-disposition", ""))
        except httpx.HTTPError as exc:
            why = reason(exc, httpx.URL(url)).replace(url, shown)
            raise WorldError(f"failed to load {shown}: {why}") from None
        with contextlib.suppress(OSError):
            self._save(
                url,
                {
                    "url": shown,
                    "etag": etag,
                    "last_modified": last_modified,
                    "digest": digest,
                    "disposition": disposition,
                },
            )
        return Fetched(digest, filename or disposition or UNNAMED, _mtime(last_modified))
