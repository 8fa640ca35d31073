"""Selector training recipes: each module here defines ``RECIPE`` and is ``gainrag train <name>``.

To add one, subclass ``base.Recipe`` (and ``base.TrainArgs`` to change defaults) in a new module;
docs/training.md walks through it.
"""

from __future__ import annotations

from gainrag.training.recipes.base import Recipe
from gainrag.training.registry import discover


def recipes() -> dict[str, Recipe]:
    """Every recipe, by name."""
    return {name: r for name, r in discover(__name__, "RECIPE").items() if isinstance(r, Recipe)}


def listing() -> str:
    """One line per recipe (``gainrag train``, ``gainrag train recipes``)."""
    rows = [
        f"  {r.name:<12} {r.summary}" + (f" (alias: {', '.join(r.aliases)})" if r.aliases else "")
        for r in recipes().values()
    ]
    return "recipes (gainrag train <recipe> --help):\n" + "\n".join(rows)
