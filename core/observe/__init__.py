"""Observation: the monitor (aggregate snapshot, change log), its terminal views and the
Prometheus export.

May import: handoff.runtime and the layers below it. Nothing above it.
"""
