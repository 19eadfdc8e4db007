"""External programs started for tests, benchmarks and the local cluster.

The registry, Redis, opentracker, network namespaces and a throttling proxy.
"""
