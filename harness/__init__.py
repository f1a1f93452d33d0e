"""Real-process helpers shared by tests/ and benchmarks/: handoff processes, free ports,
waiting on a condition, local Cluster and Sentinel topologies, the fault proxy."""
