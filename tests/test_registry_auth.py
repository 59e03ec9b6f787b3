from __future__ import annotations

from ociworker.registry.auth import Challenge, parse_www_authenticate


def test_parse_bearer_challenge_with_commas_in_scope() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="reg.example",'
        'scope="repository:a/b:pull,push"'
    )
    [ch] = parse_www_authenticate(header)
    assert ch.scheme == "bearer"
    assert ch.get("realm") == "https://auth.example/token"
    assert ch.get("service") == "reg.example"
    assert ch.get("scope") == "repository:a/b:pull,push"
    assert ch.get("missing") is None


def test_parse_several_challenges_and_escapes() -> None:
    header = 'Basic realm="Registry \\"x\\"", Bearer realm=https://t/, error=insufficient_scope'
    chs = parse_www_authenticate(header)
    assert [c.scheme for c in chs] == ["basic", "bearer"]
    assert chs[0].get("realm") == 'Registry "x"'
    assert chs[1] == Challenge("bearer", (("realm", "https://t/"), ("error", "insufficient_scope")))
