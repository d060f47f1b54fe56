"""deploy/: the Kubernetes manifests against the Kubernetes schemas (offline, kubernetes-validate
--strict), the facts they must agree on, and the Triton arguments on a real Triton.

No cluster, container engine or GPU is available here: nothing in deploy/ was applied or built.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pe_rank_export.shm import backend_config_args, plan

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
HIDDEN = 4096  # the manifests are sized for a 7B LLM (Mistral-7B / Llama-2-7B hidden size)
TAG = "24.12"  # the floor NGC tag (README, "Deploying on NGC Triton")


def validator() -> str:
    found = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    if not Path(found).exists():
        pytest.fail("kubernetes-validate is not installed: pip install '.[test]'")
    return found


def objects() -> dict[tuple[str, str], dict]:
    out = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(version):
    assert len(MANIFESTS) >= 10
    proc = subprocess.run([validator(), "--strict", "--quiet", "-k", version, *map(str, MANIFESTS)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_strict_validation_refuses_a_misspelt_field(tmp_path):
    """The check above bites: an unknown property (strict) fails it."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S / "server-deployment.yaml").read_text().replace("readinessProbe:", "readinesProbe:"))
    proc = subprocess.run([validator(), "--strict", "--quiet", str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "readinesProbe" in proc.stdout + proc.stderr


def test_kustomization_lists_every_manifest_of_the_folder():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert kustomization["namespace"] == "pe-rank"
    assert {i["name"] for i in kustomization["images"]} == {"pe-rank-triton", "pe-rank-server"}
    assert next(i for i in kustomization["images"] if i["name"] == "pe-rank-triton")["newTag"] == TAG


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _flag(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))


def test_triton_deployment_serves_the_repository_on_a_gpu_with_probes_and_shm():
    objs = objects()
    triton = objs[("Deployment", "pe-rank-triton")]
    container, pod = _container(triton), triton["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = container["args"]
    assert args[0] == "tritonserver" and _flag(args, "--model-repository") == "/models"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"]
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "pe-rank-model-repository"
    assert mounts["dshm"]["mountPath"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    # /dev/shm holds what the Python backend needs at hidden 4096, and the backend is told its sizes
    size = volumes["dshm"]["emptyDir"]["sizeLimit"]
    assert size.endswith("Mi") and int(size[:-2]) >= plan(HIDDEN).total_mib
    for arg in backend_config_args(plan(HIDDEN)):
        assert arg in args
    probes = {k: container[k]["httpGet"]["path"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                      "livenessProbe": "/v2/health/live"}


def test_the_server_finds_every_triton_through_the_headless_service():
    objs = objects()
    service = objs[("Service", "pe-rank-triton")]
    triton = objs[("Deployment", "pe-rank-triton")]
    assert service["spec"]["clusterIP"] == "None"
    labels = triton["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    server_args = _container(objs[("Deployment", "pe-rank-server")])["args"]
    assert _flag(server_args, "--triton-url") == f"dns:///pe-rank-triton.pe-rank.svc.cluster.local:{grpc_port}"


def test_server_is_ready_on_grpc_health_and_drains_before_it_is_killed():
    objs = objects()
    server = objs[("Deployment", "pe-rank-server")]
    container, pod = _container(server), server["spec"]["template"]["spec"]
    args = container["args"]
    assert container["readinessProbe"]["grpc"]["port"] == int(_flag(args, "--port"))
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace, request_time = float(_flag(args, "--grace")), float(_flag(args, "--max-request-time"))
    assert grace > request_time  # a request admitted just before SIGTERM can still finish
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace
    assert _flag(args, "--api-key-file").startswith("/etc/pe-rank/api-keys/")
    secret = objs[("Secret", "pe-rank-api-keys")]
    key_file = _flag(args, "--api-key-file").rsplit("/", 1)[1]
    assert key_file in secret["stringData"]
    # the placeholder holds no key, so the server refuses to start until real keys are put in
    assert all(not line.strip() or line.strip().startswith("#") for line in secret["stringData"][key_file].splitlines())
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    services = {name: objs[("Service", f"pe-rank-{name}")] for name in ("grpc", "http", "metrics")}
    for name, service in services.items():
        assert service["spec"]["ports"][0]["targetPort"] == name and name in ports
    assert ports == {"grpc": int(_flag(args, "--port")), "http": int(_flag(args, "--http-port")),
                     "metrics": int(_flag(args, "--metrics-port"))}


def test_only_the_server_reaches_triton_and_disruptions_and_scaling_are_bounded():
    objs = objects()
    policy = objs[("NetworkPolicy", "pe-rank-triton")]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "pe-rank-triton"}
    grpc_rule = next(r for r in policy["spec"]["ingress"] if any(p["port"] == 8001 for p in r["ports"]))
    assert grpc_rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pe-rank-server"}}}]
    assert not any(p["port"] in (8000, 8001) for r in policy["spec"]["ingress"] if r is not grpc_rule
                   for p in r["ports"])
    for name in ("pe-rank-triton", "pe-rank-server"):
        assert objs[("PodDisruptionBudget", name)]["spec"]["maxUnavailable"] == 1
    hpa = objs[("HorizontalPodAutoscaler", "pe-rank-triton")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "pe-rank-triton"
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} == {"avg_time_queue_us", "pe_llm_live_windows"}


def test_dockerfiles_build_on_the_floor_tag_with_the_projects_extras():
    triton = (DEPLOY / "triton.Dockerfile").read_text()
    assert f"ARG TRITON_TAG={TAG}\n" in triton and "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3" in triton
    assert "pip install -e '.[triton,export]'" in triton and "check_runtime_match" in triton
    server = (DEPLOY / "server.Dockerfile").read_text()
    assert "pip install '.[server]'" in server and 'find_spec("torch")' in server
    readme = (ROOT / "README.md").read_text()
    assert f"nvcr.io/nvidia/tritonserver:{TAG}-py3" in readme and "--shm-size" in readme


@pytest.mark.triton
def test_the_manifests_triton_arguments_start_a_real_triton(exported):
    """Every tritonserver flag of the Deployment (the repository path aside) is accepted by Triton 2.51."""
    from pe_rank.service.embedded_triton import TritonServer

    args = _container(objects()[("Deployment", "pe-rank-triton")])["args"]
    flags = [a for a in args[1:] if not a.startswith("--model-repository=")]
    server = TritonServer(exported("tiny-a", "torch"),
                          extra_args=[*flags, "--model-control-mode=explicit", "--load-model=pe_tokenizer"])
    server.start()
    try:
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode().split("\0")
        for flag in flags:
            assert flag in cmdline
    finally:
        server.stop()
