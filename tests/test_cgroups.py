"""Step limits and accounting without a host: the cgroup reader on fake v1 and v2 trees,
the spec's resources/rlimits//dev/shm, the flag parsers, and how the figures are shown
(plain, rawjson, the daemon's protobuf) and named in errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from ociworker.api.convert import event_from_proto, event_to_proto
from ociworker.api.errors import from_detail, to_detail
from ociworker.core.build import Ulimit, parse_ram_size, step_limits
from ociworker.core.graph import ExecOp, Vertex
from ociworker.core.progress import Usage, VertexStatus
from ociworker.errors import ConfigError, ExecError
from ociworker.executor.cgroups import (
    LEAF,
    Hierarchy,
    StepCgroup,
    parse_mountinfo,
    remove_leftovers,
)
from ociworker.executor.spec import SpecLimits, SpecOptions, make_spec
from ociworker.progress_ui import PlainPrinter, solve_status

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
52 50 0:32 /docker/abc /mnt/sub rw,relatime - cgroup cgroup rw,memory
"""


def test_mountinfo_gives_every_hierarchy_and_its_controllers() -> None:
    got = parse_mountinfo(HYBRID)
    assert got == (
        Hierarchy(Path("/sys/fs/cgroup/cpu,cpuacct"), 1, frozenset({"cpu", "cpuacct"})),
        Hierarchy(Path("/sys/fs/cgroup/memory"), 1, frozenset({"memory"})),
        Hierarchy(Path("/sys/fs/cgroup/systemd"), 1, frozenset({"xattr", "name=systemd"})),
        Hierarchy(Path("/sys/fs/cgroup/unified"), 2),
    )  # the bind of a sub-cgroup (/docker/abc) is no place for ours
    pure = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
    assert parse_mountinfo(pure) == (Hierarchy(Path("/sys/fs/cgroup"), 2),)


def _v1(tmp_path: Path) -> tuple[Hierarchy, ...]:
    names = {"cpu,cpuacct": {"cpu", "cpuacct"}, "memory": {"memory"}, "pids": {"pids"}}
    names |= {"blkio": {"blkio"}, "cpuset": {"cpuset"}, "unified": set()}
    out = []
    for name, ctrls in names.items():
        (tmp_path / name).mkdir()
        version = 2 if name == "unified" else 1
        out.append(Hierarchy(tmp_path / name, version, frozenset(ctrls)))  # type: ignore[arg-type]
    return tuple(out)


def test_v1_step_cgroup_is_made_where_figures_are_and_read_from_there(tmp_path: Path) -> None:
    cg = StepCgroup("ociw-test-1", _v1(tmp_path))
    assert cg.runtime_path == f"/ociw-test-1/{LEAF}"
    cg.create()
    made = sorted(p.parent.name for p in tmp_path.glob("*/ociw-test-1"))
    # not cpuset: its parent needs cpus/mems copied in, which the runtime does
    assert made == ["blkio", "cpu,cpuacct", "memory", "pids", "unified"]
    d = {name: tmp_path / name / "ociw-test-1" for name in ("cpu,cpuacct", "memory", "blkio")}
    (d["cpu,cpuacct"] / "cpuacct.usage").write_text("3400000000\n")
    (d["memory"] / "memory.max_usage_in_bytes").write_text(f"{212 << 20}\n")
    (d["blkio"] / "blkio.throttle.io_service_bytes_recursive").write_text(
        "8:0 Read 4096\n8:0 Write 1000\n8:0 Sync 5096\n8:0 Total 5096\n"
        "8:16 Read 10\n8:16 Write 20\nTotal 5126\n"
    )
    assert cg.usage() == Usage(3.4, 212 << 20, 4106, 1020)
    leaf = tmp_path / "pids" / "ociw-test-1" / LEAF
    leaf.mkdir()
    (leaf / "pids.events").write_text("max 7\n")
    (tmp_path / "pids" / "ociw-test-1" / "pids.current").write_text("128\n")
    sample = cg.sample()
    assert (sample.pids, sample.pids_refused) == (128, 7)


