"""Cross-system and deployment benchmarks, run from a checkout (./scripts/bench*).

Not installed: the wheel holds only `handoff`. These import handoff and harness/.
"""
