"""The fleet's ranking (rendezvous hashing): stable, balanced, and a removed or
added worker moves only the keys whose first choice it is (about 1/N)."""

from __future__ import annotations

import itertools
import subprocess

import pytest

from ociworker.core.fleet import rank
from ociworker.errors import ConfigError

NODES = [f"unix:///run/w{i}.sock" for i in range(5)]
KEYS = [f"/home/dev/project-{i}" for i in range(2000)]


def test_the_weight_is_sha256_of_addr_nul_key() -> None:
    # docs/scale-out.md's rule, worked out by coreutils' sha256sum rather than hashlib
    key = "/srv/app"

    def weight(node: str) -> int:
        out = subprocess.run(
            ["sha256sum"], input=node.encode() + b"\0" + key.encode(), capture_output=True
        )
        return int(out.stdout.split()[0][:16], 16)

    assert rank(key, NODES) == sorted(NODES, key=weight, reverse=True)


def test_the_order_of_the_list_and_repeats_do_not_matter() -> None:
    for key in KEYS[:50]:
        want = rank(key, NODES)
        for perm in itertools.islice(itertools.permutations(NODES), 0, 120, 7):
            assert rank(key, [*perm, perm[0]]) == want
        assert sorted(want) == sorted(NODES)


def test_keys_spread_evenly() -> None:
    firsts = [rank(k, NODES[:3])[0] for k in KEYS]
    for node in NODES[:3]:
        # 2000 keys over 3 workers: 667 each expected, sd ~21; 5 sd either side
        assert 560 < firsts.count(node) < 770, (node, firsts.count(node))


def test_removing_a_worker_moves_only_its_keys() -> None:
    before = {k: rank(k, NODES) for k in KEYS}
    gone = NODES[2]
    after = {k: rank(k, [n for n in NODES if n != gone]) for k in KEYS}
    moved = {k for k in KEYS if after[k][0] != before[k][0]}
    # exactly the keys whose first choice was the removed worker, each to its second
    assert moved == {k for k in KEYS if before[k][0] == gone}
    assert all(after[k][0] == before[k][1] for k in moved)
    # and the failover order of every key is the old one without it
    assert all(after[k] == [n for n in before[k] if n != gone] for k in KEYS)
    # about 1/N of them: 400 of 2000 expected, sd ~18
    assert 310 < len(moved) < 490, len(moved)


def test_adding_a_worker_moves_only_keys_to_it() -> None:
    before = {k: rank(k, NODES[:4])[0] for k in KEYS}
    after = {k: rank(k, NODES)[0] for k in KEYS}
    moved = [k for k in KEYS if after[k] != before[k]]
    assert all(after[k] == NODES[4] for k in moved)
    assert 310 < len(moved) < 490, len(moved)  # 1/5 of 2000


def test_an_empty_fleet_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least one worker"):
        rank("k", [])
