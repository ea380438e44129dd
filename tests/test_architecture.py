"""The shape of the code, checked: import cycles, what the daemon path loads, sizes of classes and modules.

Imports are read from the source (AST), not by importing. Two graphs:

- *top-level* imports (the module body, including ``try``/``if`` blocks at the top,
  excluding ``if TYPE_CHECKING:``) run while the module itself is being imported, so a
  cycle among them can break an import: ``test_no_import_time_cycles``;
- *every* import, a function's lazy ``import`` included: a lazy import is how a cycle is
  hidden (config.py and classes.py import each other inside functions), so
  ``test_no_import_cycles`` counts them too. The one lazy import allowed to close a
  cycle is the console script's (``governor.earlysignals`` holds the signals, then imports
  the CLI, which uses it: see ALLOWED_LAZY_EDGES).

The whatif-does-not-import-structlog check counts every import, wherever it is.

Issue 13 is built by four branches merged together (core, policy, errors, lean). Some of
these tests check what the other branches deliver and fail on a branch alone:
``test_no_import_cycles`` (config <-> classes <-> rules.power through lazy imports, broken
by the policy branch),
``test_no_class_over_300_lines`` (Daemon, 752 lines, split by the core branch; NvmlBackend,
518, and SimulatedBackend, 319, in the errors branch's governor/backends),
``test_whatif_does_not_import_structlog`` (whatif/simulate.py; the core branch's observers).
They are meant to fail before the merge and pass after it; they are not xfail.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "governor"
MAX_CLASS_LINES = 300
MAX_SERVICE_LINES = 250
ALLOWED_LAZY_EDGES = {("governor.earlysignals", "governor.cli")}
"""(importer, imported) pairs a lazy import may add to the graph although they close a cycle:
the console script holds the signals first and imports the CLI only then, on purpose."""


def module_name(path: Path) -> str:
    """``governor/rules/power.py`` -> ``governor.rules.power``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the governor package by its dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: the body and its top-level blocks, not functions/classes."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _top_level(block)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            yield from _top_level(node.body)


def imported_names(module: str, path: Path, *, top_level_only: bool) -> set[str]:
    """The absolute names of the modules ``module`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    nodes = (
        _top_level(tree.body)
        if top_level_only
        else (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
    )
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        else:
            source = _absolute(module, is_package, node)
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(*, top_level_only: bool = True) -> dict[str, set[str]]:
    """governor module -> the governor modules its imports load (a submodule loads its packages);
    only the top-level imports, or every import but ALLOWED_LAZY_EDGES."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        edges: set[str] = set()
        for name in imported_names(module, path, top_level_only=top_level_only):
            parts = name.split(".")
            for end in range(2, len(parts) + 1):  # governor.a.b loads governor.a first, then governor.a.b
                prefix = ".".join(parts[:end])
                # A module's own packages are loaded before it runs: importing a sibling adds no edge to them.
                if prefix in known and prefix != module and not module.startswith(prefix + "."):
                    edges.add(prefix)
        graph[module] = edges if top_level_only else {e for e in edges if (module, e) not in ALLOWED_LAZY_EDGES}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


class TestImportGraph:
    def test_the_walker_sees_a_cycle(self) -> None:
        """The cycle finder reports a two-module cycle and a three-module one, and no false cycle."""
        graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
        assert sorted(cycles(graph)) == [["a", "b"], ["c", "d", "e"]]
        assert cycles({"a": {"b"}, "b": set()}) == []

    def test_the_graph_knows_real_edges(self) -> None:
        """The graph has the edges the source shows: the core imports the model, and importing
        governor.rules.power from outside loads the package governor.rules first."""
        graph = import_graph()
        assert "governor.model" in graph["governor.core"]
        outside = [
            m for m, edges in graph.items() if "governor.rules.power" in edges and not m.startswith("governor.rules")
        ]
        assert outside and all("governor.rules" in graph[m] for m in outside)

    def test_the_lazy_graph_sees_a_lazy_import(self) -> None:
        """Counting lazy imports adds config -> classes' function-level imports' targets the top level misses."""
        lazy, top = import_graph(top_level_only=False), import_graph()
        assert any(lazy[m] - top[m] for m in lazy)
        assert "governor.cli" not in lazy["governor.earlysignals"]  # the allowed entry-point import

    def test_no_import_time_cycles(self) -> None:
        """No cycle among governor's top-level imports (those that run while a module is imported)."""
        assert cycles(import_graph()) == []

    def test_no_import_cycles(self) -> None:
        """No cycle among all of governor's imports, lazy ones included (fails on a branch alone until
        the policy branch breaks config <-> classes <-> rules.power; see the module docstring)."""
        assert cycles(import_graph(top_level_only=False)) == []

    def test_whatif_does_not_import_structlog(self) -> None:
        """No module of governor/whatif imports structlog, at the top or in a function: the what-if
        commands read reports, not logs (the core branch's change)."""
        offenders = sorted(
            module
            for module, path in modules().items()
            if module.startswith("governor.whatif")
            and any(n.split(".")[0] == "structlog" for n in imported_names(module, path, top_level_only=False))
        )
        assert offenders == []


