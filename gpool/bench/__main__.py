"""`python -m gpool.bench` (gpool.bench.cli)."""

from gpool.bench.cli import main

main()
