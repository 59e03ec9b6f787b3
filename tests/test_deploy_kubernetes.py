"""deploy/kubernetes, without a cluster: every object is valid against Kubernetes'
OpenAPI schema (kubernetes-validate, strict: unknown fields fail), the ConfigMap's
TOML is a config the daemon loads, the container's command line and probes parse
with the real parsers, and each per-pod Service selects exactly one pod."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ociworker.api.activation import parser as activation_parser
from ociworker.api.daemon import load_config
from ociworker.cli import make_parser, serve_config
from ociworker.version import __version__

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
VARIANTS = ("privileged.yaml", "rootless.yaml")
FILES = (*VARIANTS, "registry-cache.yaml")
POD_NAME = "statefulset.kubernetes.io/pod-name"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def one(name: str, kind: str, obj: str | None = None) -> dict[str, Any]:
    found = [d for d in docs(name) if d["kind"] == kind and obj in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{name}: {len(found)} {kind} {obj or ''}"
    return found[0]


def worker(name: str) -> dict[str, Any]:
    containers = one(name, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["worker"]
    return containers[0]  # type: ignore[no-any-return]


def mounts(name: str) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in worker(name)["volumeMounts"]}


def command(name: str) -> tuple[argparse.Namespace, list[str]]:
    """(the activator's arguments, the ociworker command line it runs)."""
    cmd = worker(name)["command"]
    assert cmd[1:3] == ["-m", "ociworker.api.activation"]
    launcher = activation_parser().parse_args(cmd[3:])
    rest = launcher.command[1:] if launcher.command[:1] == ["--"] else launcher.command
    return launcher, rest


@pytest.mark.parametrize("name", FILES)
def test_every_object_is_valid_kubernetes(name: str) -> None:
    version = kubernetes_validate.latest_version()
    objects = docs(name)
    assert objects
    for obj in objects:
        # strict: a misspelt or misplaced field is an error, not silently dropped
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_catches_a_misplaced_field() -> None:
    # the test above relies on strict validation; check it fails where it should
    obj = one("privileged.yaml", "StatefulSet")
    obj["spec"]["template"]["spec"]["containers"][0]["privilege"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", VARIANTS)
def test_config_map_is_a_daemon_config_on_the_state_volume(name: str, tmp_path: Path) -> None:
    toml = one(name, "ConfigMap", "ociworker-config")["data"]["ociworkerd.toml"]
    path = tmp_path / "ociworkerd.toml"
    path.write_text(toml)
    cfg = load_config(path, {})  # the daemon's own reader: unknown keys are refused
    sts = one(name, "StatefulSet")
    claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    # the state dir is the persistent volume's mount, not the container's overlay root
    assert claims == ["state"] and str(cfg.root) == mounts(name)["state"]
    # the registry cache: plain HTTP to the cache registry's Service, port included
    svc = one("registry-cache.yaml", "Service", "ociworker-cache")
    assert cfg.insecure_registries == (f"ociworker-cache:{svc['spec']['ports'][0]['port']}",)
    assert cfg.gc.enabled and len(cfg.gc.policies) == 2
    # the TLS files are the Secret's keys, where the Secret is mounted
    certs = mounts(name)["certs"]
    assert {cfg.tlscacert, cfg.tlscert, cfg.tlskey} == {
        f"{certs}/ca.pem",
        f"{certs}/cert.pem",
        f"{certs}/key.pem",
    }


def test_both_variants_share_config_and_services() -> None:
    a, b = (docs(n) for n in VARIANTS)
    same = [d for d in a if d["kind"] != "StatefulSet"]
    assert same == [d for d in b if d["kind"] != "StatefulSet"]
    assert worker(VARIANTS[0])["command"] == worker(VARIANTS[1])["command"]


@pytest.mark.parametrize("name", VARIANTS)
def test_command_line_parses_and_serves_the_listened_sockets(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher, argv = command(name)
    assert argv[0] == "ociworker"
    args = make_parser().parse_args(argv[1:])
    assert args.command == "serve"
    # the config file the pod mounts, loaded as the daemon loads it
    toml = one(name, "ConfigMap", "ociworker-config")["data"]["ociworkerd.toml"]
    assert args.config == Path(mounts(name)["config"])
    (tmp_path / "ociworkerd.toml").write_text(toml)
    args.config = tmp_path / "ociworkerd.toml"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert serve_config(args).addr == "fd://"
    # the activator listens on the container port and on the probes' unix socket,
    # in a mounted volume
    port = worker(name)["ports"][0]["containerPort"]
    assert sorted(launcher.listen) == sorted([f"0.0.0.0:{port}", "/run/ociworker/ociworker.sock"])
    assert mounts(name)["run"] == "/run/ociworker"


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
def test_probes_ask_the_daemon_on_its_unix_socket(name: str, probe: str) -> None:
    argv = worker(name)[probe]["exec"]["command"]
    assert argv[0] == "ociworker"
    launcher, _ = command(name)
    unix = next(a for a in launcher.listen if a.startswith("/"))
    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv[1] not in sub.choices:
        pytest.skip(f"`ociworker {argv[1]}` is not in this checkout's CLI yet")
    args = parser.parse_args(argv[1:])
    assert args.addr == [f"unix://{unix}"]


@pytest.mark.parametrize("name", VARIANTS)
def test_each_per_pod_service_selects_exactly_one_pod(name: str) -> None:
    sts = one(name, "StatefulSet")
    base = sts["metadata"]["name"]
    pods = {f"{base}-{i}" for i in range(sts["spec"]["replicas"])}
    labels = sts["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in worker(name)["ports"]}
    per_pod: dict[str, str] = {}
    for svc in (d for d in docs(name) if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names
        if POD_NAME in selector:
            # the controller puts exactly this one label value on exactly one pod
            assert selector == {POD_NAME: selector[POD_NAME]}
            assert selector[POD_NAME] in pods, f"{svc['metadata']['name']} selects no pod"
            per_pod[svc["metadata"]["name"]] = selector[POD_NAME]
        else:
            # the headless Service the StatefulSet names
            assert svc["metadata"]["name"] == sts["spec"]["serviceName"]
            assert svc["spec"]["clusterIP"] == "None"
            assert selector.items() <= labels.items()
    assert sorted(per_pod.values()) == sorted(pods)  # one Service per pod, none shared
    assert all(svc == pod for svc, pod in per_pod.items())  # named after its pod


@pytest.mark.parametrize("name", VARIANTS)
def test_image_is_this_version(name: str) -> None:
    assert worker(name)["image"] == f"ociworker:{__version__}"


def test_rootless_variant_runs_unprivileged() -> None:
    pod = one("rootless.yaml", "StatefulSet")["spec"]["template"]["spec"]
    ctx = worker("rootless.yaml")["securityContext"]
    assert "privileged" not in ctx and ctx["runAsUser"] != 0 and ctx["runAsNonRoot"]
    assert ctx["seccompProfile"]["type"] == ctx["appArmorProfile"]["type"] == "Unconfined"
    assert pod["hostUsers"] is False and ctx["procMount"] == "Unmasked"
    assert worker("privileged.yaml")["securityContext"] == {"privileged": True}