class TestTests:
    def test_no_test_module_imports_another(self) -> None:
        """Test modules share helpers through tests/support.py, tests/builders.py and conftest.py,
        never by importing another test module."""
        offenders = []
        for path in sorted((REPO / "tests").rglob("test_*.py")):
            for name in imported_names("tests." + path.stem, path, top_level_only=False):
                if any(part.startswith("test_") for part in name.split(".")[1:2]) and name.startswith("tests."):
                    offenders.append(f"{path.relative_to(REPO)} imports {name}")
        assert offenders == []


class TestSizes:
    def test_no_class_over_300_lines(self) -> None:
        """No class in governor/ spans more than 300 lines (fails on a branch alone until the core and
        errors branches split Daemon and NvmlBackend; see the module docstring)."""
        long = []
        for module, path in modules().items():
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_CLASS_LINES:
                        long.append(f"{module}.{node.name}: {lines} lines")
        assert long == []

    def test_service_module_is_short(self) -> None:
        """governor/service.py, where the core branch puts the schedule and the signals, is under 250 lines."""
        path = PACKAGE / "service.py"
        if not path.exists():
            pytest.skip("no governor/service.py on this branch (the core branch adds it)")
        assert len(path.read_text().splitlines()) < MAX_SERVICE_LINES


DAEMON_IMPORTS = r"""
import json, os, signal, sys, threading, time
config, out = sys.argv[1], sys.argv[2]

def dump():
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(t.name == "metrics-http" for t in threading.enumerate()):
        time.sleep(0.05)
    time.sleep(0.5)  # the first ticks have run
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=dump, daemon=True).start()
from governor.cli import main
sys.exit(main(["run", "--dry-run", "--wait-for-driver", "--listen", "127.0.0.1:0", "--log-level", "error",
               "--config", config]))
"""

NEVER_ON_THE_DAEMON_PATH = ("governor.whatif", "governor.sim", "matplotlib", "hypothesis", "numpy")
ONLY_WHEN_CONFIGURED = ("regex", "yaml", "bcrypt", "jeepney")
"""Loaded by a daemon only when its config uses them: cmdline/cgroup patterns, a web-config file
(PyYAML, bcrypt hashes), a stop-unit class (D-Bus). The default config needs none (issue 13's RSS)."""


def daemon_modules(tmp_path: Path, config_text: str) -> list[str]:
    """The modules a dry-run NVML daemon with ``config_text`` has loaded once its first ticks ran."""
    config = tmp_path / "g.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nruntime_dir = ""\n' + config_text)
    config.chmod(0o644)
    out = tmp_path / "modules.json"
    subprocess.run(
        [sys.executable, "-c", DAEMON_IMPORTS, str(config), str(out)],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    loaded: list[str] = json.loads(out.read_text())
    return loaded


class TestDaemonImports:
    def test_nvml_daemon_loads_no_whatif_sim_or_plot(self, tmp_path: Path) -> None:
        """`run` with the NVML backend (dry run; with or without a driver here) loads nothing of governor.whatif,
        governor.sim, matplotlib, hypothesis or numpy, and does load the service, core, metrics and NVML modules."""
        loaded = daemon_modules(tmp_path, "")
        assert {
            "governor.service",
            "governor.core",
            "governor.metrics",
            "governor.httpserver",
            "governor.backends.nvml",
        } <= set(loaded)
        unwanted = [m for m in loaded if any(m == p or m.startswith(p + ".") for p in NEVER_ON_THE_DAEMON_PATH)]
        assert unwanted == []

    def test_default_daemon_loads_no_library_its_config_does_not_use(self, tmp_path: Path) -> None:
        """With the default config the daemon loads neither regex, PyYAML, bcrypt nor jeepney."""
        loaded = set(daemon_modules(tmp_path, ""))
        assert "governor.service" in loaded
        assert [m for m in ONLY_WHEN_CONFIGURED if m in loaded] == []

    def test_a_cmdline_pattern_loads_regex(self, tmp_path: Path) -> None:
        """The check above can fail: a class with a cmdline pattern makes the daemon load regex."""
        loaded = set(
            daemon_modules(tmp_path, '[[class]]\nname = "w"\nbudget = "1 GiB"\n[class.match]\ncmdline = "worker"\n')
        )
        assert "regex" in loaded

    def test_the_simulated_backend_loads_the_simulator(self) -> None:
        """The check above can fail: importing the simulated backend does load governor.sim."""
        code = "import sys, governor.backends.simulated; print('governor.sim' in sys.modules)"
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
        assert result.stdout.strip() == "True"
