"""Whether a rootless worker can put its RUN steps in cgroups of its own (pure).

Only cgroup v2 lets an ordinary user have cgroups: systemd delegates a subtree by
chowning its directory and its ``cgroup.procs``, ``cgroup.subtree_control`` and
``cgroup.threads`` to the user (``Delegate=`` of user@.service, of a
``systemd-run --user --scope -p Delegate=yes`` scope). The worker starts in such a
cgroup ``C`` (``/proc/self/cgroup``); the step cgroups it makes below ``C`` can only
use a controller that ``C`` enables in its ``cgroup.subtree_control``, and the kernel
refuses that while ``C`` holds processes (the "no internal processes" rule). So the
worker first moves itself into a leaf ``C/LEAF``, then enables the controllers, then
makes each step's cgroup beside that leaf: what rootlesskit does with ``--cgroupns``
("evacuation") and BuildKit's rootless worker relies on.

It only moves itself: a ``C`` that other processes share (a login session's scope, a
terminal's service) is not the worker's to reorganize, and the user is told how to
start the worker in a cgroup of its own. Where nothing is delegated, steps run without
limits and a warning says so; never a failure (BuildKit's rootless worker does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

#: the controllers --step-cpus, --step-memory and --step-pids need
WANTED = ("cpu", "memory", "pids")
#: the worker's own cgroup inside the delegated one: processes may only live in leaves
LEAF = "ociworker"
#: how a user starts the worker in a delegated cgroup of its own
SCOPE_FIX = "systemd-run --user --scope -p Delegate=yes ociworker ..."
#: how root delegates the controllers to every user's systemd instance
DELEGATE_FIX = (
    "sudo mkdir -p /etc/systemd/system/user@.service.d && "
    "printf '[Service]\\nDelegate=cpu cpuset io memory pids\\n' | "
    "sudo tee /etc/systemd/system/user@.service.d/delegate.conf && "
    "sudo systemctl daemon-reload"
)


@dataclass(frozen=True)
class CgroupFacts:
    """What the worker's (outer, not yet namespaced) process sees of its cgroup."""

    #: the filesystem type on /sys/fs/cgroup: ``cgroup2`` on a pure v2 host
    fs_type: str
    #: its v2 cgroup (the ``0::`` line of /proc/self/cgroup), None if it has none
    own: str | None
    #: ``own``'s dir, cgroup.procs and cgroup.subtree_control belong to the user and are
    #: writable by them: the cgroup is delegated
    owned: bool = False
    #: ``own``'s cgroup.controllers (those its parent hands down)
    controllers: tuple[str, ...] = ()
    #: ``own``'s cgroup.procs
    procs: tuple[int, ...] = ()
    #: this process
    pid: int = 0


@dataclass(frozen=True)
class Delegated:
    """Make step cgroups under ``base`` (a path in the v2 hierarchy), after moving the
    worker into ``leaf`` and enabling ``controllers`` in ``base``'s subtree_control."""

    base: str
    leaf: str
    controllers: tuple[str, ...]
    #: wanted controllers ``base`` does not have: those limits do not apply
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class NotDelegated:
    """Steps run without cgroup limits; ``reason`` and ``fix`` make the warning."""

    reason: str
    fix: str = ""


Plan = Delegated | NotDelegated


def parse_proc_cgroup(text: str) -> str | None:
    """The cgroup v2 path of a ``/proc/PID/cgroup`` text (its ``0::/path`` line)."""
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, sep, path = rest.partition(":")
        if hid == "0" and sep and not controllers and path.startswith("/"):
            return path
    return None


def join(base: str, name: str) -> str:
    """``name`` below the cgroup path ``base`` (``/`` is the hierarchy's root)."""
    return f"{base.rstrip('/')}/{name}"


def plan(facts: CgroupFacts, user: str) -> Plan:
    if facts.fs_type != "cgroup2":
        return NotDelegated(
            "cgroup v1 (or hybrid) host: no cgroup is delegated to users, which needs cgroup v2",
            "boot with systemd.unified_cgroup_hierarchy=1",
        )
    if facts.own is None:
        return NotDelegated("this process is in no cgroup v2 cgroup (/proc/self/cgroup)")
    if not facts.owned:
        return NotDelegated(
            f"its cgroup {facts.own} is not delegated to {user}",
            f"start it in a delegated cgroup: {SCOPE_FIX}",
        )
    have = tuple(c for c in WANTED if c in facts.controllers)
    missing = tuple(c for c in WANTED if c not in facts.controllers)
    # Without any of them it is still worth using: cpu.stat is in every v2 cgroup (the
    # step's CPU time is accounted), and the warning names the limits that do not apply.
    others = sorted(p for p in facts.procs if p != facts.pid)
    if others:
        # Enabling controllers needs every process out of the cgroup; the others
        # (the user's shell, say) are not the worker's to move.
        return NotDelegated(
            f"its cgroup {facts.own} holds {len(others)} other "
            f"process{'es' * (len(others) != 1)}, which the worker does not move",
            f"start it in a cgroup of its own: {SCOPE_FIX}",
        )
    return Delegated(facts.own, join(facts.own, LEAF), have, missing)


def warning(p: Plan) -> str | None:
    """The warning a build prints for ``p`` (None: every limit applies)."""
    if isinstance(p, Delegated):
        if not p.missing:
            return None
        return (
            f"rootless: the delegated cgroup {p.base} lacks the {', '.join(p.missing)} "
            f"controller{'s' * (len(p.missing) != 1)}: those step limits do not apply "
            f"(fix: {DELEGATE_FIX})"
        )
    fix = f" (fix: {p.fix})" if p.fix else ""
    return (
        f"rootless: RUN steps run without --step-memory/--step-pids/--step-cpus limits "
        f"or accounting: {p.reason}{fix}"
    )
