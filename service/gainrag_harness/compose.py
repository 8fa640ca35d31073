"""The docker-compose stack as one object: a Docker daemon (started when none answers and this
is root with ``dockerd`` installed), base images from Debian packages when no registry serves
the official ones, the CPU images built, the ``cpu`` profile up and waited on until every service
is healthy, and the container-level faults of the drills (stop, start, SIGKILL, restart).

    python -m gainrag_harness.compose up      (make compose-up; `up embedded`: PROFILE=embedded)
    python -m gainrag_harness.compose down    (make compose-down)

``up`` records what it did (the images and the base-image settings, build seconds, seconds from
``up`` to healthy) in ``var/compose/up.json``; ``benchmarks.compose_drills`` reads it back.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gainrag.config import REPO_ROOT

STATE_DIR = REPO_ROOT / "var" / "compose"
UP_JSON = STATE_DIR / "up.json"
# The cpu profile's long-running services (index-cpu is a job that exits 0 first).
CPU_SERVICES = ("redis", "prometheus", "llm-cpu", "selector-cpu", "retriever-cpu", "gateway-cpu")
CPU_JOBS = ("index-cpu",)
# Images the cpu profile builds (the gateway runs on the worker image), with their Dockerfiles.
CPU_IMAGES = {
    "gainrag-worker:cpu": "docker/worker.Dockerfile",
    "gainrag-llama:cpu": "docker/llama-cpu.Dockerfile",
}
# The embedded profile: one gateway running every model in-process, built on the two images
# above (so they come first, in this order), and the same index job.
EMBEDDED_SERVICES = ("redis", "prometheus", "gateway")
EMBEDDED_IMAGES = {**CPU_IMAGES, "gainrag:cpu": "docker/gateway.Dockerfile"}
# What ``up`` brings up per profile: (long-running services, jobs, images in build order).
PROFILES: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]] = {
    "cpu": (CPU_SERVICES, CPU_JOBS, CPU_IMAGES),
    "embedded": (EMBEDDED_SERVICES, CPU_JOBS, EMBEDDED_IMAGES),
}
OFFICIAL = {
    "PYTHON_BASE_IMAGE": "python:3.11-slim",
    "REDIS_IMAGE": "redis:7.4-alpine",
    "PROMETHEUS_IMAGE": "prom/prometheus:v3.5.0",
}
DEBIAN = {
    "PYTHON_BASE_IMAGE": "gainrag-base/python:bookworm",
    "REDIS_IMAGE": "gainrag-base/redis:bookworm",
    "PROMETHEUS_IMAGE": "gainrag-base/prometheus:bookworm",
}
# A daemon for hosts where nothing manages one (containers, CI VMs): no iptables rules and no
# default bridge; user-defined networks (compose's) still work. GAINRAG_DOCKERD_ARGS overrides.
DOCKERD_ARGS = "--iptables=false --ip6tables=false --bridge=none"


def sh(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the repository root (output captured unless ``capture`` is False)."""
    return subprocess.run(
        list(cmd),
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        check=check,
        text=True,
        capture_output=capture,
        timeout=timeout,
    )


