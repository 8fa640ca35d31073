"""Deployment files are valid: compose (both profiles) and the Dockerfiles it names."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from gainrag.config import REPO_ROOT

COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose not installed (scripts/system-deps.sh)")
@pytest.mark.parametrize("profile", [None, "train"])
def test_compose_config_is_valid(profile: str | None) -> None:
    cmd = [str(COMPOSE)] + (["--profile", profile] if profile else []) + ["config"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    if profile == "train":
        assert {
            "train-index",
            "train-relevance",
            "train-gain-signals",
            "train-selector-data",
            "train-selector",
        } <= set(services)
        dep = services["train-selector"]["depends_on"]
        assert dep["train-selector-data"]["condition"] == "service_completed_successfully"
    else:
        assert "gateway" in services and "profiles" not in services["gateway"]
        # docker-compose v1 lists profiled services too; they must only run under `train`
        assert all(s["profiles"] == ["train"] for n, s in services.items() if n != "gateway")


def test_dockerfiles_named_by_compose_exist() -> None:
    spec = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    files = {s["build"]["dockerfile"] for s in spec["services"].values() if "build" in s}
    assert files == {"docker/gateway.Dockerfile", "docker/trainer.Dockerfile"}
    for f in files:
        text = (REPO_ROOT / f).read_text()
        assert "torch==2.13.0" in text and "constraints.txt" in text
