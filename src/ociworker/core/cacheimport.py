"""Build cache export and import: the ``--cache-to`` / ``--cache-from`` specs and
the cache manifest's format (pure).

``CacheSpec.parse`` reads one value as buildx's ``ParseCacheEntry`` does: a bare
value is ``type=registry,ref=VALUE``; anything else is CSV ``key=value`` fields
naming a ``type`` (``registry``, ``local``, ``inline``). Attributes buildx passes
on that we do not honour are refused, not ignored.

The format (see docs/cache.md): an OCI image manifest whose config blob is the
JSON ``CacheConfig`` (media type ``CACHE_CONFIG_MEDIA_TYPE``) and whose layers
are the layer blobs of the records' results. A record is one vertex's cache key,
the keys of its inputs (a record is used only when its inputs are known too,
as BuildKit links cache records from the sources up), and the chain of layers
of its result as indices into ``layers``. Keys are digests of ops and of their
inputs' keys (context files enter them as digests), so the manifest holds no
context file content and no secret value: a secret mount is its id only.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ociworker.core.digest import Digest, check_digest, sha256_bytes
from ociworker.core.oci import Descriptor, Layer
from ociworker.core.reference import parse_reference
from ociworker.errors import ConfigError, RegistryError, UserError

CACHE_TYPES = ("registry", "local", "inline")
CACHE_MODES = ("min", "max")
#: the media type of the cache manifest's config blob
CACHE_CONFIG_MEDIA_TYPE = "application/vnd.ociworker.cache.config.v0+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
#: the image config field an inline cache is kept in (BuildKit: moby.buildkit.cache.v0)
INLINE_CACHE_KEY = "ociworker.cache.v0"
CACHE_VERSION = 0
#: record kinds: a result with layers, a local source (re-read every build), scratch
KINDS = ("layers", "dir", "none")

_TO_ATTRS: Mapping[str, frozenset[str]] = {
    "registry": frozenset({"ref", "mode", "ignore-error"}),
    "local": frozenset({"dest", "mode", "tag", "ignore-error"}),
    "inline": frozenset({"mode"}),
}
_FROM_ATTRS: Mapping[str, frozenset[str]] = {
    "registry": frozenset({"ref"}),
    "local": frozenset({"src", "tag", "digest"}),
}


@dataclass(frozen=True)
class CacheSpec:
    """One ``--cache-to`` (``export=True``) or ``--cache-from`` value."""

    type: str
    attrs: tuple[tuple[str, str], ...] = ()
    export: bool = False

    def get(self, key: str, default: str = "") -> str:
        return dict(self.attrs).get(key, default)

    @property
    def mode(self) -> str:
        return self.get("mode", "min")

    @property
    def ignore_error(self) -> bool:
        return self.get("ignore-error") == "true"

    @property
    def tag(self) -> str:
        return self.get("tag", "latest")

    def __str__(self) -> str:
        return ",".join([f"type={self.type}", *(f"{k}={v}" for k, v in self.attrs)])

    @classmethod
    def parse(cls, text: str, *, export: bool) -> CacheSpec:
        flag = "--cache-to" if export else "--cache-from"
        if text.strip() == "":
            raise ConfigError(f'invalid {flag} "": give type=TYPE,... or an image reference')
        try:
            rows = list(csv.reader([text], strict=True))
        except csv.Error as e:
            raise ConfigError(f"invalid {flag} {text!r}: {e}") from None
        fields = rows[0] if rows else []
        if len(fields) == 1 and "=" not in fields[0]:
            # buildx: a bare value is a registry reference
            spec = cls("registry", (("ref", fields[0]),), export)
            spec.check(text)
            return spec
        attrs: dict[str, str] = {}
        for field in fields:
            k, eq, v = field.partition("=")
            key = k.strip().lower()
            if not eq or not key:
                raise ConfigError(f"invalid {flag} {text!r}: {field!r} is not KEY=VALUE")
            if key in attrs:
                raise ConfigError(f"invalid {flag} {text!r}: {key} is given twice")
            attrs[key] = v
        typ = attrs.pop("type", "")
        if not typ:
            raise ConfigError(
                f"invalid {flag} {text!r}: type is required (type=registry,ref=REF, type=local,...)"
            )
        spec = cls(typ, tuple(sorted(attrs.items())), export)
        spec.check(text)
        return spec

    def check(self, text: str = "") -> None:
        """Refuse an unknown type, attribute or value, or a missing ref/dest/src."""
        text = text or str(self)
        flag = "--cache-to" if self.export else "--cache-from"
        table = _TO_ATTRS if self.export else _FROM_ATTRS
        if self.type not in table:
            types = ", ".join(table)
            if self.type == "inline" and not self.export:
                raise ConfigError(
                    f"{flag} {text!r}: an inline cache is imported from its image: "
                    "give --cache-from type=registry,ref=IMAGE (or the bare IMAGE)"
                )
            raise ConfigError(f"{flag} {text!r}: unknown cache type {self.type!r} (use {types})")
        for key, value in self.attrs:
            if key not in table[self.type]:
                raise ConfigError(
                    f"{flag} {text!r}: unknown attribute {key!r} for type={self.type} "
                    f"(it takes {', '.join(sorted(table[self.type]))})"
                )
            if value == "":
                raise ConfigError(f"{flag} {text!r}: {key} is empty")
        attrs = dict(self.attrs)
        if "mode" in attrs and attrs["mode"] not in CACHE_MODES:
            raise ConfigError(f"{flag} {text!r}: mode must be min or max, not {attrs['mode']!r}")
        if self.type == "inline" and attrs.get("mode") == "max":
            raise ConfigError(
                f"{flag} {text!r}: an inline cache holds the image's own layers only "
                "(mode=min); use type=registry for mode=max"
            )
        if "ignore-error" in attrs and attrs["ignore-error"] not in ("true", "false"):
            raise ConfigError(f"{flag} {text!r}: ignore-error must be true or false")
        need = {"registry": "ref", "local": "dest" if self.export else "src"}.get(self.type)
        if need is not None and not attrs.get(need):
            raise ConfigError(f"{flag} {text!r}: type={self.type} needs {need}=...")
        if self.type == "registry":
            parse_reference(attrs["ref"])
        if "digest" in attrs:
            check_digest(attrs["digest"])


def parse_cache_specs(
    values: Sequence[str], *, export: bool, over_daemon: bool = False
) -> tuple[CacheSpec, ...]:
    """Every ``--cache-to`` (``export``) or ``--cache-from`` of a build. Over the
    daemon a ``type=local`` directory is refused: it is the client's, and the
    worker never opens the client's files."""
    specs = tuple(CacheSpec.parse(v, export=export) for v in values)
    flag = "--cache-to" if export else "--cache-from"
    for spec in specs:
        if over_daemon and spec.type == "local":
            raise ConfigError(
                f"{flag} {spec}: type=local is not supported over the daemon "
                "(the directory is the client's); use type=registry"
            )
    if export and sum(1 for s in specs if s.type == "inline") > 1:
        raise ConfigError("--cache-to type=inline is given twice")
    return specs


