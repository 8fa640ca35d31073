"""What ``gainrag train`` is made of: jobs found by module, and their arguments from dataclasses.

A job is one ``gainrag train <name>`` command: a signal job in ``training/signals/`` (module
attribute ``JOB``) or a selector recipe in ``training/recipes/`` (``RECIPE``). Adding one is adding
a module; the CLI discovers it. Job modules are imported to build the CLI's parser, so they import
torch, transformers and the models only inside ``run``.

Arguments come from dataclass fields (one ``--flag`` per field, the field's default is the flag's
default), so each default is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import types
import typing
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from gainrag.config import Settings

T = TypeVar("T")


class Job(ABC):
    """One ``gainrag train`` command."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, listed by ``gainrag train``
    aliases: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this job's flags to its subparser."""

    @abstractmethod
    def run(self, settings: Settings, args: argparse.Namespace) -> None:
        """Run the job with parsed arguments (prints a one-line result)."""


def discover(package: str, attr: str) -> dict[str, Job]:
    """Every module of ``package`` that defines ``attr`` (a Job), by job name."""
    pkg = importlib.import_module(package)
    found: dict[str, Job] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        job = getattr(importlib.import_module(f"{package}.{info.name}"), attr, None)
        if isinstance(job, Job):
            found[job.name] = job
    return found


def _flag_type(hint: Any) -> tuple[Any, dict[str, Any]]:
    """The argparse type (and extra kwargs) of a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # X | None: optional flag of type X
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _flag_type(inner)
    if origin is list:
        (item,) = typing.get_args(hint)
        return item, {"nargs": "+"}
    if origin is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), {"choices": choices}
    if hint is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if hint in (int, float, str, Path):
        return hint, {}
    raise TypeError(f"no command-line flag for a field of type {hint!r}")


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, helps: dict[str, str] | None = None
) -> None:
    """One ``--field-name`` per field of dataclass ``cls``; a field without a default is required.

    A field's help is its ``metadata["help"]``, else ``helps[name]`` (so a subclass that only
    changes a default need not repeat the help).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        type_, extra = _flag_type(hints[f.name])
        kwargs: dict[str, Any] = {"help": f.metadata.get("help") or (helps or {}).get(f.name)}
        if type_ is not None:
            kwargs["type"] = type_
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            factory: Any = f.default_factory
            kwargs["default"] = f.default if f.default is not dataclasses.MISSING else factory()
            if kwargs["help"] and kwargs["default"] is not None:
                kwargs["help"] += " (default: %(default)s)"
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs, **extra)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """An instance of dataclass ``cls`` from the parsed flags of its fields."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    return cls(**{f.name: getattr(args, f.name) for f in fields if f.init})
