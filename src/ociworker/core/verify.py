"""``--verify-cache``: is every cached result what a run without the cache makes?

Pure: it takes what the IO shell (``ociworker.verify``) read of each step's
layer (one ``Entry`` per path, no file times) and says, per step, whether the
cached result is verified, comes from a non-deterministic command, or is a
false hit; and the lines and the error the user sees.

What is compared, and why: each step's *layer* (its diff from the snapshot it
was built on), path by path: type, mode, owner, size, content digest, link
target, device numbers and xattrs. File times are left out on purpose: a re-run
of ``RUN echo hi > /f`` writes the same bytes at another time, so its diffID
differs from the cached layer's unless SOURCE_DATE_EPOCH clamps the times, and
a check that flagged every RUN would flag nothing useful. The diffIDs are still
compared and reported: equal diffIDs mean byte-identical layers; equal entries
with other diffIDs mean "only timestamps differ", which is not a false hit.
Comparing layers, not whole trees, keeps a difference where it was made: a step
on top of a non-deterministic one is judged by what it changed itself.

The verdicts (``classify``), from the cached layer and two runs in scratch:
- cached == first run: verified (the second run is not needed);
- first run != second run: the command is non-deterministic, whatever the
  cache holds. Not a false hit: the cached result is one a run could give,
  as BuildKit's cache would keep it too; the build does not fail for it;
- first run == second run != cached: a false hit, the cached result is not
  what the step makes (stale or damaged). The build fails before exporting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ociworker.core.digest import Digest, digest_of

Verdict = Literal["verified", "non-deterministic", "false hit", "not checked"]

#: at most this many paths are named per step (the count says how many more)
MAX_PATHS = 8


@dataclass(frozen=True)
class Entry:
    """One path of a layer as a re-run must reproduce it (no times)."""

    kind: str  # file, dir, symlink, hardlink, char, block, fifo
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    #: the content's sha256 for a file, the target for a link, "maj:min" for a device
    data: str = ""
    xattrs: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> list[object]:
        return [self.kind, self.mode, self.uid, self.gid, self.size, self.data, list(self.xattrs)]


@dataclass(frozen=True)
class StepFiles:
    """A step's result as compared: its layer's diffID and entries (path ->
    Entry; a whiteout is the ``.wh.`` entry it is in the layer), or the kind
    of a result that has no layer (``none``: scratch)."""

    diff_id: str = ""
    entries: Mapping[str, Entry] = field(default_factory=dict)
    #: "snapshot", or the result's kind when it has no layer ("none")
    kind: str = "snapshot"

    @property
    def tree_digest(self) -> Digest:
        """The digest of the entries: equal for layers that differ only in times."""
        return digest_of(
            {"kind": self.kind, "entries": {p: e.to_json() for p, e in self.entries.items()}}
        )

    def same_files(self, other: StepFiles) -> bool:
        return self.kind == other.kind and dict(self.entries) == dict(other.entries)


def differing_paths(a: StepFiles, b: StepFiles) -> list[str]:
    """Each path whose entry differs, with what differs (names, never contents):
    ``/f (content)``, ``/g (only in the cached result)``."""
    if a.kind != b.kind:
        return [f"(result kind {a.kind} vs {b.kind})"]
    out: list[str] = []
    for path in sorted(set(a.entries) | set(b.entries)):
        x, y = a.entries.get(path), b.entries.get(path)
        if x == y:
            continue
        if x is None:
            out.append(f"/{path} (not in the first)")
        elif y is None:
            out.append(f"/{path} (not in the second)")
        else:
            out.append(f"/{path} ({', '.join(_what_differs(x, y))})")
    return out


def _what_differs(x: Entry, y: Entry) -> list[str]:
    what = []
    if x.kind != y.kind:
        what.append(f"type {x.kind} vs {y.kind}")
    if x.mode != y.mode:
        what.append(f"mode {x.mode:o} vs {y.mode:o}")
    if (x.uid, x.gid) != (y.uid, y.gid):
        what.append(f"owner {x.uid}:{x.gid} vs {y.uid}:{y.gid}")
    if x.kind != y.kind:
        pass  # another type: its data and size are of another kind too
    elif x.data != y.data:
        what.append({"symlink": "link target", "hardlink": "link target"}.get(x.kind, "content"))
    elif x.size != y.size:
        what.append("size")
    if x.xattrs != y.xattrs:
        what.append("xattrs")
    return what or ["metadata"]


def _named(paths: Sequence[str], whose: tuple[str, str]) -> str:
    first, second = whose
    shown = [
        p.replace("(not in the first)", f"(only in {second})").replace(
            "(not in the second)", f"(only in {first})"
        )
        for p in paths[:MAX_PATHS]
    ]
    more = len(paths) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class StepCheck:
    """The verdict on one step, and why."""

    name: str
    verdict: Verdict
    detail: str = ""
    #: whether this build took the step from the cache (else it ran in this build)
    cached: bool = True

    def line(self) -> str:
        return f"{self.name}: {self.verdict}" + (f" ({self.detail})" if self.detail else "")


def classify(
    name: str,
    cached: StepFiles,
    first: StepFiles,
    second: StepFiles | None,
    *,
    was_cached: bool = True,
    nondeterministic_inputs: Sequence[str] = (),
) -> StepCheck:
    """The verdict on step ``name`` from its cached result and the runs in
    scratch (``second`` is needed only when ``first`` differs from ``cached``)."""
    if cached.same_files(first):
        if cached.diff_id and cached.diff_id == first.diff_id:
            detail = f"identical layer {cached.diff_id[:19]}"
        elif cached.kind != "snapshot":
            detail = f"no layer: {cached.kind} both times"
        else:
            detail = "same files; only timestamps differ"
        return StepCheck(name, "verified", detail, was_cached)
    if second is None:
        raise ValueError("a step whose first run differs needs a second run")
    if not first.same_files(second):
        detail = "two runs without the cache differ from each other: " + _named(
            differing_paths(first, second), ("the first run", "the second run")
        )
        if nondeterministic_inputs:
            detail += "; its input " + ", ".join(nondeterministic_inputs) + " is non-deterministic"
        return StepCheck(name, "non-deterministic", detail, was_cached)
    if not was_cached:
        # it ran in this build: its result is a run's too, so runs disagree
        detail = "this build's run and two runs without the cache differ: " + _named(
            differing_paths(cached, first), ("this build's run", "the later runs")
        )
        return StepCheck(name, "non-deterministic", detail, was_cached)
    detail = "the cached result differs from two agreeing runs without the cache: " + _named(
        differing_paths(cached, first), ("the cached result", "the runs")
    )
    return StepCheck(name, "false hit", detail, was_cached)


def check_pulled(name: str, layers: Sequence[tuple[str, StepFiles, StepFiles]]) -> StepCheck:
    """The verdict on a FROM step from its unpacked layers: (blob digest, the
    snapshot's layer as diffed, the blob's own entries) each. The blob is the
    image's truth (its digest was checked), so any difference is a false hit:
    the snapshot the cache serves is not the image. A directory only in the
    blob is left out: an unpacked directory with its lower layer's metadata is
    not in a diff (as in any diff of ours), nothing of the image is lost."""
    for digest, unpacked, image in layers:
        paths = [
            p
            for p in differing_paths(unpacked, image)
            if not (p.endswith("(not in the first)") and _is_dir(image, p))
        ]
        if paths:
            detail = f"the unpacked snapshot differs from the image's layer {digest[:19]}: "
            return StepCheck(
                name, "false hit", detail + _named(paths, ("the snapshot", "the blob"))
            )
    n = len(layers)
    said = f"{n} pulled layers match their blobs" if n != 1 else "the pulled layer matches its blob"
    return StepCheck(name, "verified", said)


def _is_dir(files: StepFiles, shown: str) -> bool:
    entry = files.entries.get(shown.split(" (", 1)[0].removeprefix("/"))
    return entry is not None and entry.kind == "dir"


def not_checked(name: str, why: str, *, was_cached: bool = True) -> StepCheck:
    return StepCheck(name, "not checked", why, was_cached)


@dataclass(frozen=True)
class VerifyReport:
    checks: tuple[StepCheck, ...]

    def of(self, verdict: Verdict) -> list[StepCheck]:
        return [c for c in self.checks if c.verdict == verdict]

    @property
    def ok(self) -> bool:
        """No false hit (non-deterministic steps do not fail the build)."""
        return not self.of("false hit")

    def summary(self) -> str:
        n = len(self.checks)
        counts = ", ".join(
            f"{len(self.of(v))} {v}{'s' if v == 'false hit' and len(self.of(v)) != 1 else ''}"
            for v in ("verified", "non-deterministic", "false hit", "not checked")
        )
        return f"verify-cache: {n} step{'s' if n != 1 else ''}: {counts}"

    def lines(self) -> list[str]:
        return [c.line() for c in self.checks] + [self.summary()]

    def warning(self) -> str | None:
        """What the user is warned of when the build still succeeds."""
        steps = self.of("non-deterministic")
        if not steps:
            return None
        names = "; ".join(c.name for c in steps)
        return (
            f"verify-cache: {len(steps)} non-deterministic step(s), whose result changes "
            f"from run to run (not a false hit): {names}"
        )


def failure(report: VerifyReport) -> str:
    """The build's error when ``report`` has false hits."""
    hits = report.of("false hit")
    lines = [f"verify-cache: {len(hits)} false cache hit(s); nothing was exported"]
    lines += [f"  {c.line()}" for c in hits]
    lines.append("  rebuild with --no-cache (or prune the build cache) to replace them")
    return "\n".join(lines)
