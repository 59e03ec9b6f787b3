"""Image assembly: the solved chain of snapshots -> layers -> config + manifest.

The layer options of a build (``compression``, ``compression-level``,
``oci-mediatypes``) may be given on any output; each output's are parsed when
its exporter resolves it (``LayerOptions.parse``) and ``compression_opts``
merges them in output order: the last output that names an option wins.

With SOURCE_DATE_EPOCH (``Plan.epoch``) the new layers' file times are clamped
to it: BuildKit does so only with ``rewrite-timestamp=true``; here it is implied,
and ``rewrite-timestamp=false`` on an output turns it off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ociworker.content.store import ContentStore
from ociworker.core.epoch import rfc3339_ns
from ociworker.core.oci import Layer
from ociworker.core.outputs import OutputSpec
from ociworker.diff.base import Compression, CompressionOpts
from ociworker.errors import ConfigError, UserError
from ociworker.exporter.chain import ChainLayers, is_empty
from ociworker.exporter.image import ImageResult, write_image

if TYPE_CHECKING:
    from ociworker.frontend.dockerfile.convert import Plan


@dataclass(frozen=True)
class LayerOptions:
    """The layer options one output names (None: it leaves them to the others)."""

    compression: str | None = None
    level: int | None = None
    oci_media_types: bool | None = None
    #: ``rewrite-timestamp=true|false`` (None: not said)
    rewrite_timestamp: bool | None = None
    #: ``force-compression=true``: the base image's layers are re-compressed too
    force: bool | None = None

    @classmethod
    def parse(cls, out: OutputSpec, *, oci_media_types: bool | None = None) -> LayerOptions:
        """``oci_media_types``: what the output asks for when it does not say
        ``oci-mediatypes=true|false`` (a docker archive: False)."""
        level: int | None = None
        if out.get("compression-level"):
            try:
                level = int(out.get("compression-level"))
            except ValueError:
                raise ConfigError("compression-level must be an integer") from None
        # core.outputs has refused any other value
        if out.get("oci-mediatypes") in ("true", "false"):
            oci_media_types = out.get("oci-mediatypes") == "true"
        rewrite: bool | None = None
        if out.get("rewrite-timestamp") in ("true", "false"):
            rewrite = out.get("rewrite-timestamp") == "true"
        force = None
        if out.get("force-compression") in ("true", "false"):
            force = out.get("force-compression") == "true"
        return cls(out.get("compression") or None, level, oci_media_types, rewrite, force)


def compression_opts(options: Sequence[LayerOptions]) -> CompressionOpts:
    """One build's layer options: gzip, the codec's level and OCI media types
    unless an output says otherwise; zstd layers need OCI media types."""
    comp = "gzip"
    level: int | None = None
    oci = True
    for o in options:
        comp = o.compression if o.compression is not None else comp
        level = o.level if o.level is not None else level
        oci = o.oci_media_types if o.oci_media_types is not None else oci
    if comp not in ("gzip", "zstd", "uncompressed"):
        raise ConfigError(f"unknown compression {comp!r}: use gzip, zstd or uncompressed")
    if comp == "zstd":
        oci = True
    c: Compression = comp  # type: ignore[assignment]
    return CompressionOpts(compression=c, level=level, oci_media_types=oci)


def with_epoch(
    opts: CompressionOpts, options: Sequence[LayerOptions], epoch: int | None
) -> CompressionOpts:
    """``opts`` clamping new layers' file times to ``epoch`` (SOURCE_DATE_EPOCH),
    unless the last output that says ``rewrite-timestamp`` says false."""
    rewrite = True
    for o in options:
        rewrite = o.rewrite_timestamp if o.rewrite_timestamp is not None else rewrite
    return dataclasses.replace(opts, epoch=epoch if rewrite else None)


#: BuildKit's words when an output asks for what it cannot do
REWRITE_WITHOUT_EPOCH = "rewrite-timestamp is specified, but no source-date-epoch was found"


def epoch_warnings(options: Sequence[LayerOptions], epoch: int | None) -> list[str]:
    """``rewrite-timestamp=true`` without SOURCE_DATE_EPOCH rewrites nothing (as
    in BuildKit, which says so)."""
    if epoch is None and any(o.rewrite_timestamp for o in options):
        return [REWRITE_WITHOUT_EPOCH]
    return []


def force_compression(options: Sequence[LayerOptions]) -> bool:
    """Whether the build's outputs ask to re-compress the base layers (the
    last output that says wins, as for the other layer options)."""
    force = False
    for o in options:
        force = o.force if o.force is not None else force
    return force


async def make_image(
    layers: ChainLayers,
    content: ContentStore,
    plan: Plan,
    top: str | None,
    opts: CompressionOpts,
    *,
    force: bool = False,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    remote_ok: bool = False,
) -> ImageResult:
    """Write config and manifest for the chain under ``top`` (built from ``plan``).

    A step whose diff is empty makes no layer and its history entry is marked
    ``empty_layer``, as BuildKit does. ``force``: base layers in another
    compression are re-compressed (same diffIDs); ``labels`` are added to the
    config's (``--label``, over the Dockerfile's LABELs), ``annotations`` to
    the manifest's."""
    chain = await layers.chain(top)
    base_n = plan.base_layers
    ours = plan.config["history"][len(plan.base_history) :]
    layer_steps = [h for h in ours if not h.get("empty_layer")]
    if len(chain) != base_n + len(layer_steps):
        raise UserError(
            f"internal: {len(chain)} snapshots for {base_n} base layers and "
            f"{len(layer_steps)} steps"
        )
    made: list[Layer] = list(
        await asyncio.gather(*(layers.layer_of(chain, i, opts) for i in range(len(chain))))
    )
    kept: list[Layer] = made[:base_n]
    if force:
        from ociworker.exporter.recompress import recompress

        kept = list(await asyncio.gather(*(recompress(content, la, opts) for la in kept)))
    for layer, entry in zip(made[base_n:], layer_steps, strict=True):
        if is_empty(layer):
            entry["empty_layer"] = True  # BuildKit drops layers that change nothing
        else:
            kept.append(layer)
    # The frontend dated everything when SOURCE_DATE_EPOCH is set. Otherwise, as
    # in BuildKit, a step is dated by the layer it made (when its snapshot was
    # first exported), a step without a layer by the last layer before it, and
    # the image by its newest step: a fully cached rebuild gives the same image
    # digest. Only what no layer dates (an imported cache's) says the build's time.
    now = time.time()
    ours_made = [la.created or now for la in made[base_n:]]
    # steps before the first layer (an ENV after FROM) take the first layer's date
    when = ours_made[0] if ours_made else now
    layer_times = iter(ours_made)
    made_layer = {id(h) for h in layer_steps}
    dated: list[dict[str, Any]] = []
    newest = when
    for h in ours:
        if id(h) in made_layer:
            when = next(layer_times)
            newest = max(newest, when)
        dated.append(h if "created" in h else dict(h, created=_rfc3339(when)))
    config = dict(plan.config)
    config["history"] = base_history(list(plan.base_history), base_n) + dated
    config.setdefault("created", _rfc3339(newest))
    inner = dict(config.get("config") or {})
    maint = inner.pop("_maintainer", None)
    if maint:
        config["author"] = maint
    if labels:
        inner["Labels"] = {**(inner.get("Labels") or {}), **labels}
    config["config"] = inner
    return await asyncio.to_thread(
        write_image,
        content,
        config,
        kept,
        oci_media_types=opts.oci_media_types,
        annotations=dict(annotations or {}),
        remote_ok=remote_ok,
    )


def _rfc3339(seconds: float) -> str:
    return rfc3339_ns(int(seconds * 1e9))


def base_history(history: list[dict[str, Any]], layers: int) -> list[dict[str, Any]]:
    """Make the base image's history name exactly its layers (some images have none)."""
    non_empty = sum(1 for h in history if not h.get("empty_layer"))
    for _ in range(layers - non_empty):
        history.append({"created_by": "(layer of the base image without history)"})
    return history
