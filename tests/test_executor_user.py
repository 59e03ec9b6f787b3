"""User resolution: runc's GetExecUser rules, on passwd/group texts and on a rootfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ociworker.errors import UserError
from ociworker.fs.users import ExecUser, exec_user, parse_group, parse_passwd, resolve_user

PASSWD = """\
# a comment line
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
builder:x:1234:2345:Builder:/home/builder:/bin/sh
broken line without fields
dup:x:1234:9:first wins:/dup:/bin/sh
nohome:x:77:77::
"""

GROUP = """\
root:x:0:
wheel:x:10:root,builder
main:x:2345:
staff:x:3000:other,builder
"""


def test_empty_spec_is_root_with_its_home_and_groups() -> None:
    assert exec_user("", PASSWD, GROUP) == ExecUser(0, 0, (0, 10), "/root")


def test_empty_spec_without_files_is_root_at_slash() -> None:
    assert exec_user("", None, None) == ExecUser(0, 0, (0,), "/")


def test_name_takes_uid_gid_home_and_membership_groups() -> None:
    assert exec_user("builder", PASSWD, GROUP) == ExecUser(
        1234, 2345, (2345, 10, 3000), "/home/builder"
    )


def test_numeric_uid_uses_first_matching_entry() -> None:
    # 1234 is builder's uid (first entry); "dup" with the same uid is ignored.
    assert exec_user("1234", PASSWD, GROUP) == ExecUser(
        1234, 2345, (2345, 10, 3000), "/home/builder"
    )


def test_numeric_uid_needs_no_entry() -> None:
    assert exec_user("1000", PASSWD, GROUP) == ExecUser(1000, 0, (0,), "/")
    assert exec_user("1000:1000", PASSWD, GROUP) == ExecUser(1000, 1000, (1000,), "/")
    assert exec_user("1000:1000", None, None) == ExecUser(1000, 1000, (1000,), "/")


def test_explicit_group_replaces_gid_and_drops_supplementary_groups() -> None:
    assert exec_user("builder:staff", PASSWD, GROUP) == ExecUser(
        1234, 3000, (3000,), "/home/builder"
    )
    assert exec_user("builder:10", PASSWD, GROUP) == ExecUser(1234, 10, (10,), "/home/builder")
    assert exec_user("1000:staff", PASSWD, GROUP) == ExecUser(1000, 3000, (3000,), "/")


def test_empty_home_defaults_to_slash() -> None:
    assert exec_user("nohome", PASSWD, GROUP).home == "/"


def test_missing_name_is_a_user_error() -> None:
    with pytest.raises(UserError) as info:
        exec_user("nobody", PASSWD, GROUP)
    assert str(info.value) == "unable to find user nobody: no matching entries in passwd file"


def test_missing_name_without_passwd_file() -> None:
    with pytest.raises(UserError, match="unable to find user builder: no matching entries"):
        exec_user("builder", None, GROUP)


def test_missing_group_name_is_a_user_error() -> None:
    with pytest.raises(UserError) as info:
        exec_user("builder:nogroup", PASSWD, GROUP)
    assert str(info.value) == "unable to find group nogroup: no matching entries in group file"


def test_out_of_range_ids() -> None:
    with pytest.raises(UserError, match="out of range"):
        exec_user("4294967296", PASSWD, GROUP)
    with pytest.raises(UserError, match="out of range"):
        exec_user("0:4294967296", PASSWD, GROUP)


def test_non_ascii_digits_are_names() -> None:
    # "١٢" is Arabic-Indic digits: str.isdigit says yes, runc's Atoi says no.
    with pytest.raises(UserError, match="unable to find user"):
        exec_user("\u0661\u0662", PASSWD, GROUP)


def test_parsers_skip_malformed_lines() -> None:
    names = [u.name for u in parse_passwd(PASSWD)]
    assert names == ["root", "daemon", "builder", "dup", "nohome"]
    groups = parse_group("bad\nok:x:5:a,,b\nnum:x:NaN:\n")
    assert [(g.name, g.gid, g.members) for g in groups] == [("ok", 5, ("a", "b"))]


def test_resolve_reads_the_rootfs_files(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(PASSWD)
    (tmp_path / "etc" / "group").write_text(GROUP)
    assert resolve_user(tmp_path, "builder").uid == 1234


def test_resolve_never_follows_a_symlink_out_of_the_rootfs(tmp_path: Path) -> None:
    # An absolute symlink must resolve inside the rootfs, not on the host: the
    # host has a passwd with root in it, the rootfs's target does not exist.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").symlink_to("/etc/passwd-does-not-exist-here")
    (tmp_path / "etc" / "passwd-does-not-exist-here").write_text("only:x:5:6::/o:/bin/sh\n")
    assert resolve_user(tmp_path, "only") == ExecUser(5, 6, (6,), "/o")
    (tmp_path / "etc" / "group").symlink_to("../../../../../../etc/group-x")
    # "../" is clamped at the rootfs, so this is the rootfs's /etc/group-x: absent.
    assert resolve_user(tmp_path, "only:7") == ExecUser(5, 7, (7,), "/o")
    with pytest.raises(UserError, match="unable to find group wheel"):
        resolve_user(tmp_path, "only:wheel")
    with pytest.raises(UserError, match="unable to find user root"):
        resolve_user(tmp_path, "root")


def test_unreadable_files_count_as_absent(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").symlink_to("passwd")  # a loop
    (tmp_path / "etc" / "group").mkdir()
    assert resolve_user(tmp_path, "5:6") == ExecUser(5, 6, (6,), "/")
    with pytest.raises(UserError, match="unable to find user x"):
        resolve_user(tmp_path, "x")
