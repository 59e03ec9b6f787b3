"""Build history (pure values): what a build did, step by step, why a step
missed the cache, and where the time went (``history ls|inspect|logs|trace``).

A record is written by the controller at the end of every build (success or
failure) and kept by a store (``cachedb.history``). Each step keeps its cache
key and the inputs that made it (the op's JSON, its inputs' keys, the digests
of the context files the key covered: names and digests, never contents), so
``explain`` can say why a key differs from the closest earlier build's without
running anything again.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ociworker.core.progress import Info, Usage, VertexLog, VertexStatus, Warning
from ociworker.errors import NotFoundError

#: buildx's defaults for BuildKit's history (``history.maxEntries`` / ``maxAge``)
DEFAULT_MAX_ENTRIES = 50
DEFAULT_MAX_AGE = 48 * 3600.0


@dataclass(frozen=True)
class StepRecord:
    """One step of a build as it happened."""

    digest: str
    name: str
    started: float | None = None
    completed: float | None = None
    cached: bool = False
    error: str = ""
    #: ``Usage.to_json()`` of a RUN that ran (cpu, memory, I/O), else empty
    usage: Mapping[str, Any] = field(default_factory=dict)
    #: the cache key, and what made it (empty for pseudo-steps such as exporting)
    key: str = ""
    op: Mapping[str, Any] = field(default_factory=dict)
    #: the inputs' vertex digests ("" for scratch) and their keys, in order
    inputs: tuple[str, ...] = ()
    input_keys: tuple[str, ...] = ()
    #: context file -> content digest, for the files the key covered
    files: Mapping[str, str] = field(default_factory=dict)
    #: the step's stage ignored the cache (``--no-cache-filter``)
    cache_ignored: bool = False

    @property
    def ran(self) -> bool:
        return not self.cached and self.started is not None

    @property
    def duration(self) -> float:
        if self.started is None or self.completed is None:
            return 0.0
        return max(0.0, self.completed - self.started)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"digest": self.digest, "name": self.name}
        for k in ("started", "completed"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.cached:
            d["cached"] = True
        if self.error:
            d["error"] = self.error
        if self.usage:
            d["usage"] = dict(self.usage)
        if self.key:
            d["key"] = self.key
            d["op"] = dict(self.op)
            d["inputs"] = list(self.inputs)
            d["input_keys"] = list(self.input_keys)
        if self.files:
            d["files"] = dict(self.files)
        if self.cache_ignored:
            d["cache_ignored"] = True
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StepRecord:
        return cls(
            digest=str(d["digest"]),
            name=str(d.get("name", "")),
            started=d.get("started"),
            completed=d.get("completed"),
            cached=bool(d.get("cached", False)),
            error=str(d.get("error", "")),
            usage=dict(d.get("usage", {})),
            key=str(d.get("key", "")),
            op=dict(d.get("op", {})),
            inputs=tuple(d.get("inputs", ())),
            input_keys=tuple(d.get("input_keys", ())),
            files=dict(d.get("files", {})),
            cache_ignored=bool(d.get("cache_ignored", False)),
        )


@dataclass(frozen=True)
class BuildRecord:
    id: str
    created: float
    completed: float | None = None
    #: the Dockerfile as the user named it, and the digest of its text
    dockerfile: str = "Dockerfile"
    dockerfile_digest: str = ""
    context: str = ""
    target: str = ""
    build_args: Mapping[str, str] = field(default_factory=dict)
    no_cache: bool = False
    steps: tuple[StepRecord, ...] = ()
    #: e.g. ``containerimage.digest`` -> digest
    outputs: Mapping[str, str] = field(default_factory=dict)
    error: str = ""
    #: step name -> why it missed the cache (``explain``, at record time)
    explain: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: the earlier build ``explain`` compared with ("" = none)
    compared_with: str = ""

    @property
    def status(self) -> str:
        if self.completed is None:
            return "Running"
        return "Error" if self.error else "Completed"

    @property
    def duration(self) -> float:
        return max(0.0, (self.completed or self.created) - self.created)

    @property
    def name(self) -> str:
        """As buildx names a build: the context's base name, then the target."""
        base = self.context.rstrip("/").rsplit("/", 1)[-1] or self.context or "."
        return f"{base} ({self.target})" if self.target else base

    def build_steps(self) -> tuple[StepRecord, ...]:
        """The Dockerfile's steps (keyed vertices), not the pseudo-steps."""
        return tuple(s for s in self.steps if s.key)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created,
            "completed": self.completed,
            "dockerfile": self.dockerfile,
            "dockerfile_digest": self.dockerfile_digest,
            "context": self.context,
            "target": self.target,
            "build_args": dict(self.build_args),
            "no_cache": self.no_cache,
            "steps": [s.to_json() for s in self.steps],
            "outputs": dict(self.outputs),
            "error": self.error,
            "explain": {k: list(v) for k, v in self.explain.items()},
            "compared_with": self.compared_with,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BuildRecord:
        return cls(
            id=str(d["id"]),
            created=float(d["created"]),
            completed=d.get("completed"),
            dockerfile=str(d.get("dockerfile", "Dockerfile")),
            dockerfile_digest=str(d.get("dockerfile_digest", "")),
            context=str(d.get("context", "")),
            target=str(d.get("target", "")),
            build_args=dict(d.get("build_args", {})),
            no_cache=bool(d.get("no_cache", False)),
            steps=tuple(StepRecord.from_json(s) for s in d.get("steps", ())),
            outputs=dict(d.get("outputs", {})),
            error=str(d.get("error", "")),
            explain={k: tuple(v) for k, v in d.get("explain", {}).items()},
            compared_with=str(d.get("compared_with", "")),
        )


