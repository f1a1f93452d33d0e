"""Benchmarks behind `handoff bench`: one module per benchmark, each starting its own server.

Performance is shown here, by scripts printing figures side by side, never by timed tests.
"""
