"""The package's layout: every module imports, no import cycles, and the packaged configs load
by name and by path from any working directory."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import dgpo_jax
import retrieval_service

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"dgpo_jax": dgpo_jax, "retrieval_service": retrieval_service}


def _modules() -> list[str]:
    names = []
    for top, pkg in PACKAGES.items():
        names.append(top)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{top}."):
            names.append(info.name)
    return sorted(names)


def _source(name: str) -> Path:
    base = REPO / name.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _module_level_imports(name: str, known: set[str]) -> set[str]:
    """The project modules ``name`` imports when it is imported: module-level import statements
    only (function bodies run later), ``from pkg import sub`` counted as importing ``pkg.sub``,
    and every parent package of an imported module counted too."""
    tree = ast.parse(_source(name).read_text())
    is_pkg = _source(name).name == "__init__.py"
    out = set()

    def add(mod: str) -> None:
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) in known:
                out.add(".".join(parts[:i]))

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                add(mod)
                for a in node.names:
                    add(f"{mod}.{a.name}")
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                visit(getattr(node, "body", []))
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    out.discard(name)
    return out


def test_every_module_imports():
    failures = []
    for name in _modules():
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - collect every failure, report them together
            failures.append(f"{name}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def test_no_import_cycles():
    """A cycle among module-level imports (a package importing its own submodule does not
    count: that is how a package re-exports) fails with the cycle spelled out."""
    known = set(_modules())
    graph = {}
    for name in known:
        deps = _module_level_imports(name, known)
        # A package's __init__ importing its submodules, and a submodule importing its parent
        # package (which Python has initialised first), are not cycles.
        graph[name] = {d for d in deps if not d.startswith(name + ".")}
    for name in graph:
        graph[name] = {
            d
            for d in graph[name]
            if not (name.startswith(d + ".") and _source(d).name == "__init__.py")
        }
    state, stack, cycles = {}, [], []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                dfs(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_detector_finds_a_cycle(tmp_path, monkeypatch):
    """The detector itself: two modules importing each other at module level are a cycle."""
    global REPO
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyc import b\n")
    (pkg / "b.py").write_text("import cyc.a\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    known = {"cyc", "cyc.a", "cyc.b"}
    assert "cyc.b" in _module_level_imports("cyc.a", known)
    assert "cyc.a" in _module_level_imports("cyc.b", known)


def test_every_benchmark_imports():
    """Each script in benchmarks/ imports (in one child process, as its own ``__main__`` would
    not be run): a benchmark importing a name the package renamed fails here, not on the
    first person to run it."""
    scripts = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))
    code = (
        "import importlib, sys\n"
        f"sys.path[:0] = [{str(REPO / 'benchmarks')!r}, {str(REPO)!r}]\n"
        "failed = []\n"
        f"for name in {scripts!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'benchmarks/{name}.py: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert not out.stdout.strip(), out.stdout
