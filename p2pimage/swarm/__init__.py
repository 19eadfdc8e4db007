"""The swarm: pure policies (picker, choker, rate limits) and the trio engine.

The engine drives peer sessions with the same policies the simulator runs.
"""
