"""``--output`` specs: which outputs a build writes, as buildx spells them (pure).

``OutputSpec.parse`` reads one ``-o`` value as buildx's ``ParseExports`` does: a
bare path is ``type=local,dest=PATH``, ``-`` is a tar on stdout, anything else is
CSV ``key=value`` fields that must name a ``type``. Where buildx passes an
attribute on for BuildKit to ignore, we refuse it: an option that silently does
nothing (a misspelled key) is worse than an error. ``type=registry`` is
``type=image,push=true`` (as BuildKit), and ``--push`` is either (``with_push``).
``check_outputs`` checks a whole request's outputs (each one, and that no
two write to the same place); the controller runs it for every caller, so specs
made in Python or received by the daemon are held to the same rules.
"""

from __future__ import annotations

import csv
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ociworker.errors import ConfigError

OUTPUT_TYPES = ("image", "registry", "oci", "docker", "local", "tar", "layers")
#: outputs that make an image with a name (``name=`` or the build's tags)
IMAGE_TYPES = ("image", "registry", "oci", "docker")
#: outputs written to ``dest``; those in STDOUT_TYPES may say ``dest=-``
DEST_TYPES = ("oci", "docker", "local", "tar", "layers")
STDOUT_TYPES = ("oci", "docker", "tar")
#: outputs whose dest is one file (buildx creates it with os.Create: the parent
#: must exist) and those whose dest is a directory (created, parents too, as
#: BuildKit's MkdirAll does)
FILE_TYPES = ("oci", "docker", "tar")
DIR_TYPES = ("local", "layers")

#: what BuildKit's image exporters share and ours honour: the image's names
#: (``exporter.base.image_names``) and the layer options (``exporter.assemble``)
_LAYER_ATTRS = frozenset(
    {"compression", "compression-level", "oci-mediatypes", "rewrite-timestamp"}
)
#: force-compression: the base image's layers are re-compressed too
_IMAGE_ATTRS = _LAYER_ATTRS | {"name", "force-compression"}
#: the attributes each output type honours; any other is refused
ATTRS: Mapping[str, frozenset[str]] = {
    "image": _IMAGE_ATTRS | {"push"},
    "registry": _IMAGE_ATTRS,
    "oci": _IMAGE_ATTRS | {"dest"},
    "docker": _IMAGE_ATTRS | {"dest"},
    "local": frozenset({"dest"}),
    "tar": frozenset({"dest"}),
    "layers": _LAYER_ATTRS | {"dest"},  # the layers' codec and media type
}
COMPRESSIONS = ("gzip", "zstd", "uncompressed")
_BOOL_ATTRS = ("oci-mediatypes", "push", "force-compression", "rewrite-timestamp")


def parse_bool(value: str) -> bool | None:
    """``true`` or ``false`` (None: neither). BuildKit also takes Go's other
    spellings (1, T, ...); the layer options read only these two, so only these
    two are accepted rather than some being ignored."""
    return {"true": True, "false": False}.get(value)


@dataclass(frozen=True)
class OutputSpec:
    type: str
    attrs: tuple[tuple[str, str], ...] = ()

    def get(self, key: str, default: str = "") -> str:
        return dict(self.attrs).get(key, default)

    @property
    def to_stdout(self) -> bool:
        return self.get("dest") == "-"

    @property
    def pushes(self) -> bool:
        """Whether this output pushes its image to a registry."""
        return self.type == "registry" or (
            self.type == "image" and parse_bool(self.get("push", "false")) is True
        )

    def __str__(self) -> str:
        """The spec as an ``--output`` value (for messages)."""
        return ",".join([f"type={self.type}", *(f"{k}={v}" for k, v in self.attrs)])

    @classmethod
    def parse(cls, text: str) -> OutputSpec:
        """One ``--output`` value: ``type=oci,dest=out.tar`` (CSV, as buildx), a
        bare path meaning type=local, or ``-`` alone meaning a tar on stdout.
        ``type=oci`` and ``type=tar`` without ``dest`` go to stdout (as buildx)."""
        if text == "":
            raise ConfigError(
                'invalid output "": give a directory, "-" (a tar on stdout) '
                "or type=TYPE[,dest=PATH]"
            )
        try:
            rows = list(csv.reader([text], strict=True))
        except csv.Error as e:
            raise ConfigError(f"invalid output {text!r}: {e}") from None
        fields = rows[0] if rows else []
        # buildx takes any single field as a path; one with "=" is far more
        # likely a key=value missing its type (dest=x.tar), so it must say type=.
        if fields == [text] and "=" not in text:
            if text == "-":
                return cls("tar", (("dest", "-"),))
            return cls("local", (("dest", text),))
        attrs: dict[str, str] = {}
        for field in fields:
            k, eq, v = field.partition("=")
            key = k.strip().lower()  # as buildx: keys are case-insensitive, values not
            if not eq or not key:
                raise ConfigError(f"invalid output {text!r}: {field!r} is not KEY=VALUE")
            if key in attrs:
                raise ConfigError(f"invalid output {text!r}: {key} is given twice")
            if v == "":
                raise ConfigError(f"invalid output {text!r}: {key} is empty")
            attrs[key] = v
        typ = attrs.pop("type", "")
        if not typ:
            raise ConfigError(
                f"type is required for output {text!r}: write type=TYPE,dest=PATH "
                f"(TYPE: {', '.join(OUTPUT_TYPES)}), or a bare PATH for type=local"
            )
        if typ in ("oci", "tar") and "dest" not in attrs:
            attrs["dest"] = "-"
        spec = cls(typ, tuple(sorted(attrs.items())))
        spec.check(text)
        return spec

    def check(self, text: str = "") -> None:
        """Refuse what this output cannot do: an unknown type, an attribute its
        exporter does not honour, a bad value, a missing or impossible dest.
        ``text``: the output as the user wrote it, for messages."""
        text = text or str(self)
        typ = self.type
        if typ not in OUTPUT_TYPES:
            raise ConfigError(f"unknown output type {typ!r}: use one of {', '.join(OUTPUT_TYPES)}")
        attrs = dict(self.attrs)
        for key, value in self.attrs:
            if key not in ATTRS[typ]:
                raise ConfigError(
                    f"output {text!r}: unknown attribute {key!r} for type={typ} "
                    f"(it takes {', '.join(sorted(ATTRS[typ]))})"
                )
            if value == "":
                raise ConfigError(f"output {text!r}: {key} is empty")
        for key in _BOOL_ATTRS:
            if key in attrs and parse_bool(attrs[key]) is None:
                raise ConfigError(f"output {text!r}: {key} must be true or false")
        if "compression" in attrs and attrs["compression"] not in COMPRESSIONS:
            raise ConfigError(
                f"output {text!r}: unknown compression {attrs['compression']!r}: "
                f"use {', '.join(COMPRESSIONS)}"
            )
        if typ in DEST_TYPES and not attrs.get("dest"):
            if typ == "docker":
                raise ConfigError(
                    f"output {text!r}: type=docker needs dest=FILE (loading into a "
                    "Docker engine is not supported: docker load -i FILE)"
                )
            raise ConfigError(f"output {text!r} needs dest=PATH (dest is required for {typ})")
        if attrs.get("dest") == "-" and typ not in STDOUT_TYPES:
            # A directory cannot be a byte stream; the tar output is the streamable form.
            raise ConfigError(
                f"output type={typ} cannot be written to stdout (dest=-); "
                + (
                    "use type=tar,dest=- to stream the files as a tar"
                    if typ == "local"
                    else "give a directory"
                )
            )


