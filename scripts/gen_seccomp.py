#!/usr/bin/env python3
"""Write src/ociworker/executor/seccomp_default.py from Docker's default seccomp profile.

Where the rules come from: moby/profiles, ``seccomp/default.json`` (the profile
Docker Engine and BuildKit apply to every container), at the commit pinned
below. What carries over is the rule set, as data: the default action, the
architecture map and every syscall rule with its conditions (``includes`` /
``excludes`` on capabilities, architectures and kernel versions). The
conditions are kept, not resolved here: ``ociworker.executor.seccomp`` resolves
them per step (its capabilities) and per host (its architecture and kernel),
as moby's ``setupSeccomp`` does. Comments of the source are dropped.

Usage: scripts/gen_seccomp.py [PATH_TO_default.json]
(without a path it downloads the pinned file from GitHub). Then review the diff.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

COMMIT = "cd3bed8061c7b7378b61fc6827c7885779417a75"
SOURCE = f"https://raw.githubusercontent.com/moby/profiles/{COMMIT}/seccomp/default.json"
HERE = Path(__file__).resolve().parent.parent
OUT = HERE / "src" / "ociworker" / "executor" / "seccomp_default.py"


def _cond(c: dict[str, Any] | None) -> str:
    if not c:
        return "NO_CONDITION"
    unknown = set(c) - {"caps", "arches", "minKernel"}
    if unknown:
        raise SystemExit(f"unknown condition keys {sorted(unknown)}: update the generator")
    parts = []
    if c.get("caps"):
        parts.append(f"caps={tuple(c['caps'])!r}")
    if c.get("arches"):
        parts.append(f"arches={tuple(c['arches'])!r}")
    if c.get("minKernel"):
        parts.append(f"min_kernel={c['minKernel']!r}")
    return f"Condition({', '.join(parts)})"


def _rule(s: dict[str, Any]) -> str:
    unknown = set(s) - {
        "names",
        "name",
        "action",
        "args",
        "errnoRet",
        "comment",
        "includes",
        "excludes",
    }
    if unknown:
        raise SystemExit(f"unknown rule keys {sorted(unknown)}: update the generator")
    names = tuple(s.get("names") or [s["name"]])
    parts = [f"names={names!r}", f"action={s['action']!r}"]
    if s.get("args"):
        args = ", ".join(
            f"Arg({a['index']}, {a['value']}, {a['op']!r}, {a.get('valueTwo', 0)})"
            for a in s["args"]
        )
        parts.append(f"args=({args},)")
    if "errnoRet" in s:
        parts.append(f"errno_ret={s['errnoRet']}")
    if s.get("includes"):
        parts.append(f"includes={_cond(s['includes'])}")
    if s.get("excludes"):
        parts.append(f"excludes={_cond(s['excludes'])}")
    return f"    Rule({', '.join(parts)}),"


def render(profile: dict[str, Any]) -> str:
    arch_map = ", ".join(
        f"({a['architecture']!r}, {tuple(a.get('subArchitectures') or ())!r})"
        for a in profile["archMap"]
    )
    lines = [
        '"""Docker\'s default seccomp profile, as data (generated: do not edit).',
        "",
        "Made by scripts/gen_seccomp.py from moby/profiles seccomp/default.json",
        f"at commit {COMMIT}. Conditions are resolved per step by",
        "ociworker.executor.seccomp.",
        '"""',
        "",
        "from ociworker.executor.seccomp import Arg, Condition, Profile, Rule",
        "",
        "RULES: tuple[Rule, ...] = (",
        *(_rule(s) for s in profile["syscalls"]),
        ")",
        "",
        "DEFAULT_PROFILE = Profile(",
        f"    default_action={profile['defaultAction']!r},",
        f"    default_errno_ret={profile.get('defaultErrnoRet', 1)},",
        f"    arch_map=({arch_map},),",
        "    rules=RULES,",
        ")",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv:
        text = Path(argv[0]).read_text(encoding="utf-8")
    else:
        with urllib.request.urlopen(SOURCE, timeout=30) as resp:
            text = resp.read().decode()
    OUT.write_text(render(json.loads(text)), encoding="utf-8")
    ruff = Path(sys.executable).parent / "ruff"
    subprocess.run([str(ruff), "format", "--quiet", str(OUT)], check=True)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
