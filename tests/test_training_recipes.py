"""The recipe registry, the CLI built from it, and the plans as the one copy of the commands."""

from __future__ import annotations

import shlex

import pytest
import yaml

from gainrag.cli import build_parser, main
from gainrag.config import REPO_ROOT
from gainrag.errors import ConfigurationError
from gainrag.training import plans
from gainrag.training.recipes import recipes
from gainrag.training.recipes.base import TrainArgs
from gainrag.training.recipes.contrastive import ContrastiveArgs
from gainrag.training.signals import jobs


def test_registry_finds_every_recipe_and_job() -> None:
    assert list(recipes()) == ["contrastive", "distill", "dro", "radio"]
    assert list(jobs()) == [
        "gain-shards",
        "gain-signals",
        "merge-signals",
        "rationales",
        "selector-data",
    ]
    assert {r.loss for r in recipes().values()} == {"infonce", "kl", "weighted-plackett-luce"}


@pytest.mark.parametrize("argv", [["train"], ["train", "recipes"]])
def test_train_lists_the_recipes_one_line_each(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["contrastive", "distill", "dro", "radio"]


def test_defaults_come_from_the_recipe_dataclasses() -> None:
    p = build_parser()
    distill = p.parse_args(["train", "distill", "--groups", "g", "--out", "o"])
    contrastive = p.parse_args(["train", "contrastive", "--questions", "q", "--out", "o"])
    assert (distill.lr, distill.epochs) == (TrainArgs.lr, TrainArgs.epochs)
    assert (contrastive.lr, contrastive.epochs) == (ContrastiveArgs.lr, ContrastiveArgs.epochs)
    assert contrastive.lr != distill.lr and contrastive.max_length == TrainArgs.max_length
    # the earlier command names still work
    assert p.parse_args(["train", "selector", "--groups", "g", "--out", "o"]).job.name == "distill"
    with pytest.raises(SystemExit):
        p.parse_args(["train", "distill", "--out", "o"])  # --groups is required


@pytest.mark.parametrize("name", plans.names())
def test_every_plan_step_is_a_valid_command(name: str) -> None:
    plan = plans.load(name)
    assert plan.steps
    p = build_parser()
    for step in plan.steps:
        for argv in step.commands():
            p.parse_args(argv)  # exits on a flag the CLI does not know


def test_plan_prints_a_shell_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "plan", "shipped", "--step", "gain-signals"]) == 0
    out = capsys.readouterr().out
    assert "# 2. gain-signals (2 processes in parallel)" in out
    commands = [c for c in out.replace("\\\n", " ").splitlines() if c.startswith("GAINRAG_")]
    assert [shlex.split(c)[-2:] for c in commands] == [["0/2", "&"], ["1/2", "&"]]
    assert out.rstrip().endswith("wait")
    assert main(["train", "plan", "shipped", "--step", "nope"]) == 2
    assert "no step" in capsys.readouterr().err


def test_plan_run_stops_on_a_failing_step() -> None:
    plans.run([plans.Step("list", ["train", "recipes"])])
    with pytest.raises(ConfigurationError, match="failed"):
        plans.run([plans.Step("bad", ["train", "plan", "nope"], shards=2)])


def test_docs_show_the_current_shipped_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "plan", "shipped"]) == 0
    assert capsys.readouterr().out.strip() in (REPO_ROOT / "docs/training.md").read_text()


def test_commands_are_not_copied_but_referenced() -> None:
    # The plan files are the one copy; these name a plan and its steps instead.
    for path in [
        "Makefile",
        "README.md",
        "docker-compose.yml",
        "data/train/README.md",
        "models/selector/gainrag-minilm-l6/README.md",
        "models/selector/relevance-minilm-l6/README.md",
    ]:
        text = (REPO_ROOT / path).read_text()
        assert "train plan" in text or '"plan"' in text, path
        for copied in ("--limit 300 --seed 1", "--limit 250 --k 10", "--group-size 11"):
            assert copied not in text, f"{path} copies a plan's command ({copied})"
    assert "gainrag train plan shipped --run" in (REPO_ROOT / "Makefile").read_text()


def test_compose_train_jobs_are_steps_of_the_reference_plan() -> None:
    spec = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    steps = {s.name for s in plans.load("reference").steps}
    jobs_ = {k: v for k, v in spec["services"].items() if k.startswith("train-")}
    assert len(jobs_) == len(steps)
    for svc in jobs_.values():
        cmd = svc["command"]
        assert cmd[:4] == ["train", "plan", "reference", "--run"] and cmd[4] == "--step"
        assert cmd[5] in steps
