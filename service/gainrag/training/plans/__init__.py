"""Plans: the exact training commands, defined once in ``plans/<name>.toml``.

``gainrag train plan [NAME] [--step S ...]`` prints a plan's commands as a shell script;
``--run`` runs them (each step in a subprocess with its environment; a sharded step runs its
shards in parallel). The Makefile's ``train`` target, docker-compose's ``train`` profile, the
README, docs/training.md and the model cards refer to a plan instead of copying its commands.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gainrag.errors import ConfigurationError

PLANS_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Step:
    """One command of a plan: ``gainrag`` arguments, environment, shards run in parallel."""

    name: str
    args: list[str]
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)
    shards: int = 1

    def commands(self) -> list[list[str]]:
        """The argv (after ``gainrag``) of each process of this step."""
        if self.shards == 1:
            return [self.args]
        return [[*self.args, "--shard", f"{i}/{self.shards}"] for i in range(self.shards)]


@dataclass(frozen=True)
class Plan:
    """A named sequence of steps."""

    name: str
    description: str
    steps: list[Step]

    def select(self, names: list[str] | None) -> list[Step]:
        """The steps named (all when None), in plan order."""
        if not names:
            return self.steps
        unknown = set(names) - {s.name for s in self.steps}
        if unknown:
            known = ", ".join(s.name for s in self.steps)
            raise ConfigurationError(f"plan {self.name} has no step {sorted(unknown)} ({known})")
        return [s for s in self.steps if s.name in names]


def names() -> list[str]:
    """The plans shipped with the package."""
    return sorted(p.stem for p in PLANS_DIR.glob("*.toml"))


def load(name: str) -> Plan:
    """A plan by name."""
    path = PLANS_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigurationError(f"no plan {name!r} (plans: {', '.join(names())})")
    raw = tomllib.loads(path.read_text())
    common = raw.get("env", {})  # every step's, under the step's own
    steps = [Step(**{**s, "env": {**common, **s.get("env", {})}}) for s in raw["steps"]]
    return Plan(name, raw["description"], steps)


def _shell(argv: list[str], env: dict[str, str], width: int = 96) -> str:
    """``gainrag ...`` as one shell command, wrapped between options at ``width``."""
    head = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), "gainrag"])
    chunks: list[str] = []
    for a in argv:  # an option and its values stay together
        if a.startswith("--") or not chunks:
            chunks.append(shlex.quote(a))
        else:
            chunks[-1] += " " + shlex.quote(a)
    lines = [head]
    for c in chunks:
        if len(lines[-1]) + 1 + len(c) > width - 2:
            lines.append("   ")
        lines[-1] += " " + c
    return " \\\n".join(lines)


def script(plan: Plan, steps: list[Step]) -> str:
    """The steps as a shell script (what ``gainrag train plan`` prints)."""
    out = [f"# plan {plan.name}: {plan.description}"]
    for step in steps:
        n = plan.steps.index(step) + 1  # the plan's numbering, also when printing one step
        shards = f" ({step.shards} processes in parallel)" if step.shards > 1 else ""
        title = f"{n}. {step.name}{shards}" + (f": {step.note}" if step.note else "")
        out += ["", *textwrap.wrap(title, 96, initial_indent="# ", subsequent_indent="#    ")]
        if step.shards == 1:
            out.append(_shell(step.args, step.env))
        else:
            out += [_shell(c, step.env) + " &" for c in step.commands()] + ["wait"]
    return "\n".join(out)


def run(steps: list[Step]) -> None:
    """Run the steps in order; a failing process stops the plan."""
    for step in steps:
        env = {**os.environ, **step.env}
        procs = [
            subprocess.Popen([sys.executable, "-m", "gainrag.cli", *c], env=env)
            for c in step.commands()
        ]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise ConfigurationError(f"plan step {step.name} failed (exit codes {codes})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gainrag train plan``."""
    parser.add_argument("plan", nargs="?", default="shipped", help=f"one of {', '.join(names())}")
    parser.add_argument("--step", action="append", help="only this step (repeatable)")
    parser.add_argument("--run", action="store_true", help="run the commands instead of printing")


def main(args: argparse.Namespace) -> None:
    """``gainrag train plan``."""
    plan = load(args.plan)
    steps = plan.select(args.step)
    if args.run:
        run(steps)
    else:
        print(script(plan, steps))
