"""The engine's own benchmarks on the user's server: the pool manager and the queue
protocol. The cross-system comparison lives in the checkout's benchmarks/ folder.

May import: handoff.client and the layers below it. Nothing above it.
"""
