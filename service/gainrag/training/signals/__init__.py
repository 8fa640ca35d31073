"""Signal jobs: label training data for the selector (gain now; each job is one module here).

A module becomes ``gainrag train <name>`` by defining ``JOB``, an instance of
``gainrag.training.registry.Job``; import torch and models inside ``run`` only.
"""

from __future__ import annotations

from gainrag.training.registry import Job, discover


def jobs() -> dict[str, Job]:
    """Every signal job, by name."""
    return discover(__name__, "JOB")
