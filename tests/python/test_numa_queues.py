"""Per-node queues for a model whose instances span NUMA nodes (issue #4, item 3).

Only the plan and the groups handed to the native side are checked on the 2-socket fixture:
starting its workers would pin them to CPUs this machine may lack. Serving is checked on this
machine, whatever its nodes.
"""

from __future__ import annotations

from pathlib import Path

import apportion as ap
from apportion.runtime import Runtime

SERVER = str(Path(__file__).resolve().parents[1] / "fixtures" / "topology" / "server_2s128t")


def test_instances_on_two_nodes_get_one_queue_per_node() -> None:
    rt = ap.Runtime(topology_root=SERVER)
    try:
        # Node 0 holds CPUs 0-31 and 64-95, node 1 CPUs 32-63 and 96-127.
        rt.add_model("spread", model=lambda x: x, instances=2, cores="0-3,32-35",
                     isolation="exclusive")
        rt.add_model("local", model=lambda x: x, instances=2, cores="4-7", isolation="exclusive")
        p = rt.plan()
        assert [i.memory_nodes for i in p["spread"].instances] == [(0,), (1,)]
        assert Runtime._lane_groups(p["spread"]) == [0, 1]
        assert rt._model_stats("spread").lane_groups == 2
        # One node: one queue, as without NUMA.
        assert {i.memory_nodes for i in p["local"].instances} == {(0,)}
        assert Runtime._lane_groups(p["local"]) == []
        assert rt._model_stats("local").lane_groups == 1
        assert rt.stats()["spread"].stolen == 0
    finally:
        rt.close(drain=False)


def test_groups_follow_the_first_memory_node_in_node_order() -> None:
    from apportion.placement import InstancePlan, ModelPlan

    def plan_of(*nodes: tuple[int, ...]) -> ModelPlan:
        instances = tuple(InstancePlan(index=i, cpus=(i,), threads=1, memory_nodes=n)
                          for i, n in enumerate(nodes))
        return ModelPlan(name="m", isolation="exclusive", memory_policy="bind", cpus=(),
                         reserved=(), cores=len(nodes), locality="machine", order=0,
                         instances=instances)

    assert Runtime._lane_groups(plan_of((3,), (1,), (3,), (1, 3))) == [1, 0, 1, 0]
    assert Runtime._lane_groups(plan_of((0, 1), (0, 1))) == []
    assert Runtime._lane_groups(plan_of((), ())) == []


def test_replicas_on_one_node_share_one_queue_and_serve() -> None:
    with ap.Runtime() as rt:
        rt.add_model("echo", model=lambda x: x * 2, instances=2)
        rt.start()
        nodes = {i.memory_nodes[:1] for i in rt.plan()["echo"].instances}
        assert rt._model_stats("echo").lane_groups == max(len(nodes), 1)
        futs = [rt.submit("echo", i) for i in range(200)]
        assert [f.result(timeout=30) for f in futs] == [2 * i for i in range(200)]
        s = rt.stats()["echo"]
        assert s.completed == 200
        if len(nodes) <= 1:
            assert s.stolen == 0
