"""`python -m handoff`: the same command line as the `handoff` console script."""

from handoff.cli import run

run()