# --- the format ------------------------------------------------------------------


@dataclass(frozen=True)
class CacheRecord:
    """One vertex: its key, its inputs' keys ("" for scratch), its result."""

    key: str
    kind: str  # one of KINDS
    inputs: tuple[str, ...] = ()
    #: indices into ``CacheConfig.layers``, base first (kind "layers" only)
    chain: tuple[int, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class CacheConfig:
    layers: tuple[Layer, ...]
    records: tuple[CacheRecord, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": CACHE_VERSION,
            "layers": [
                {**layer.descriptor.to_json(), "diffID": layer.diff_id} for layer in self.layers
            ],
            "records": [
                {
                    "key": r.key,
                    "kind": r.kind,
                    "inputs": list(r.inputs),
                    "chain": list(r.chain),
                    "description": r.description,
                }
                for r in self.records
            ],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: Any, where: str) -> CacheConfig:
        """Read (and check) a cache config; RegistryError naming ``where`` if it is not one."""
        try:
            if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
                raise ValueError(f"not an ociworker cache (version {CACHE_VERSION})")
            layers = tuple(
                Layer(Descriptor.from_json(d), check_digest(str(d["diffID"])))
                for d in data["layers"]
            )
            records = []
            for r in data["records"]:
                chain = tuple(int(i) for i in r.get("chain") or ())
                if any(i < 0 or i >= len(layers) for i in chain):
                    raise ValueError(f"record {r['key']} names a layer that is not there")
                kind = str(r["kind"])
                if kind not in KINDS:
                    raise ValueError(f"unknown record kind {kind!r}")
                records.append(
                    CacheRecord(
                        key=str(r["key"]),
                        kind=kind,
                        inputs=tuple(str(i) for i in r.get("inputs") or ()),
                        chain=chain,
                        description=str(r.get("description", "")),
                    )
                )
        except (ValueError, KeyError, TypeError, AttributeError, UserError) as exc:
            raise RegistryError(f"{where} is not a usable build cache: {exc}") from None
        return cls(layers, tuple(records))

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> CacheConfig:
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise RegistryError(f"{where} is not a usable build cache: {exc}") from None
        return cls.from_json(parsed, where)

    def chain_of(self, record: CacheRecord) -> tuple[Layer, ...]:
        return tuple(self.layers[i] for i in record.chain)


class CacheConfigBuilder:
    """Collects records; each layer blob is listed once however many chains share it."""

    def __init__(self) -> None:
        self._layers: list[Layer] = []
        self._index: dict[tuple[Digest, Digest], int] = {}
        self._records: dict[str, CacheRecord] = {}

    def add(
        self,
        key: str,
        kind: str,
        inputs: Sequence[str],
        chain: Sequence[Layer] = (),
        description: str = "",
    ) -> None:
        idx = []
        for layer in chain:
            k = (layer.descriptor.digest, layer.diff_id)
            if k not in self._index:
                self._index[k] = len(self._layers)
                self._layers.append(layer)
            idx.append(self._index[k])
        self._records[key] = CacheRecord(key, kind, tuple(inputs), tuple(idx), description)

    def build(self) -> CacheConfig:
        records = tuple(self._records[k] for k in sorted(self._records))
        return CacheConfig(tuple(self._layers), records)


def cache_manifest(config: CacheConfig) -> tuple[bytes, bytes]:
    """(config bytes, manifest bytes) of ``config``'s cache manifest: an OCI image
    manifest whose config is the cache JSON and whose layers are its blobs."""
    cfg = config.to_bytes()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": CACHE_CONFIG_MEDIA_TYPE,
            "digest": sha256_bytes(cfg),
            "size": len(cfg),
        },
        "layers": [layer.descriptor.to_json() for layer in config.layers],
    }
    return cfg, json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def config_from_manifest(manifest: Any, where: str) -> Descriptor:
    """The cache config descriptor of a cache manifest (RegistryError if it is not one)."""
    try:
        cfg = Descriptor.from_json(manifest["config"])
    except (KeyError, TypeError, ValueError, UserError):
        raise RegistryError(f"{where} is not a build cache: no config") from None
    return cfg
