"""
The consensus subsystem: the only writer of the leadership registry.

Variants live in their own modules (``single_node``, later ``etcd``) and are
chosen by the ``consensus`` plugin slot; this package re-exports them.
"""

from piccolod.consensus.single_node import CONTROL_PLANE, SingleNodeConsensus

__all__ = ["CONTROL_PLANE", "SingleNodeConsensus"]