def with_push(outputs: Sequence[OutputSpec]) -> tuple[OutputSpec, ...]:
    """The outputs of ``--push``, as buildx reads it: none given -> one
    ``type=image,push=true``; an image output gets ``push=true``; a registry
    output already pushes; any other output cannot be pushed."""
    if not outputs:
        return (OutputSpec("image", (("push", "true"),)),)
    out: list[OutputSpec] = []
    for o in outputs:
        if o.type == "image":
            attrs = dict(o.attrs)
            attrs["push"] = "true"
            o = OutputSpec("image", tuple(sorted(attrs.items())))
        elif o.type != "registry":
            raise ConfigError(f'push and "{o.type}" output can\'t be used together')
        out.append(o)
    return tuple(out)


def check_outputs(outputs: Sequence[OutputSpec], tags: Sequence[str] = ()) -> None:
    """Check every output, and that no two write to the same place: one stdout,
    one output per dest (compared as written, normalized; the CLI's preflight
    also compares the real paths). A pushing output needs a name (its ``name=``
    or the build's ``tags``) to push to."""
    by_dest: dict[str, OutputSpec] = {}
    for out in outputs:
        out.check()
        if out.pushes and not out.get("name") and not tags:
            raise ConfigError(
                f"output {str(out)!r}: tag is needed when pushing to registry: "
                "give -t REGISTRY/REPOSITORY:TAG or name=..."
            )
        dest = out.get("dest")
        if not dest:
            continue
        key = dest if dest == "-" else posixpath.normpath(dest)
        first = by_dest.get(key)
        if first is not None:
            if dest == "-":
                raise ConfigError(
                    f"only one output can be written to stdout (dest=-): {first} and {out}"
                )
            raise ConfigError(f"outputs {str(first)!r} and {str(out)!r} both write to {dest}")
        by_dest[key] = out


#: the ``--annotation`` types buildx knows; only the manifest's exist here
#: (a build makes one manifest and no index)
_ANNOTATION_TYPES = ("manifest", "index", "manifest-descriptor", "index-descriptor")


def parse_annotations(items: Sequence[str]) -> dict[str, str]:
    """``--annotation [manifest:]KEY=VALUE`` values -> the image manifest's
    annotations (buildx's spelling; the last of one key wins). A type other
    than ``manifest`` is refused: this worker makes no index, and an
    annotation dropped silently is worse than an error."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        typ, colon, name = key.partition(":")
        if colon and (typ in _ANNOTATION_TYPES or "[" in typ):
            if typ != "manifest":
                raise ConfigError(
                    f"invalid --annotation {item!r}: only manifest annotations are "
                    "supported (a build here makes one manifest, no index)"
                )
            key = name
        if not eq or not key or any(c.isspace() for c in key):
            raise ConfigError(f"invalid --annotation {item!r}: want [manifest:]KEY=VALUE")
        out[key] = value
    return out


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    """``--label KEY=VALUE`` values -> image config labels (``KEY`` alone: an
    empty value, as docker reads it)."""
    out: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key:
            raise ConfigError(f"invalid --label {item!r}: want KEY=VALUE")
        out[key] = value
    return out
