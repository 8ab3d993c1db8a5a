"""gpool's tags, environment variables and artifact names are spelled once, in gpool/names.py:
no other module of gpool or its Hydra plugins holds one of them as a string literal."""

from __future__ import annotations

import ast
from pathlib import Path

from gpool import PROJECT_ROOT, names

#: Names in gpool/names.py that elsewhere are other things spelled alike: a checkpoint's
#: "model" entry, Hydra's own "hydra" node, the `class_maps` pool position, gpool.bench's
#: positional "overrides" argument, the resolver `${gpool.threads:}` of trainer.threads, and
#: the "training" and "validation" panels of the curve figures.
HOMONYMS = {"model", "hydra", "class_maps", "overrides", "gpool.threads", "training", "validation"}


def literals(path: Path) -> set[str]:
    """The string constants of a module (its docstrings included: a name in prose is no
    spelling of it, but one in code is)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    }


def test_every_tag_variable_and_artifact_name_is_spelled_in_names_alone() -> None:
    defined = {
        value: key
        for key, value in vars(names).items()
        if key.isupper() and isinstance(value, str) and value not in HOMONYMS
    }
    modules = [
        *(PROJECT_ROOT / "gpool").rglob("*.py"),
        *(PROJECT_ROOT / "hydra_plugins").rglob("*.py"),
    ]
    stray = {
        f"{path.relative_to(PROJECT_ROOT)}: {value!r} (names.{defined[value]})"
        for path in modules
        if path.name != "names.py"
        for value in literals(path) & set(defined)
    }
    assert not stray, sorted(stray)
    assert len(defined) > 30  # the test reads names.py's constants, not nothing