def resolve_ref(ref: str, ids_newest_first: Sequence[str]) -> str:
    """A build's id from what the user typed: a full id, a unique prefix, or
    ``^N`` (the Nth build before the newest, as buildx); "" = the newest."""
    if not ids_newest_first:
        raise NotFoundError("no build records")
    if ref in ("", "^0"):
        return ids_newest_first[0]
    if ref.startswith("^") and ref[1:].isdigit():
        n = int(ref[1:])
        if n >= len(ids_newest_first):
            raise NotFoundError(f"no build record {ref}: only {len(ids_newest_first)} kept")
        return ids_newest_first[n]
    found = [i for i in ids_newest_first if i.startswith(ref)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise NotFoundError(f"no build record {ref!r}")
    raise NotFoundError(f"build record {ref!r} is ambiguous ({len(found)} match)")


def expired(records: Iterable[tuple[str, float]], max_entries: int, max_age: float) -> list[str]:
    """The ids (of ``(id, created)`` pairs) to drop so at most ``max_entries``
    remain, none older than ``max_age`` seconds (0 = no limit of that kind)."""
    ordered = sorted(records, key=lambda r: r[1], reverse=True)
    now = time.time()
    drop = []
    for n, (rid, created) in enumerate(ordered):
        if (max_entries and n >= max_entries) or (max_age and now - created > max_age):
            drop.append(rid)
    return drop


# --- why a step missed the cache --------------------------------------------------


def explain(current: BuildRecord, previous: BuildRecord | None) -> dict[str, tuple[str, ...]]:
    """For each step of ``current`` that ran: why its key differs from the same
    step's in ``previous`` (the closest earlier build of the same Dockerfile and
    target). Steps are matched by name, the Dockerfile line they show."""
    out: dict[str, tuple[str, ...]] = {}
    # local sources are read again by every build (as BuildKit's "load build
    # context"): their running says nothing about the cache
    ran = [s for s in current.build_steps() if s.ran and not _is_local_source(s)]
    if not ran:
        return out
    by_digest = {s.digest: s for s in current.steps}
    prev_by_name = {_match_name(s.name): s for s in previous.build_steps()} if previous else {}
    prev_keys = {s.key for s in previous.build_steps()} if previous else set()
    # an image source shared by stages is one step named after either of them:
    # the same image (any digest) is the same step
    prev_by_source = {_source_of(s): s for s in previous.build_steps()} if previous else {}
    prev_by_source.pop("", None)
    for s in ran:
        if current.no_cache:
            out[s.name] = ("--no-cache was given",)
            continue
        if s.cache_ignored:
            out[s.name] = ("--no-cache-filter names its stage",)
            continue
        if previous is None:
            out[s.name] = ("no earlier build of this Dockerfile and target",)
            continue
        p = prev_by_name.get(_match_name(s.name)) or prev_by_source.get(_source_of(s))
        if p is None:
            if s.key in prev_keys:
                out[s.name] = (f"its cache record was pruned since build {previous.id[:12]}",)
            else:
                out[s.name] = (
                    f"the Dockerfile changed: no step {s.name!r} in build {previous.id[:12]}",
                )
            continue
        if p.key == s.key:
            if p.error:
                why = f"it failed in build {previous.id[:12]}: no result was kept"
            elif not p.cached and p.completed is None:
                why = f"it did not finish in build {previous.id[:12]} (the build stopped)"
            else:
                why = f"its cache record was pruned since build {previous.id[:12]}"
            out[s.name] = (why,)
            continue
        reasons = _op_reasons(s.op, p.op, current.build_args, previous.build_args)
        reasons += _input_reasons(s, p, by_digest)
        out[s.name] = tuple(reasons) or ("its cache key changed (no recorded input differs)",)
    return out


def _match_name(name: str) -> str:
    # a FROM step's name carries the digest its tag resolved to: the same step
    # of a build whose base image moved is still the same step
    return re.sub(r"@sha256:[0-9a-f]{64}", "", name)


def _source_of(s: StepRecord) -> str:
    src = s.op.get("source")
    if not isinstance(src, dict):
        return ""
    ident = str(src.get("identifier", ""))
    return ident.split("@", 1)[0] if ident.startswith("docker-image://") else ""


def _is_local_source(s: StepRecord) -> bool:
    src = s.op.get("source")
    return isinstance(src, dict) and str(src.get("identifier", "")).startswith("local://")


def _op_reasons(
    op: Mapping[str, Any],
    prev: Mapping[str, Any],
    args: Mapping[str, str],
    prev_args: Mapping[str, str],
) -> list[str]:
    if op == prev:
        return []
    src, psrc = op.get("source"), prev.get("source")
    if isinstance(src, dict) and isinstance(psrc, dict):
        new, old = str(src.get("identifier", "")), str(psrc.get("identifier", ""))
        if new != old and new.startswith("docker-image://"):
            return [f"base image changed: {_strip(old)} -> {_strip(new)}"]
        if new != old:
            return [f"source changed: {old} -> {new}"]
    reasons: list[str] = []
    body, pbody = _body(op), _body(prev)
    env, penv = _env(body), _env(pbody)
    for name in sorted(set(env) | set(penv)):
        if env.get(name) == penv.get(name):
            continue
        kind = "build-arg" if name in args or name in prev_args else "env"
        reasons.append(f"{kind} {name} changed")
    other = sorted(k for k in set(body) | set(pbody) if k != "env" and body.get(k) != pbody.get(k))
    if other or (not reasons and type(body) is type(pbody) and body != pbody):
        reasons.append("the step's definition changed (" + ", ".join(other or ["op"]) + ")")
    if set(op) != set(prev):
        reasons.append("the step's instruction changed")
    return reasons


def _input_reasons(s: StepRecord, p: StepRecord, by_digest: Mapping[str, StepRecord]) -> list[str]:
    reasons: list[str] = []
    for i, key in enumerate(s.input_keys):
        pkey = p.input_keys[i] if i < len(p.input_keys) else None
        if key == pkey:
            continue
        parent = by_digest.get(s.inputs[i]) if i < len(s.inputs) else None
        if parent is not None and _is_local_source(parent):
            changed = _changed_files(s.files, p.files)
            what = ", ".join(changed) if changed else "(the files it selects)"
            reasons.append(f"context files changed: {what}")
        elif parent is not None:
            verb = "re-ran" if parent.ran else "changed"
            reasons.append(f"parent step {parent.name!r} {verb}")
        else:
            reasons.append(f"input {i} changed")
    if not s.input_keys and s.files != p.files:
        changed = _changed_files(s.files, p.files)
        reasons.append("context files changed: " + ", ".join(changed))
    return reasons


def _changed_files(now: Mapping[str, str], before: Mapping[str, str]) -> list[str]:
    return sorted(f for f in set(now) | set(before) if now.get(f) != before.get(f))


def _body(op: Mapping[str, Any]) -> dict[str, Any]:
    if len(op) == 1:
        (v,) = op.values()
        if isinstance(v, dict):
            return v
    return dict(op)


def _env(body: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in body.get("env", ()) or ():
        k, _, v = str(item).partition("=")
        out[k] = v
    return out


def _strip(identifier: str) -> str:
    return identifier.removeprefix("docker-image://")


def explain_lines(record: BuildRecord) -> list[str]:
    """``--explain-cache``'s lines: one block per step that ran."""
    if not record.explain:
        return ["explain-cache: every step was cached"]
    against = f" (compared with build {record.compared_with[:12]})" if record.compared_with else ""
    lines = [f"explain-cache: {len(record.explain)} step(s) ran{against}"]
    for name, reasons in record.explain.items():
        lines.append(f"  {name}")
        lines.extend(f"    - {r}" for r in reasons)
    return lines


# --- ls / inspect -----------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """``1m 1s``, ``3.4s``: as buildx prints durations."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    if m < 60:
        return f"{m}m {s:2d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:2d}m"


def _ago(t: float, now: float) -> str:
    d = max(0, int(now - t))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if d >= size:
            n = d // size
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "Less than a second ago" if d < 1 else f"{d} seconds ago"


def format_ls(records: Sequence[BuildRecord], now: float | None = None) -> str:
    """``history ls``: buildx's columns, newest first."""
    now = time.time() if now is None else now
    rows = [("BUILD ID", "NAME", "STATUS", "CREATED AT", "DURATION")]
    for r in records:
        rows.append((r.id, r.name, r.status, _ago(r.created, now), human_duration(r.duration)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "   " + row[4]
        for row in rows
    )


def format_inspect(r: BuildRecord) -> str:
    """``history inspect``: buildx's ``Key: value`` block, then the steps (times,
    cached, resource figures), outputs, error and the explain-cache section."""
    steps = r.build_steps()
    cached = sum(1 for s in steps if s.cached)
    pct = round(100 * cached / len(steps)) if steps else 0
    lines = [
        f"{'Name:':<16}{r.name}",
        f"{'Context:':<16}{r.context}",
        f"{'Dockerfile:':<16}{r.dockerfile}",
        f"{'Dockerfile digest:':<19}{r.dockerfile_digest}",
    ]
    if r.target:
        lines.append(f"{'Target:':<16}{r.target}")
    for k, v in sorted(r.build_args.items()):
        lines.append(f"{'Build Arg:':<16}{k}={v}")
    if r.no_cache:
        lines.append(f"{'No Cache:':<16}true")
    lines += [
        "",
        f"{'Started:':<16}{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(r.created))}",
        f"{'Duration:':<16}{human_duration(r.duration)}",
        f"{'Status:':<16}{r.status}",
        f"{'Build Steps:':<16}{len(steps)}/{len(steps)} ({pct}% cached)",
        f"{'Steps Run:':<16}{sum(1 for s in steps if s.ran)}",
    ]
    if r.error:
        lines += ["", f"Error: {r.error}"]
    if r.outputs:
        lines += ["", "Outputs:"]
        lines += [f"{k:<30} {v}" for k, v in sorted(r.outputs.items())]
    lines += ["", "Steps:", f"{'#':>3}  {'STATUS':<7} {'DURATION':>8}  {'USAGE':<32} NAME"]
    for n, s in enumerate(r.steps, 1):
        state = "CACHED" if s.cached else "ERROR" if s.error else "DONE"
        lines.append(
            f"{n:>3}  {state:<7} {human_duration(s.duration):>8}  {_usage(s.usage):<32} {s.name}"
        )
    lines += ["", "Explain Cache:"]
    lines += ["  " + line for line in explain_lines(r)]
    return "\n".join(lines)


def _usage(u: Mapping[str, Any]) -> str:
    return Usage.from_json(dict(u)).summary() or "-"


# --- where the time went ----------------------------------------------------------


def critical_path(r: BuildRecord) -> list[str]:
    """Digests of the chain that decided the build's length: from the step that
    finished last back through, at each step, the input that finished last."""
    by_digest = {s.digest: s for s in r.steps if s.completed is not None}
    if not by_digest:
        return []
    last = max(by_digest.values(), key=lambda s: s.completed or 0.0)
    # the last pseudo-step (exporting) hangs off the target: follow the last keyed step
    keyed = [s for s in by_digest.values() if s.key]
    path: list[str] = []
    if not last.key and keyed:
        path.append(last.digest)
        last = max(keyed, key=lambda s: s.completed or 0.0)
    cur: StepRecord | None = last
    seen: set[str] = set()
    while cur is not None and cur.digest not in seen:
        seen.add(cur.digest)
        path.append(cur.digest)
        parents = [by_digest[i] for i in cur.inputs if i in by_digest]
        cur = max(parents, key=lambda s: s.completed or 0.0) if parents else None
    return path


def _timed(r: BuildRecord) -> list[StepRecord]:
    out = []
    for s in r.steps:
        start = s.started if s.started is not None else s.completed
        if start is None:
            continue
        end = s.completed if s.completed is not None else start
        out.append(replace(s, started=start, completed=end))
    return sorted(out, key=lambda s: (s.started or 0.0, s.name))


def trace_json(r: BuildRecord) -> dict[str, Any]:
    """Chrome trace format (Perfetto and chrome://tracing open it): one complete
    event (``ph: X``, microseconds) per step, on the lane where it fits."""
    crit = set(critical_path(r))
    t0 = r.created
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": f"build {r.id}"}}
    ]
    lanes: list[float] = []
    for s in _timed(r):
        start, end = s.started or t0, s.completed or t0
        lane = next((i for i, free in enumerate(lanes) if free <= start), len(lanes))
        if lane == len(lanes):
            lanes.append(end)
        lanes[lane] = end
        args: dict[str, Any] = {"cached": s.cached, "critical_path": s.digest in crit}
        if s.key:
            args["cache_key"] = s.key
        if s.error:
            args["error"] = s.error
        args.update(s.usage)
        events.append(
            {
                "name": s.name,
                "cat": "cached" if s.cached else "step",
                "ph": "X",
                "ts": round((start - t0) * 1e6),
                "dur": max(1, round((end - start) * 1e6)),
                "pid": 1,
                "tid": lane + 1,
                "args": args,
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def trace_svg(r: BuildRecord) -> str:
    """A self-contained SVG timeline: one row per step, bars over time, cached
    steps hatched grey, the critical path in red."""
    steps = _timed(r)
    crit = set(critical_path(r))
    t0 = r.created
    t1 = max([r.completed or t0] + [s.completed or t0 for s in steps])
    span = max(t1 - t0, 1e-3)
    label_w, chart_w, row_h, top = 520, 600, 22, 40
    width = label_w + chart_w + 120
    height = top + row_h * len(steps) + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="12">',
        f"<title>build {html.escape(r.id)}</title>",
        '<defs><pattern id="cached" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#ddd"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#aaa" stroke-width="3"/></pattern></defs>',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="8" y="20" font-weight="bold">build {html.escape(r.id[:12])} '
        f"{html.escape(r.name)}: {human_duration(r.duration)}, {r.status}</text>",
    ]
    for n, s in enumerate(steps):
        y = top + n * row_h
        x = label_w + (((s.started or t0) - t0) / span) * chart_w
        w = max(2.0, (((s.completed or t0) - (s.started or t0)) / span) * chart_w)
        critical = s.digest in crit
        fill = "url(#cached)" if s.cached else "#d62728" if critical else "#1f77b4"
        if s.error:
            fill = "#ff7f0e"
        klass = " ".join(
            c for c, on in (("step", True), ("cached", s.cached), ("critical", critical)) if on
        )
        took = f"{s.duration * 1000:.0f}ms" if s.duration < 1 else human_duration(s.duration)
        tag = " CACHED" if s.cached else f" {took}"
        out.append(
            f'<g class="{klass}"><title>{html.escape(s.name)}{tag}</title>'
            f'<text x="8" y="{y + 15}">{html.escape(_clip(s.name, 70))}</text>'
            f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" '
            f'fill="{fill}"' + (' stroke="#d62728" stroke-width="2"' if critical else "") + "/>"
            f'<text x="{x + w + 4:.1f}" y="{y + 15}" fill="#555">{html.escape(tag.strip())}'
            "</text></g>"
        )
    y = top + row_h * len(steps) + 25
    out.append(
        f'<text x="8" y="{y}" fill="#555">blue: ran, grey hatched: cached, '
        "red: critical path, orange: failed</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def dumps(record: BuildRecord) -> str:
    return json.dumps(record.to_json(), sort_keys=True)


def event_from_json(
    d: Mapping[str, Any],
) -> VertexStatus | VertexLog | Warning | Info | None:
    """A recorded progress event back (``history logs`` replays them); None for
    kinds the logs do not show."""
    if "vertex" in d:
        v = d["vertex"]
        return VertexStatus(
            v["digest"],
            v.get("name", ""),
            started=v.get("started"),
            completed=v.get("completed"),
            cached=bool(v.get("cached", False)),
            error=v.get("error"),
            usage=Usage.from_json(v["usage"]) if "usage" in v else None,
        )
    if "log" in d:
        lg = d["log"]
        return VertexLog(lg["vertex"], int(lg["stream"]), lg["data"].encode(), lg["timestamp"])
    if "warning" in d:
        return Warning(d["warning"]["message"], d["warning"].get("detail", ""))
    if "info" in d:
        return Info(d["info"]["message"], d["info"].get("vertex", ""))
    return None
