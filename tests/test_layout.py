"""The house's layout as docs/development.md draws it: no module over 400 lines, no circle
among gpool's modules, the upper rooms (the commands, the sweep's callback and sweepers)
imported by no lower one, and Hydra's plugin modules, which every command imports, free of
torch, MLflow and the rest (a fresh interpreter's -X importtime), and a job's own modules
free of matplotlib until a run draws."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gpool import PROJECT_ROOT

SOURCES = sorted(
    [*(PROJECT_ROOT / "gpool").rglob("*.py"), *(PROJECT_ROOT / "hydra_plugins").rglob("*.py")]
)
#: What imports a command's own rooms: the commands, the sweep's callback and sweepers.
UPPER = {
    "gpool.compare": {"gpool.compare", "gpool.decide", "gpool.sweep", "gpool.bench"},
    "gpool.training": {"gpool.train", "gpool.fusing", "gpool.bench"},
    "gpool.train": set(),
}
#: What Hydra's plugin scan must not import: it runs for every command, `--help` included.
HEAVY = ("torch", "torchvision", "mlflow", "matplotlib", "optuna", "scipy", "statsmodels")


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The gpool modules a module imports anywhere in it (type hints and lazy imports too:
    a newcomer sees an arrow either way)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    known = {module_name(p) for p in SOURCES}
    return {name for name in found if name in known and name != "gpool"}


GRAPH = {module_name(p): imports(p) - {module_name(p)} for p in SOURCES}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_no_module_is_over_400_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 400


def test_gpools_modules_import_each_other_without_a_circle() -> None:
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, " -> ".join([*path[path.index(name) :], name])
        if name in done:
            return
        for child in sorted(GRAPH.get(name, ())):
            visit(child, [*path, name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])


def test_no_lower_room_imports_a_command_or_a_sweep() -> None:
    def room(name: str) -> str:
        return next((top for top in UPPER if name == top or name.startswith(f"{top}.")), name)

    arrows = {
        f"{importer} -> {imported}"
        for importer, targets in GRAPH.items()
        for imported in targets
        if room(imported) in UPPER
        and room(importer) != room(imported)
        and not any(importer == u or importer.startswith(f"{u}.") for u in UPPER[room(imported)])
    }
    assert not arrows, sorted(arrows)


def test_hydras_plugin_scan_imports_nothing_heavy() -> None:
    plugins = [module_name(p) for p in SOURCES if module_name(p).startswith("hydra_plugins.")]
    code = "import " + ", ".join(plugins)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "hydra_plugins.gpool_fused.fused_launcher" in imported
    assert not {m for m in imported if m.split(".")[0] in HEAVY}


def test_a_job_imports_no_drawing_until_it_draws() -> None:
    """The modules that train and log a run leave matplotlib (and scipy.stats, which the
    figures' intervals use) to the moment a run draws: every joblib or submitit worker
    imports them first, and a lean run (mlflow.log_figures=false) never draws."""
    code = "import sys, gpool.training; print(' '.join(sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    imported = set(proc.stdout.split())
    assert "gpool.artifacts" in imported and "torch" in imported
    assert not {m for m in imported if m.split(".")[0] == "matplotlib" or m == "scipy.stats"}
