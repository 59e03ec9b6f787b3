"""``--output`` specs: which outputs a build writes, as buildx spells them (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from ociworker.errors import ConfigError

OUTPUT_TYPES = ("image", "oci", "docker", "local", "tar", "layers")
#: outputs written to ``dest``; those in STDOUT_TYPES may say ``dest=-``
DEST_TYPES = ("oci", "docker", "local", "tar", "layers")
STDOUT_TYPES = ("oci", "docker", "tar")


@dataclass(frozen=True)
class OutputSpec:
    type: str
    attrs: tuple[tuple[str, str], ...] = ()

    def get(self, key: str, default: str = "") -> str:
        return dict(self.attrs).get(key, default)

    @property
    def to_stdout(self) -> bool:
        return self.get("dest") == "-"

    @classmethod
    def parse(cls, text: str) -> OutputSpec:
        """``type=oci,dest=out.tar`` (as buildx), or a bare path meaning type=local
        (``-`` alone meaning a tar on stdout, as in buildx)."""
        if "=" not in text and "," not in text:
            if text == "-":
                return cls("tar", (("dest", "-"),))
            return cls("local", (("dest", text),))
        attrs: dict[str, str] = {}
        for part in text.split(","):
            k, eq, v = part.partition("=")
            if not eq:
                raise ConfigError(f"invalid output {text!r}: {part!r} is not key=value")
            attrs[k.strip()] = v.strip()
        typ = attrs.pop("type", "local" if "dest" in attrs else "")
        if typ == "registry":
            raise ConfigError("type=registry is not supported yet; use type=oci and skopeo")
        if typ not in OUTPUT_TYPES:
            raise ConfigError(f"unknown output type {typ!r}: use one of {', '.join(OUTPUT_TYPES)}")
        if typ in DEST_TYPES and not attrs.get("dest"):
            raise ConfigError(f"output type={typ} needs dest=PATH")
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
        return cls(typ, tuple(sorted(attrs.items())))
