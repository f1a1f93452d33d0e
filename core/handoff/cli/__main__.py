from handoff.cli import run

run()
