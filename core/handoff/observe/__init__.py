"""Observation: the monitor (aggregate snapshot, change log), its terminal views, the
Prometheus export and the dashboard (web/, imported only by `handoff monitor --web`).

May import: handoff.runtime and the layers below it. Nothing above it.
"""
