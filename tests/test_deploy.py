"""deploy/ checked offline (no Docker daemon, no cluster here): every Kubernetes manifest schema-checked
(kubernetes-validate, strict), the container arguments parsed by the real `splitprune serve` parser, the
probe, metrics and rendezvous settings consistent with them, and the Dockerfile's pinned CPU torch."""
import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import tomllib
import yaml

from splitprune.cli import build_parser
from splitprune.flags import flag_values
from splitprune.server.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = "1.30.0"  # the oldest version the manifests target (pod-index label: 1.28; gRPC probes: 1.27)
SERVICE = "splitprune.v1.SplitPrune"


def documents() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def one(kind: str, component: str) -> dict:
    found = [d for d in documents() if d["kind"] == kind and d["metadata"]["labels"]["app.kubernetes.io/component"]
             == component]
    assert len(found) == 1, (kind, component)
    return found[0]


def serve_config(argv: list[str]) -> ServeConfig:
    """The settings `splitprune serve ARGV` runs with, as the real CLI parses and checks them (nothing is started)."""
    parsed, unknown = build_parser("serve").parse_known_args(argv)
    assert not unknown, f"arguments `splitprune serve` does not take: {unknown}"
    return ServeConfig(**flag_values(parsed, ServeConfig))


def serve_args(workload: dict):
    """The serve container and its settings as the real CLI parses them (nothing is started)."""
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    args = list(container["args"])
    assert args[0] == "serve"
    return container, serve_config(args)


def ports(container: dict) -> dict:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_every_manifest_passes_the_kubernetes_schema():
    docs = documents()
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Service", "Deployment"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    broken = json.loads(json.dumps(one("Deployment", "inference")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo the check must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


@pytest.mark.parametrize("kind,component", [("StatefulSet", "training"), ("Deployment", "inference")])
def test_container_args_parse_and_probes_and_scraping_use_their_ports(kind, component):
    workload = one(kind, component)
    container, args = serve_args(workload)
    host, port = args.listen.rsplit(":", 1)
    assert host == "0.0.0.0"  # the kubelet probes the pod's IP, not its loopback
    assert ports(container)["grpc"] == int(port) and ports(container)["metrics"] == int(args.metrics)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in container:
            assert container[probe]["grpc"]["port"] == int(port), probe
            assert container[probe]["grpc"].get("service", SERVICE) == SERVICE, probe
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports(container)["metrics"]
    assert env(container)["SPLITPRUNE_TOKEN"]["secretKeyRef"]["name"] == "splitprune-token"
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests)
    assert args.threads == int(limits["cpu"])
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_training_replicas_rendezvous_through_the_headless_service():
    sts, svc = one("StatefulSet", "training"), one("Service", "training")
    container, args = serve_args(sts)
    assert "--distributed" in container["args"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate"  # the others re-form while one pod is replaced
    shared = one("PersistentVolumeClaim", "training")  # the clients' checkpoints: any replica resumes any client
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in sts["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims["checkpoints"] == shared["metadata"]["name"]
    assert mounts["checkpoints"] == f"{args.checkpoint}/checkpoints"
    variables = env(container)
    assert variables["RANK"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert int(variables["WORLD_SIZE"]) == sts["spec"]["replicas"] and variables["LOCAL_RANK"] == "0"
    assert variables["MASTER_ADDR"] == f"{sts['metadata']['name']}-0.{svc['metadata']['name']}"
    service_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert int(variables["MASTER_PORT"]) == ports(container)["rendezvous"] == service_ports["rendezvous"]["port"]
    assert service_ports["grpc"]["targetPort"] == "grpc"
    assert variables["SPLITPRUNE_TIER_SECRET"]["secretKeyRef"]["name"] == "splitprune-tier"  # never a literal
    policy = one("NetworkPolicy", "training")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    open_rule, peers_rule = policy["spec"]["ingress"]
    assert {p["port"] for p in open_rule["ports"]} == {"grpc", "metrics"} and "from" not in open_rule
    (peers,) = peers_rule["from"]
    assert peers["podSelector"]["matchLabels"].items() <= labels.items() and "ports" not in peers_rule
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == args.checkpoint


def test_inference_serves_a_read_only_model_behind_its_service():
    deployment, svc = one("Deployment", "inference"), one("Service", "inference")
    container, args = serve_args(deployment)
    assert args.model and args.checkpoint is None and args.max_models == len(args.model)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for model in args.model:
        (mount,) = [m for path, m in mounts.items() if model.startswith(path + "/")]
        assert mount.get("readOnly") is True
    assert svc["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["grpc", "sessions"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (sessions,) = [p for p in svc["spec"]["ports"] if p["name"] == "sessions"]
    assert sessions["port"] == ports["sessions"] == args.session_port  # Describe announces the Service's port
    autoscaler = [d for d in documents() if d["kind"] == "HorizontalPodAutoscaler"]
    assert [a["spec"]["scaleTargetRef"]["name"] for a in autoscaler] == [deployment["metadata"]["name"]]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it


def test_dockerfile_pins_the_cpu_torch_and_runs_splitprune_unprivileged():
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")]
    assert instructions[:2] == ["ARG BASE=python:3.11-slim", "FROM ${BASE}"]
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_pin,) = [d for d in pinned if d.startswith("torch")]
    (torch_run,) = [i for i in instructions if i.startswith("RUN") and "torch==" in i]
    assert f" {torch_pin}" in torch_run and "--index-url https://download.pytorch.org/whl/cpu" in torch_run
    assert any(i.startswith("RUN pip install .") for i in instructions)
    (user,) = [i.split()[1] for i in instructions if i.startswith("USER")]
    assert user.split(":")[0] not in ("0", "root")
    (entrypoint,) = [i for i in instructions if i.startswith("ENTRYPOINT")]
    assert json.loads(entrypoint.split(None, 1)[1]) == ["splitprune"]
    (cmd,) = [i for i in instructions if i.startswith("CMD")]
    default = serve_config(json.loads(cmd.split(None, 1)[1]))
    (expose,) = [i for i in instructions if i.startswith("EXPOSE")]
    assert {int(default.listen.rsplit(":", 1)[1]), int(default.metrics)} == set(map(int, expose.split()[1:]))
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)
