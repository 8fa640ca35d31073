"""The dependency map of ``service/gainrag``, read from the source (AST; nothing is imported).

Rules (each a test; ``make lint`` runs them directly, ``python tests/test_architecture.py``):

1. No import cycles among gainrag modules, over the whole import graph: module-level imports
   and imports inside functions (lazy ones) alike. Only ``TYPE_CHECKING`` blocks do not count
   (never run). A lazy import keeps a heavy module off the import path; it does not make a cycle
   between two modules acceptable: move what both need into a module of its own.
2. The model packages (retrieval, selector, llm, training, evaluation) reach neither
   ``gainrag.api`` nor FastAPI/Starlette, through any import, lazy ones included.
3. ``pipeline.py`` names no concrete backend: its own gainrag imports are interfaces and plain
   data, and nothing it reaches imports torch, transformers, faiss, redis or httpx.
4. The workers (``gainrag.api.workers.*``) load nothing of the gateway: not the app, routes,
   state, request dependencies or schemas, nor the pipeline or the cache. What a worker loads is
   its module-level imports, its own function-level ones, the parent packages' ``__init__`` and
   the lazy imports inside the functions it imports by name (``wiring.build_cross_encoder``).
5. The gateway's route modules do not import each other (what they share, the request skeleton,
   is ``gainrag.api.answering``), and its wire models (pydantic models) live in
   ``gainrag.api.schemas`` alone.

Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first: closures include them.
A last test checks rule 4 at run time, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "service"
MODEL_PACKAGES = ("retrieval", "selector", "llm", "training", "evaluation")
WEB_FRAMEWORKS = {"fastapi", "starlette"}
HEAVY = {"torch", "transformers", "faiss", "redis", "httpx"}
# What pipeline.py may import of gainrag: interfaces, plain data and small helpers.
PIPELINE_MAY_IMPORT = {
    "gainrag.cache_interface",
    "gainrag.concurrency",
    "gainrag.config",
    "gainrag.errors",
    "gainrag.llm.interface",
    "gainrag.llm.prompts",
    "gainrag.retrieval.interface",
    "gainrag.selector.interface",
    "gainrag.selector.ranking",
    "gainrag.telemetry",
    "gainrag.textcheck",
    "gainrag.tracing",
    "gainrag.types",
}
GATEWAY = {
    "gainrag.api.admission",
    "gainrag.api.answering",
    "gainrag.api.app",
    "gainrag.api.deps",
    "gainrag.api.documents",
    "gainrag.api.playground",
    "gainrag.api.routes",
    "gainrag.api.schemas",
    "gainrag.api.state",
    "gainrag.cache",
    "gainrag.cache_interface",
    "gainrag.pipeline",
}


@dataclass(frozen=True)
class Ref:
    """One imported gainrag module (``name``: the imported attribute, if a ``from`` import)."""

    target: str
    name: str | None
    lazy: bool  # inside a function
    function: str | None  # the top-level function it is in, if any
    line: int


@dataclass
class Module:
    """What one source file imports."""

    name: str
    path: Path
    refs: list[Ref] = field(default_factory=list)
    external: set[str] = field(default_factory=set)  # top-level names, lazy ones included
    functions: set[str] = field(default_factory=set)  # top-level function names


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, module: Module, known: set[str], is_package: bool) -> None:
        self.m, self.known, self.is_package = module, known, is_package
        self.function: str | None = None  # the enclosing top-level function
        self.depth = 0  # function nesting

    def _add(self, target: str, name: str | None, line: int) -> None:
        if target == "gainrag" or target.startswith("gainrag."):
            if name is not None and f"{target}.{name}" in self.known:
                target, name = f"{target}.{name}", None  # ``from pkg import submodule``
            self.m.refs.append(Ref(target, name, self.depth > 0, self.function, line))
        else:
            self.m.external.add(target.split(".")[0])

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # annotations only: never imported at run time
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if self.depth == 0:
            self.m.functions.add(node.name)
            self.function = node.name
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1
        if self.depth == 0:
            self.function = None

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        # Methods are functions (lazy), but not top-level ones: they cannot be imported by name.
        outer = self.function
        self.generic_visit(node)
        self.function = outer

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, None, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            pkg = self.m.name.split(".")
            pkg = pkg if self.is_package else pkg[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join([*pkg, base] if base else pkg)
        for alias in node.names:
            self._add(base, alias.name, node.lineno)


@cache
def modules() -> dict[str, Module]:
    """Every module of the package, by dotted name."""
    paths = sorted((SOURCE / "gainrag").rglob("*.py"))
    known = {_module_name(p) for p in paths}
    out: dict[str, Module] = {}
    for path in paths:
        m = Module(_module_name(path), path)
        _Collector(m, known, path.name == "__init__.py").visit(
            ast.parse(path.read_text(), str(path))
        )
        out[m.name] = m
    return out


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _closure(start: str, follow: Callable[[Module, bool], Iterable[str]]) -> dict[str, str]:
    """Modules reachable from ``start`` (each with the module that imported it first)."""
    mods = modules()
    seen: dict[str, str] = {start: ""}
    todo = [start]
    while todo:
        name = todo.pop()
        m = mods.get(name)
        if m is None:
            continue
        for nxt in [*_parents(name), *follow(m, name == start)]:
            for t in [*_parents(nxt), nxt]:
                if t not in seen:
                    seen[t] = name
                    todo.append(t)
    return seen


def _path(seen: dict[str, str], end: str) -> str:
    chain = [end]
    while seen[chain[-1]]:
        chain.append(seen[chain[-1]])
    return " -> ".join(reversed(chain))


def everything(m: Module, _start: bool) -> Iterable[str]:
    """Every import, lazy or not."""
    return (r.target for r in m.refs)


def loaded(m: Module, start: bool) -> Iterable[str]:
    """What running a module loads: its module-level imports (and the start's lazy ones), plus
    the lazy imports inside each function imported by name."""
    mods = modules()
    for r in m.refs:
        if r.lazy and not start:
            continue
        yield r.target
        target = mods.get(r.target)
        if r.name is not None and target is not None and r.name in target.functions:
            yield from (x.target for x in target.refs if x.function == r.name)


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_source_is_where_expected() -> None:
    assert {"gainrag", "gainrag.pipeline", "gainrag.api"} <= modules().keys()


def test_no_import_cycles() -> None:
    mods = modules()
    # Every import counts, lazy ones included (``TYPE_CHECKING`` blocks are not collected).
    graph = {
        n: sorted({r.target for r in m.refs if r.target in mods and r.target != n})
        for n, m in mods.items()
    }
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles among gainrag modules: {cycles}"


def test_model_packages_do_not_reach_the_web_layer() -> None:
    mods = modules()
    bad: list[str] = []
    for name in sorted(mods):
        if not any(_in_package(name, f"gainrag.{p}") for p in MODEL_PACKAGES):
            continue
        seen = _closure(name, everything)
        # Where the map crosses into the web layer (not every module reached beyond it).
        bad += [
            _path(seen, t)
            for t in seen
            if _in_package(t, "gainrag.api") and not _in_package(seen[t], "gainrag.api")
        ]
        bad += [
            f"{_path(seen, t)} imports {sorted(mods[t].external & WEB_FRAMEWORKS)}"
            for t in seen
            if t in mods and mods[t].external & WEB_FRAMEWORKS and not _in_package(t, "gainrag.api")
        ]
    assert not bad, "a model package reaches the web layer:\n" + "\n".join(bad)


def test_pipeline_names_no_concrete_backend() -> None:
    mods = modules()
    pipeline = mods["gainrag.pipeline"]
    direct = {r.target for r in pipeline.refs}
    assert direct <= PIPELINE_MAY_IMPORT, (
        f"pipeline.py imports {sorted(direct - PIPELINE_MAY_IMPORT)}; build backends in wiring.py"
    )
    seen = _closure("gainrag.pipeline", everything)
    heavy = [
        f"{_path(seen, t)} imports {sorted(mods[t].external & HEAVY)}"
        for t in seen
        if t in mods and mods[t].external & HEAVY
    ]
    assert not heavy, "pipeline.py reaches a concrete backend:\n" + "\n".join(heavy)


def test_workers_load_nothing_of_the_gateway() -> None:
    mods = modules()
    workers = [n for n in mods if n.startswith("gainrag.api.workers.")]
    expected = {"gainrag.api.workers.retrieval", "gainrag.api.workers.selector"}
    assert expected <= set(workers), f"the worker apps belong in gainrag.api.workers: {expected}"
    bad: list[str] = []
    for name in sorted(workers):
        seen = _closure(name, loaded)
        bad += [_path(seen, t) for t in sorted(seen.keys() & GATEWAY)]
    assert not bad, "a worker loads gateway modules:\n" + "\n".join(bad)


def test_a_worker_process_loads_no_gateway_module() -> None:
    """The same rule at run time: what importing both workers and building one app loads."""
    code = (
        "import sys\n"
        "from gainrag.api.workers.retrieval import create_retrieval_app\n"
        "from gainrag.api.workers.selector import create_selector_app\n"
        "from gainrag.config import Settings\n"
        "create_retrieval_app(Settings()), create_selector_app(Settings())\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('gainrag'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SOURCE)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    loaded = set(out.split())
    assert "gainrag.api.workers.shared" in loaded
    assert not loaded & GATEWAY, f"a worker process loaded {sorted(loaded & GATEWAY)}"


ROUTE_MODULES = ("gainrag.api.routes", "gainrag.api.openai_compat")
WIRE_MODELS = "gainrag.api.schemas"


def _base_name(base: ast.expr) -> str:
    """``BaseModel`` for ``BaseModel``, ``pydantic.BaseModel`` and ``RootModel[int]`` alike."""
    if isinstance(base, ast.Subscript):
        base = base.value
    if isinstance(base, ast.Attribute):
        return base.attr
    return base.id if isinstance(base, ast.Name) else ""


def _classes(m: Module) -> list[ast.ClassDef]:
    return [n for n in ast.walk(ast.parse(m.path.read_text())) if isinstance(n, ast.ClassDef)]


def test_route_modules_share_no_imports_and_wire_models_live_in_schemas() -> None:
    mods = modules()
    assert {*ROUTE_MODULES, WIRE_MODELS} <= mods.keys()
    crossed = [
        f"{a} imports {b} (line {r.line})"
        for a in ROUTE_MODULES
        for r in mods[a].refs
        for b in ROUTE_MODULES
        if b != a and _in_package(r.target, b)
    ]
    assert not crossed, f"route modules import each other (share via api.answering): {crossed}"
    # Pydantic's bases, and the schemas' own models (a model may extend another).
    bases = {"BaseModel", "RootModel"} | {c.name for c in _classes(mods[WIRE_MODELS])}
    elsewhere = [
        f"{name}.{c.name}"
        for name, m in sorted(mods.items())
        if _in_package(name, "gainrag.api")
        and not _in_package(name, "gainrag.api.workers")  # the workers' are in gainrag.wire
        and not _in_package(name, WIRE_MODELS)
        for c in _classes(m)
        if any(_base_name(b) in bases for b in c.bases)
    ]
    assert not elsewhere, f"wire models outside {WIRE_MODELS}: {elsewhere}"


# The source rules (``make lint``): no imports, no models, well under a second.
RULES = (
    test_the_source_is_where_expected,
    test_no_import_cycles,
    test_model_packages_do_not_reach_the_web_layer,
    test_pipeline_names_no_concrete_backend,
    test_workers_load_nothing_of_the_gateway,
    test_route_modules_share_no_imports_and_wire_models_live_in_schemas,
)


def main() -> int:
    """Run the source rules without pytest; exit status 1 on any failure."""
    failed = 0
    for check in RULES:
        try:
            check()
        except AssertionError as exc:
            failed += 1
            print(f"FAIL {check.__name__}: {exc}", file=sys.stderr)
    print(f"dependency map: {'ok' if not failed else f'{failed} rule(s) broken'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
