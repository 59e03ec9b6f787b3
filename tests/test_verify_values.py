"""``core.verify``: the verdict on each step from its cached layer and the runs
without the cache, and what the user reads. Layers are built here path by path,
so each expectation follows from what the test made differ."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from ociworker.core.verify import (
    MAX_PATHS,
    Entry,
    StepFiles,
    VerifyReport,
    check_pulled,
    classify,
    differing_paths,
    failure,
    not_checked,
)


def _file(content: str, mode: int = 0o644, uid: int = 0) -> Entry:
    return Entry("file", mode, uid, 0, len(content), f"sha-of-{content}")


def layer(diff_id: str = "sha256:aa", **paths: Entry) -> StepFiles:
    return StepFiles(diff_id=diff_id, entries={k.replace("__", "/"): v for k, v in paths.items()})


def test_same_layer_bytes_is_verified_as_identical() -> None:
    a = layer("sha256:" + "1" * 64, f=_file("hi"))
    check = classify("[2/2] RUN x", a, a, None)
    assert check.verdict == "verified"
    assert check.detail == "identical layer sha256:111111111111"


def test_times_alone_do_not_make_a_difference() -> None:
    # two runs of ``RUN echo hi > /f``: other mtimes, so other diffIDs, same entries
    cached = layer("sha256:aa", f=_file("hi"), etc=Entry("dir", 0o755))
    fresh = layer("sha256:bb", f=_file("hi"), etc=Entry("dir", 0o755))
    check = classify("[2/2] RUN echo hi > /f", cached, fresh, None)
    assert (check.verdict, check.detail) == ("verified", "same files; only timestamps differ")


def test_runs_that_disagree_make_the_step_non_deterministic_whatever_the_cache() -> None:
    cached, first, second = layer(r=_file("1")), layer(r=_file("2")), layer(r=_file("3"))
    check = classify("[3/4] RUN head -c 8 /dev/urandom > /r", cached, first, second)
    assert check.verdict == "non-deterministic"
    assert check.detail == "two runs without the cache differ from each other: /r (content)"


def test_agreeing_runs_that_differ_from_the_cache_are_a_false_hit() -> None:
    cached = layer(f=_file("damaged"), old=_file("x"))
    fresh = layer(f=_file("hi"), new=_file("y"))
    check = classify("[2/3] RUN make", cached, fresh, fresh)
    assert check.verdict == "false hit"
    assert check.detail == (
        "the cached result differs from two agreeing runs without the cache: "
        "/f (content), /new (only in the runs), /old (only in the cached result)"
    )


def test_a_step_that_ran_in_this_build_is_never_a_false_hit() -> None:
    # its "cached" result is this build's own run: runs disagree over time
    built, fresh = layer(f=_file("monday")), layer(f=_file("tuesday"))
    check = classify("[2/2] RUN date > /f", built, fresh, fresh, was_cached=False)
    assert check.verdict == "non-deterministic"
    assert "this build's run" in check.detail


def test_an_input_that_is_non_deterministic_is_named() -> None:
    a, b = layer(n=_file("8 /r")), layer(n=_file("9 /r"))
    check = classify("[4/4] RUN wc /r > /n", a, a, b, nondeterministic_inputs=["[3/4] RUN r"])
    assert check.verdict == "verified"  # the first run agreed: nothing more to say
    check = classify("[4/4] RUN wc /r > /n", a, b, a, nondeterministic_inputs=["[3/4] RUN r"])
    assert check.detail.endswith("; its input [3/4] RUN r is non-deterministic")


def test_a_differing_first_run_needs_a_second() -> None:
    with pytest.raises(ValueError):
        classify("s", layer(f=_file("a")), layer(f=_file("b")), None)


@pytest.mark.parametrize(
    ("x", "y", "what"),
    [
        (_file("a", mode=0o644), _file("a", mode=0o755), "mode 644 vs 755"),
        (_file("a", uid=0), _file("a", uid=1000), "owner 0:0 vs 1000:0"),
        (Entry("symlink", 0o777, data="/a"), Entry("symlink", 0o777, data="/b"), "link target"),
        (_file("a"), Entry("dir", 0o644), "type file vs dir"),
        (
            Entry("file", 0o644, xattrs=(("SCHILY.xattr.user.a", "1"),)),
            Entry("file", 0o644),
            "xattrs",
        ),
    ],
)
def test_each_kind_of_difference_is_named(x: Entry, y: Entry, what: str) -> None:
    assert differing_paths(layer(p=x), layer(p=y)) == [f"/p ({what})"]


def test_contents_are_never_shown_and_long_lists_are_cut() -> None:
    many_a = layer(**{f"f{i}": _file(f"secret-a-{i}") for i in range(MAX_PATHS + 3)})
    many_b = layer(**{f"f{i}": _file(f"secret-b-{i}") for i in range(MAX_PATHS + 3)})
    check = classify("s", many_a, many_b, many_b)
    assert "secret" not in check.detail
    assert check.detail.endswith(" and 3 more")
    assert check.detail.count("(content)") == MAX_PATHS


def test_results_without_a_layer_compare_by_kind() -> None:
    none = StepFiles(kind="none")
    assert classify("s", none, none, None).detail == "no layer: none both times"
    assert differing_paths(none, layer(f=_file("a"))) == ["(result kind none vs snapshot)"]


def test_report_lines_summary_warning_and_failure() -> None:
    ok = classify("[2/4] RUN a", layer(f=_file("a")), layer(f=_file("a")), None)
    nondet = classify("[3/4] RUN b", layer(r=_file("1")), layer(r=_file("2")), layer(r=_file("3")))
    stale = classify("[4/4] RUN c", layer(f=_file("x")), layer(f=_file("y")), layer(f=_file("y")))
    skipped = not_checked("[internal] load build context", "a local source")
    clean = VerifyReport((ok, nondet, skipped))
    assert clean.ok
    assert clean.lines()[-1] == (
        "verify-cache: 3 steps: 1 verified, 1 non-deterministic, 0 false hits, 1 not checked"
    )
    assert clean.lines()[0].startswith("[2/4] RUN a: verified (")
    warning = clean.warning()
    assert warning is not None and "[3/4] RUN b" in warning
    bad = VerifyReport((ok, nondet, stale))
    assert not bad.ok
    text = failure(bad)
    assert "1 false cache hit(s)" in text and "[4/4] RUN c: false hit" in text
    assert "[3/4] RUN b" not in text
    assert VerifyReport((ok,)).warning() is None


def test_pulled_layers_are_judged_against_their_blobs() -> None:
    blob = layer(etc=Entry("dir", 0o755), etc__group=_file("root:x:0:"), bin=Entry("dir", 0o755))
    # the unpacked diff leaves out a directory with its lower layer's metadata
    unpacked = layer(etc=Entry("dir", 0o755), etc__group=_file("root:x:0:"))
    ok = check_pulled("[1/2] FROM img", [("sha256:" + "a" * 64, unpacked, blob)])
    assert (ok.verdict, ok.detail) == ("verified", "the pulled layer matches its blob")
    damaged = layer(etc=Entry("dir", 0o755), etc__group=_file("root:x:0:\nintruder"))
    bad = check_pulled(
        "[1/2] FROM img",
        [("sha256:" + "b" * 64, blob, blob), ("sha256:" + "c" * 64, damaged, blob)],
    )
    assert bad.verdict == "false hit"
    assert bad.detail == (
        "the unpacked snapshot differs from the image's layer sha256:cccccccccccc: "
        "/etc/group (content)"
    )
    # a file the snapshot lacks is a difference, a directory is not
    lacking = layer(etc=Entry("dir", 0o755))
    gone = check_pulled("s", [("sha256:" + "d" * 64, lacking, blob)])
    assert gone.detail.endswith("/etc/group (only in the blob)")


def _tar(path: Path, mtime: float, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            info.mtime = mtime
            tf.addfile(info, io.BytesIO(data) if data else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, size, 0o644
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def test_read_entries_keeps_what_a_rerun_must_reproduce_and_drops_times(tmp_path: Path) -> None:
    from ociworker.verify import read_entries

    def members(content: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        link = _info("./usr/bin/sh", tarfile.LNKTYPE, linkname="./bin/busybox")
        attr = _info("x", size=1, pax_headers={"SCHILY.xattr.user.k": "v"})
        return [
            (_info("./bin/", tarfile.DIRTYPE, mode=0o755), b""),
            (_info("./bin/busybox", size=len(content), uid=7), content),
            (link, b""),
            (_info("lnk", tarfile.SYMTYPE, linkname="/bin/busybox"), b""),
            (attr, b"1"),
        ]

    a = read_entries(_tar(tmp_path / "a.tar", 1_000, members(b"elf")))
    # the same files a day later: equal entries
    assert read_entries(_tar(tmp_path / "b.tar", 90_000, members(b"elf"))) == a
    assert set(a) == {"bin", "bin/busybox", "usr/bin/sh", "lnk", "x"}
    assert a["bin/busybox"] == Entry("file", 0o644, 7, 0, 3, hashlib.sha256(b"elf").hexdigest())
    assert a["usr/bin/sh"].data == "bin/busybox"  # named as the entries are
    assert a["lnk"].data == "/bin/busybox"
    assert a["x"].xattrs == (("SCHILY.xattr.user.k", "v"),)
    # other bytes: another content digest, so a difference is found
    c = read_entries(_tar(tmp_path / "c.tar", 1_000, members(b"ELF")))
    assert differing_paths(StepFiles(entries=a), StepFiles(entries=c)) == ["/bin/busybox (content)"]
    # compressed layers (as pulled) read the same
    with open(tmp_path / "a.tar", "rb") as f:
        (tmp_path / "a.tar.gz").write_bytes(gzip.compress(f.read()))
    assert read_entries(tmp_path / "a.tar.gz") == a
