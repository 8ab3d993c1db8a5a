"""`python -m gpool.compare` (gpool.compare.cli)."""

from gpool.compare.cli import run

run()