def docker_answers() -> bool:
    """Whether a Docker daemon answers."""
    try:
        return sh(["docker", "info"], check=False, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_daemon(timeout_s: float = 60.0) -> str:
    """Return how the daemon was found ("running" or "started"); start ``dockerd`` if none
    answers and this is root, else exit with what to do."""
    if docker_answers():
        return "running"
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        raise SystemExit("no Docker daemon answers; start one (deploy/README.md)")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    args = shlex.split(os.environ.get("GAINRAG_DOCKERD_ARGS", DOCKERD_ARGS))
    with (STATE_DIR / "dockerd.log").open("ab") as log:
        subprocess.Popen(
            ["dockerd", *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if docker_answers():
            return "started"
        time.sleep(1)
    raise SystemExit(f"dockerd did not answer in {timeout_s:.0f} s; see {STATE_DIR}/dockerd.log")


def image_exists(image: str) -> bool:
    """Whether ``image`` is in the local image store."""
    return sh(["docker", "image", "inspect", image], check=False).returncode == 0


def image_size(image: str) -> int:
    """The image's size in bytes (what ``docker images`` shows)."""
    return int(sh(["docker", "image", "inspect", "-f", "{{.Size}}", image]).stdout.strip())


def choose_bases() -> tuple[dict[str, str], str]:
    """The base-image settings for the builds and the stock services, and where they came from:
    the environment, the official images (present or pullable), or Debian-built ones
    (``make docker-bases``, built here when missing)."""
    if all(k in os.environ for k in OFFICIAL):
        return {k: os.environ[k] for k in OFFICIAL}, "environment"
    if all(image_exists(i) for i in OFFICIAL.values()):
        return dict(OFFICIAL), "official (local)"
    if all(image_exists(i) for i in DEBIAN.values()):
        return dict(DEBIAN), "debian (local)"
    try:
        pulled = all(
            sh(["docker", "pull", i], check=False, timeout=120).returncode == 0
            for i in OFFICIAL.values()
        )
    except subprocess.TimeoutExpired:
        pulled = False
    if pulled:
        return dict(OFFICIAL), "official (pulled)"
    sh(["scripts/docker-bases.sh", "python", "redis", "prometheus"], capture=False)
    return dict(DEBIAN), "debian (built)"


def build_images(bases: dict[str, str], images: dict[str, str] = CPU_IMAGES) -> dict[str, float]:
    """Build ``images`` in order (Docker's layer cache makes an unchanged one take seconds);
    seconds per image. Fills the wheelhouse first when it is empty and no torch index is set
    (inside a build, pip would resolve the CUDA torch)."""
    wheels = list((REPO_ROOT / "docker" / "wheelhouse").glob("*.whl"))
    if not wheels and not os.environ.get("TORCH_INDEX_URL"):
        sh(["scripts/wheelhouse.sh"], capture=False)
    seconds: dict[str, float] = {}
    for image, dockerfile in images.items():
        cmd = ["docker", "build", "--network=host", "-f", dockerfile, "-t", image]
        declared = set(re.findall(r"^ARG (\w+)", (REPO_ROOT / dockerfile).read_text(), re.M))
        if "BASE_IMAGE" in declared:  # the gateway image is built on this project's images
            cmd += ["--build-arg", f"BASE_IMAGE={bases['PYTHON_BASE_IMAGE']}"]
        for arg in ("TORCH_INDEX_URL", "LLAMA_CPUINFO_FLAGS"):
            if os.environ.get(arg) and arg in declared:
                cmd += ["--build-arg", f"{arg}={os.environ[arg]}"]
        t = time.monotonic()
        sh([*cmd, "."], capture=False)
        seconds[image] = round(time.monotonic() - t, 1)
    return seconds


# restarts during one wait that make a service count as crash-looping
CRASH_LOOP_RESTARTS = 3
# Named volumes ``down`` removes: the serving index and the metrics. Not ``gainrag-var``, where
# the train profile writes selectors and signals that took hours to make.
SERVING_VOLUMES = ("gainrag-index", "prometheus-data", "grafana-data")


def container_state(inspected: dict[str, Any]) -> str:
    """From ``docker inspect``: the health status (healthy, starting, unhealthy) of a running
    container with a healthcheck, else its status ("running", "restarting", "exited:0", ...)."""
    st = inspected["State"]
    if st["Status"] == "exited":
        return f"exited:{st['ExitCode']}"
    if st.get("Health") and st["Status"] == "running":
        return str(st["Health"]["Status"])
    return str(st["Status"])


@dataclass
class Compose:
    """``docker-compose`` (v1) or ``docker compose`` (v2) on this repository's compose file,
    with the profiles and the base-image settings of one stack."""

    profiles: tuple[str, ...] = ("cpu",)
    env: dict[str, str] = field(default_factory=dict)

    def base_cmd(self) -> list[str]:
        exe = ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]
        return [*exe, *(a for p in self.profiles for a in ("--profile", p))]

    def run(
        self, *args: str, check: bool = True, capture: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``docker-compose --profile ... <args>``."""
        return sh(
            [*self.base_cmd(), *args], env=self.env, check=check, capture=capture, timeout=timeout
        )

    def container(self, service: str) -> str:
        """The id of the service's container (also a stopped one)."""
        cid = self.run("ps", "-a", "-q", service).stdout.strip()
        if not cid:
            raise RuntimeError(f"no container for {service}")
        return cid.splitlines()[0]

    def inspect(self, service: str) -> dict[str, Any]:
        """``docker inspect`` of the service's container."""
        out = sh(["docker", "inspect", self.container(service)]).stdout
        return dict(json.loads(out)[0])

    def ip(self, service: str) -> str:
        """The container's address on the compose network (reachable from this host)."""
        nets = self.inspect(service)["NetworkSettings"]["Networks"]
        return str(next(iter(nets.values()))["IPAddress"])

    def wait_healthy(
        self, services: Sequence[str], jobs: Sequence[str] = (), timeout_s: float = 1800.0
    ) -> float:
        """Wait until every service is healthy and every job has exited 0; seconds waited.

        Fails early on an unhealthy service, a failed job, or a service that has restarted
        ``CRASH_LOOP_RESTARTS`` times during the wait (a crash loop, e.g. an instruction the
        host lacks: without this it would look like "starting" until the timeout)."""
        t0 = time.monotonic()
        first: dict[str, int] = {}
        while True:
            seen = {s: self.inspect(s) for s in (*services, *jobs)}
            states = {s: container_state(i) for s, i in seen.items()}
            restarts = {s: int(i.get("RestartCount", 0)) for s, i in seen.items()}
            for s, n in restarts.items():
                first.setdefault(s, n)
            bad = {
                s: v
                for s, v in states.items()
                if v == "unhealthy"
                or (v.startswith("exited:") and v != "exited:0")
                or restarts[s] - first[s] >= CRASH_LOOP_RESTARTS
            }
            if bad:
                raise RuntimeError(f"compose services failed: {bad}; restarts: {restarts}")
            if all(states[s] == "healthy" for s in services) and all(
                states[j] == "exited:0" for j in jobs
            ):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"not healthy after {timeout_s:.0f} s: {states}")
            time.sleep(1)

    def stop(self, service: str) -> None:
        """``docker-compose stop`` (SIGTERM: the worker drains, then exits)."""
        self.run("stop", service)

    def start(self, service: str) -> None:
        """``docker-compose start`` of a stopped service."""
        self.run("start", service)

    def restart(self, service: str) -> None:
        """``docker-compose restart``."""
        self.run("restart", service)

    def crash(self, service: str) -> None:
        """SIGKILL the container's main process from the host, as an OOM kill or a segfault
        would: the container exits 137 and its restart policy brings it back (``docker kill``
        would count as a manual stop, which ``unless-stopped`` does not undo)."""
        pid = int(self.inspect(service)["State"]["Pid"])
        if pid <= 0:
            raise RuntimeError(f"{service} is not running")
        os.kill(pid, 9)


def up(profile: str = "cpu") -> dict[str, Any]:
    """Daemon, bases, images, then the profile (``PROFILES``) up and healthy; the record in
    ``up.json``."""
    services, jobs, images = PROFILES[profile]
    t0 = time.monotonic()
    daemon = ensure_daemon()
    bases, source = choose_bases()
    builds = build_images(bases, images)
    stack = Compose((profile,), bases)
    t_up = time.monotonic()
    stack.run("up", "-d", "--no-build", capture=False)
    up_s = time.monotonic() - t_up
    waited = stack.wait_healthy(services, jobs)
    record = {
        "daemon": daemon,
        "bases": bases,
        "bases_from": source,
        "build_s": builds,
        "image_bytes": {
            i: image_size(i) for i in [*images, bases["REDIS_IMAGE"], bases["PROMETHEUS_IMAGE"]]
        },
        "up_command_s": round(up_s, 1),
        "up_to_healthy_s": round(up_s + waited, 1),
        "total_s": round(time.monotonic() - t0, 1),
        "profiles": [profile],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    UP_JSON.write_text(json.dumps(record, indent=2) + "\n")
    return record


def recorded_stack() -> tuple[Compose, dict[str, Any]]:
    """The stack ``up`` brought up, with its settings (exits when there is none)."""
    if not UP_JSON.is_file():
        raise SystemExit(f"no {UP_JSON.relative_to(REPO_ROOT)}: run `make compose-up` first")
    record = json.loads(UP_JSON.read_text())
    return Compose(tuple(record["profiles"]), dict(record["bases"])), record


def down() -> None:
    """Remove the containers and network of every serving profile (Grafana's too) and the
    serving volumes; the train profile's ``gainrag-var`` stays."""
    if not docker_answers():
        print("no Docker daemon answers: nothing to take down")
        return
    env = json.loads(UP_JSON.read_text())["bases"] if UP_JSON.is_file() else {}
    stack = Compose((*PROFILES, "grafana"), env)
    ids = stack.run("ps", "-a", "-q").stdout.split()
    inspected = json.loads(sh(["docker", "inspect", *ids]).stdout) if ids else []
    projects = {
        str(c["Config"]["Labels"].get("com.docker.compose.project", "")) for c in inspected
    } - {""}
    stack.run("down", "--remove-orphans", capture=False)
    for project in sorted(projects):
        for volume in SERVING_VOLUMES:
            sh(["docker", "volume", "rm", f"{project}_{volume}"], check=False)
    left = stack.run("ps", "-q").stdout.split()
    if left:
        raise SystemExit(f"containers left after down: {left}")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: python -m gainrag_harness.compose up [{'|'.join(PROFILES)}] | down"
    if args[:1] == ["up"] and len(args) <= 2:
        profile = args[1] if len(args) == 2 else "cpu"
        if profile not in PROFILES:
            raise SystemExit(usage)
        record = up(profile)
        print(json.dumps(record, indent=2))
        port = os.environ.get("GATEWAY_PORT", "8000")
        print(
            f"{profile} profile healthy {record['up_to_healthy_s']} s after `up`; "
            f"gateway on http://127.0.0.1:{port}"
        )
    elif args == ["down"]:
        down()
    else:
        raise SystemExit(usage)


if __name__ == "__main__":
    main()
