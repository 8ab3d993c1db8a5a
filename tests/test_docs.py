"""Every gpool command in the README's and docs/' code blocks works as written: training
commands compose (each value of each swept key, as Hydra would run it), compare and bench
commands parse. Placeholders (`<run id>`) are left out; the long runs themselves are not
rerun here, the commands' parts are each tested elsewhere."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from gpool import PROJECT_ROOT
from gpool.bench import cli as bench
from gpool.compare import cli as compare
from gpool.config import compose_config

PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]


def commands(page: Path) -> list[str]:
    """The `python -m gpool.*` lines of a page's fenced code blocks, continuations joined
    and comments dropped."""
    found, fenced, pending = [], False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            continue
        text = pending + line.strip()
        pending = text[:-1] + " " if text.endswith("\\") else ""
        if pending:
            continue
        text = re.sub(r"\s+#.*$", "", text)
        if text.startswith("python -m gpool.") and "<" not in text:
            found.append(text)
    return found


EVERY = [(page.name, command) for page in PAGES for command in commands(page)]


def test_the_pages_hold_the_commands_users_copy() -> None:
    names = {name for name, _ in EVERY}
    assert {"README.md", "configuration.md", "comparing.md", "cluster.md"} <= names
    assert len(EVERY) > 30


def jobs(overrides: list[str]) -> list[list[str]]:
    """Override lists that together try every value of every swept key once."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    first = [o.input_line if not o.is_sweep_override() else None for o in parsed]
    swept = {
        i: list(o.sweep_string_iterator()) for i, o in enumerate(parsed) if o.is_sweep_override()
    }
    base = [
        text if text is not None else f"{parsed[i].get_key_element()}={swept[i][0]}"
        for i, text in enumerate(first)
    ]
    runs = [base]
    for i, values in swept.items():
        for value in values[1:]:
            runs.append([*base[:i], f"{parsed[i].get_key_element()}={value}", *base[i + 1 :]])
    return runs


@pytest.mark.parametrize(("page", "command"), EVERY)
def test_a_documented_command_works_as_written(page: str, command: str) -> None:
    module, *argv = shlex.split(command)[2:]
    if module == "gpool.train":
        overrides = [a for a in argv if not a.startswith("-") and a != "job"]
        for job in jobs(overrides):
            compose_config(*job, hydra=True)
    elif module == "gpool.compare":
        compare.arguments(argv)
    elif module == "gpool.bench":
        bench.arguments(argv)
    else:
        pytest.fail(f"{page}: no check for {module}")