def test_v2_step_cgroup_hands_controllers_down_and_reads_its_files(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    cg = StepCgroup("ociw-test-2", (Hierarchy(root, 2),))
    d = root / "ociw-test-2"
    d.mkdir()
    (d / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    cg.create()
    assert (d / "cgroup.subtree_control").read_text() == "+cpu +memory +pids +io"
    (d / "cpu.stat").write_text("usage_usec 2100000\nuser_usec 2000000\nsystem_usec 100000\n")
    (d / "io.stat").write_text("8:0 rbytes=8192 wbytes=4096 rios=2 wios=1 dbytes=0 dios=0\n")
    (d / "memory.current").write_text(f"{50 << 20}\n")
    cg.sample()
    (d / "memory.current").write_text(f"{10 << 20}\n")
    cg.sample()
    # no memory.peak (kernel < 5.19): the highest memory.current sampled
    assert cg.usage() == Usage(2.1, 50 << 20, 8192, 4096)
    (d / "memory.peak").write_text(f"{60 << 20}\n")
    assert cg.usage().peak_memory == 60 << 20
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.oom_kills() == 1


def test_leftovers_of_this_prefix_only_are_removed(tmp_path: Path) -> None:
    h = (Hierarchy(tmp_path, 2),)
    for name in ("ociw-aaaa-1", "ociw-aaaa-2/ctr", "ociw-bbbb-1", "other"):
        (tmp_path / name).mkdir(parents=True)
    assert remove_leftovers("ociw-aaaa-", h) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ociw-bbbb-1", "other"]


def test_spec_carries_limits_rlimits_and_shm_size_only_when_set() -> None:
    plain = make_spec(SpecOptions(args=("true",)))
    assert "cgroupsPath" not in plain["linux"]
    assert plain["linux"]["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}
    shm = next(m for m in plain["mounts"] if m["destination"] == "/dev/shm")
    assert "size=65536k" in shm["options"]

    lim = SpecLimits(
        cgroups_path="/ociw-x/ctr",
        memory=256 << 20,
        pids=128,
        cpus=1.5,
        shm_size=32 << 20,
        rlimits=(("RLIMIT_NOFILE", 1024, 2048), ("RLIMIT_NPROC", 100, 100)),
    )
    spec = make_spec(SpecOptions(args=("true",), nofile=4096, limits=lim))
    assert spec["linux"]["cgroupsPath"] == "/ociw-x/ctr"
    res = spec["linux"]["resources"]
    assert res["memory"] == {"limit": 268435456}
    assert res["pids"] == {"limit": 128}
    assert res["cpu"] == {"quota": 150000, "period": 100000}
    assert sorted(spec["process"]["rlimits"], key=lambda r: r["type"]) == [
        {"type": "RLIMIT_NOFILE", "hard": 2048, "soft": 1024},
        {"type": "RLIMIT_NPROC", "hard": 100, "soft": 100},
    ]
    shm = next(m for m in spec["mounts"] if m["destination"] == "/dev/shm")
    assert [o for o in shm["options"] if o.startswith("size=")] == ["size=32768k"]


@pytest.mark.parametrize(
    ("text", "want"),
    [("nofile=1024:2048", Ulimit("nofile", 1024, 2048)), ("nproc=128", Ulimit("nproc", 128, 128))],
)
def test_ulimit_as_buildx_writes_it(text: str, want: Ulimit) -> None:
    assert Ulimit.parse(text) == want
    assert want.rlimit == "RLIMIT_" + text.split("=")[0].upper()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("files=1", "NAME one of"),
        ("nofile", "NAME one of"),
        ("nofile=a", "must be integers"),
        ("nofile=-1", "must not be negative"),
        ("nofile=10:5", "soft limit 10 is above hard limit 5"),
    ],
)
def test_bad_ulimit_is_named(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error) as info:
        Ulimit.parse(text)
    assert repr(text) in str(info.value)


def test_sizes_are_binary_as_docker_reads_them() -> None:
    assert parse_ram_size("64m") == 64 * 1024 * 1024
    assert parse_ram_size("1g") == 1 << 30
    assert parse_ram_size("2GiB") == 2 << 30
    assert parse_ram_size("512k") == 512 * 1024
    assert parse_ram_size("65536") == 65536
    for bad in ("", "m", "1x", "-1m"):
        with pytest.raises(ConfigError, match="invalid size"):
            parse_ram_size(bad)


def test_step_limits_from_flags_or_config() -> None:
    assert step_limits("256m", 128, 1.5) == {
        "step_memory": 256 << 20,
        "step_pids": 128,
        "step_cpus": 1.5,
    }
    assert step_limits(None, 0, None) == {"step_pids": None}  # 0: no limit
    assert step_limits(None, None, None) == {}
    with pytest.raises(ConfigError, match="below the minimum of 6MiB"):
        step_limits("1m", None, None)
    with pytest.raises(ConfigError, match="want 0 \\(none\\) or >= 8"):
        step_limits(None, 3, None)
    with pytest.raises(ConfigError, match="above 0"):
        step_limits(None, None, 0)


def test_exec_key_is_unchanged_without_ulimits() -> None:
    # A cache built before this feature must still hit.
    assert set(ExecOp(args=("true",)).to_json()["exec"]) == {
        "args",
        "env",
        "cwd",
        "user",
        "network",
        "hostname",
        "mounts",
    }
    op = ExecOp(args=("true",), ulimits=(Ulimit("nproc", 1, 2),), shm_size=1024)
    assert op.to_json()["exec"]["ulimits"] == ["nproc=1:2"]
    assert Vertex(op, ()).digest != Vertex(ExecOp(args=("true",)), ()).digest


USAGE = Usage(cpu_seconds=3.44, peak_memory=212 << 20, read_bytes=0, written_bytes=3 << 20)


def test_plain_done_line_shows_the_figures() -> None:
    out = io.StringIO()
    p = PlainPrinter(out)
    p(VertexStatus("sha256:a", "[2/2] RUN x", started=100.0))
    p(VertexStatus("sha256:a", "[2/2] RUN x", usage=USAGE))
    p(VertexStatus("sha256:a", "[2/2] RUN x", started=100.0, completed=102.1))
    assert out.getvalue() == "\n#1 [2/2] RUN x\n#1 DONE 2.1s (cpu 3.4s, mem 212MiB, written 3MiB)\n"


def test_rawjson_usage_is_a_finished_status_of_the_step() -> None:
    ev = VertexStatus("sha256:a", "[2/2] RUN x", usage=USAGE)
    got = solve_status(ev, now=0.0)
    assert got == {
        "statuses": [
            {
                "id": "resource usage: cpu 3.4s, mem 212MiB, written 3MiB",
                "vertex": "sha256:a",
                "current": 0,
                "timestamp": "1970-01-01T00:00:00Z",
                "started": "1970-01-01T00:00:00Z",
                "completed": "1970-01-01T00:00:00Z",
            }
        ]
    }


def test_usage_crosses_the_daemon_and_json_only_when_present() -> None:
    with_usage = VertexStatus("sha256:a", "n", usage=USAGE)
    assert event_from_proto(event_to_proto(with_usage)) == with_usage
    partial = VertexStatus("sha256:a", "n", usage=Usage(cpu_seconds=1.0))
    assert event_from_proto(event_to_proto(partial)) == partial
    plain = VertexStatus("sha256:a", "n", started=1.0)
    assert event_from_proto(event_to_proto(plain)) == plain
    assert "usage" not in plain.to_json()["vertex"]
    assert Usage.from_json(json.loads(json.dumps(USAGE.to_json()))) == USAGE


def test_exec_error_names_the_limit_and_keeps_it_over_the_wire() -> None:
    err = ExecError("[2/2] RUN dd", "/bin/sh -c dd", 137, killed_by="memory limit 256MiB")
    assert str(err) == (
        "step [2/2] RUN dd: process '/bin/sh -c dd' did not complete successfully: "
        "exit code: 137: killed: memory limit 256MiB reached"
    )
    back = from_detail(to_detail(err))
    assert isinstance(back, ExecError) and str(back) == str(err)
