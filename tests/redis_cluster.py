"""A private 3-master Redis Cluster on free loopback ports, for the tests of cluster mode.

The starter is the benchmark's (:mod:`bench.redis_cluster`), written once; it fixes no
environment on import. Never the shared Redis.
"""

from __future__ import annotations

from bench.redis_cluster import PrivateRedisCluster, redis_cluster

__all__ = ["RedisCluster3", "redis_cluster"]

#: What the tests call the cluster they start (three masters unless told otherwise).
RedisCluster3 = PrivateRedisCluster
