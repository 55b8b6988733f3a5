"""apportion past one machine, on Ray: a cluster plan, one apportion runtime per node, routing.

``import apportion`` never imports this package (nor Ray); ``import apportion.ray`` imports the
planner only, which is pure. :class:`Cluster` and the Serve deployment import Ray when used.

- :func:`plan` / :func:`replace_lost`: which nodes serve each model's replicas (pure).
- :class:`Cluster`: one actor per used node runs an :class:`apportion.Runtime` with that node's
  share of the plan; ``submit``/``call``/``infer`` route requests to a node holding the model.
- :mod:`apportion.ray.serve`: a Ray Serve deployment hosting several models under apportion
  quotas in one replica.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .plan import ClusterPlacementError, ClusterPlan, Node, NodePlan, Replan, Replica, plan, replace_lost

__all__ = ["CPU_SET_LABEL", "Cluster", "ClusterFuture", "ClusterPlacementError", "ClusterPlan", "ClusterStats",
           "ModelCounts", "Node", "NodePlan", "Replan", "Replica", "plan", "ray_nodes", "replace_lost"]

_LAZY = {"CPU_SET_LABEL": "cluster", "Cluster": "cluster", "ClusterFuture": "cluster", "ClusterStats": "cluster",
         "ModelCounts": "cluster", "ray_nodes": "cluster"}

if TYPE_CHECKING:  # what __getattr__ gives, as type checkers see it (Ray imported only when used)
    from .cluster import CPU_SET_LABEL as CPU_SET_LABEL
    from .cluster import Cluster as Cluster
    from .cluster import ClusterFuture as ClusterFuture
    from .cluster import ClusterStats as ClusterStats
    from .cluster import ModelCounts as ModelCounts
    from .cluster import ray_nodes as ray_nodes


def __getattr__(name: str) -> Any:
    # The Ray-backed names import Ray on first use, never with the package.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
