"""apportion.ray.plan / replace_lost: pure planning of replicas onto described nodes (no Ray)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import apportion as ap
from apportion.config import ModelConfig
from apportion.ray import ClusterPlacementError, Node, plan, replace_lost
from apportion.tune import CostModel


def spec(name: str, cores: int | str | None = 1, **kw: object) -> ap.ModelSpec:
    iso = kw.pop("isolation", "exclusive" if cores is not None else "shared")
    return ap.ModelSpec(name, factory="apportion.examples.sleepers:fast", cores=cores,
                        isolation=iso, **kw)  # type: ignore[arg-type]


NODES = [Node("a", 4, "0-3"), Node("b", 2, "0-1"), Node("c", 8)]


def test_replicas_go_to_distinct_nodes_and_fit() -> None:
    p = plan([spec("big", 4), spec("small", 1)], NODES, replicas=2)
    assert len(set(p.nodes_of("big"))) == 2 and len(set(p.nodes_of("small"))) == 2
    for n in p.nodes:
        assert n.used <= n.node.cpus and n.free == n.node.cpus - n.used


def test_best_fit_packs_models_together() -> None:
    # Two 2-core models fill node "b" and half of "a" rather than spreading to "c".
    p = plan([spec("x", 2), spec("y", 2), spec("z", 1)], [Node("a", 4), Node("b", 2), Node("c", 8)])
    assert p.nodes_of("x") == ("b",) and p.nodes_of("y") == ("a",) and p.nodes_of("z") == ("a",)
    assert [n.node.name for n in p.used] == ["a", "b"]


def test_deterministic() -> None:
    specs = [spec(f"m{i}", 1 + i % 3) for i in range(20)]
    nodes = [Node(f"n{i}", 4 + i % 5) for i in range(20)]
    assert str(plan(specs, nodes, replicas=2)) == str(plan(list(specs), list(nodes), replicas=2))


def test_replicas_by_model() -> None:
    p = plan([spec("x"), spec("y")], NODES, replicas={"x": 3})
    assert len(p.nodes_of("x")) == 3 and len(p.nodes_of("y")) == 1


def test_shortfall_names_model_and_cores() -> None:
    with pytest.raises(ClusterPlacementError) as e:
        plan([spec("huge", 6), spec("ok", 1)], [Node("a", 4), Node("b", 2)])
    assert e.value.model == "huge" and e.value.needed == 6 and e.value.available == 4
    assert e.value.shortfall == 2 and "short by 2" in str(e.value) and "'huge'" in str(e.value)
    assert isinstance(e.value, ap.PlacementError)


def test_too_few_nodes_for_replicas() -> None:
    with pytest.raises(ClusterPlacementError, match="replica 3 of 3.*already holds one of its replicas") as e:
        plan([spec("x")], [Node("a", 4), Node("b", 4)], replicas=3)
    assert e.value.model == "x" and e.value.shortfall == 0


def test_cpu_list_counts_its_length_and_becomes_a_count() -> None:
    p = plan([spec("listed", "0-2")], NODES)
    (r,) = [r for n in p.nodes for r in n.replicas]
    assert r.cores == 3 and r.spec.cores == 3


def test_shared_model_reserves_instances_times_threads() -> None:
    p = plan([spec("s", None, instances=2, threads=2)], [Node("a", 3), Node("b", 4)])
    assert p.nodes_of("s") == ("b",) and p.node("b").used == 4


def test_gpu_and_labels_restrict_nodes() -> None:
    nodes = [Node("cpu", 8), Node("gpu", 8, gpus=1, labels={"zone": "x"})]
    p = plan([spec("g", 1, gpu=ap.GPU(device=0)), spec("z", 1)], nodes, labels={"z": {"zone": "x"}})
    assert p.nodes_of("g") == ("gpu",) and p.nodes_of("z") == ("gpu",)
    with pytest.raises(ClusterPlacementError, match="no node has GPU 1"):
        plan([spec("g", 1, gpu=ap.GPU(device="cuda:1"))], nodes)
    with pytest.raises(ClusterPlacementError, match="label zone=y"):
        plan([spec("z", 1)], nodes, labels={"z": {"zone": "y"}})


def test_numa_pinned_model_goes_to_nodes_with_that_numa_node() -> None:
    nodes = [Node("one", 8), Node("two", 8, numa_nodes=2)]
    p = plan([spec("pinned", 1, numa=1), spec("any", 1)], nodes)
    assert p.nodes_of("pinned") == ("two",)
    with pytest.raises(ClusterPlacementError, match="no node has NUMA node 2"):
        plan([spec("far", 1, numa=2)], nodes)
    with pytest.raises(ap.QuotaError, match="numa_nodes must be an integer >= 1"):
        Node("x", 1, numa_nodes=0)


def config_with_demand(rate: float, slo_ms: float) -> ap.Config:
    m = ModelConfig(spec("ranker", None), slo={"latency_ms": slo_ms, "percentile": 99.0},
                    load={"rate": rate})
    return ap.Config(models={"ranker": m})


def test_cost_model_sizes_replicas_for_demand_at_slo() -> None:
    # 2 ms of one core per request: 1000 req/s needs 2000 ms/s / RHO 0.85 -> 3 cores.
    cost = CostModel(alpha_ms=0.0, beta_ms=2.0, serial=1.0, batchable=False)
    p = plan(config_with_demand(1000.0, 20.0), [Node("a", 8)], costs={"ranker": cost})
    (r,) = p.node("a").replicas
    assert r.cores == 3 and r.spec.instances == 3 and r.spec.threads == 1
    # Two replicas split the demand: 500 req/s each -> 2 cores each.
    p2 = plan(config_with_demand(1000.0, 20.0), [Node("a", 8), Node("b", 8)], costs={"ranker": cost},
              replicas=2)
    assert [r.cores for n in p2.nodes for r in n.replicas] == [2, 2]


def test_demand_beyond_one_node_adds_replicas() -> None:
    cost = CostModel(alpha_ms=0.0, beta_ms=2.0, serial=1.0, batchable=False)
    p = plan(config_with_demand(3000.0, 20.0), [Node("a", 4), Node("b", 4), Node("c", 4)],
             costs={"ranker": cost})
    assert len(p.nodes_of("ranker")) == 2  # 8 cores of demand: two 4-core replicas


def test_demand_beyond_the_cluster_is_a_shortfall() -> None:
    cost = CostModel(alpha_ms=0.0, beta_ms=2.0, serial=1.0, batchable=False)
    with pytest.raises(ClusterPlacementError, match="needs 6 cores per replica even over 2 replicas") as e:
        plan(config_with_demand(5000.0, 20.0), [Node("a", 4), Node("b", 4)], costs={"ranker": cost})
    assert e.value.model == "ranker" and e.value.shortfall == 2


def test_unreachable_slo_is_named() -> None:
    cost = CostModel(alpha_ms=0.0, beta_ms=30.0, serial=1.0, batchable=False)
    with pytest.raises(ClusterPlacementError, match="no shape meets its SLO of 20 ms"):
        plan(config_with_demand(10.0, 20.0), [Node("a", 4)], costs={"ranker": cost})


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"replicas": 0}, "replicas"), ({"replicas": {"nope": 1}}, "replicas"),
    ({"costs": {"nope": CostModel(0, 1)}}, "costs"), ({"labels": {"nope": {}}}, "labels"),
])
def test_bad_arguments_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ap.QuotaError) as e:
        plan([spec("x")], NODES, **kwargs)  # type: ignore[arg-type]
    assert e.value.field == field


def test_bad_nodes_and_configs() -> None:
    with pytest.raises(ap.QuotaError, match="cpus must be an integer"):
        Node("a", -1)
    with pytest.raises(ap.QuotaError, match="cpu_set '0' has 1 CPUs, fewer than cpus=2"):
        Node("a", 2, "0")
    with pytest.raises(ap.QuotaError, match="not a CPU list"):
        Node("a", 2, "x-y")
    with pytest.raises(ap.QuotaError, match="distinct"):
        plan([spec("x")], [Node("a", 1), Node("a", 1)])
    with pytest.raises(ap.PlacementError, match="no nodes"):
        plan([spec("x")], [])
    with pytest.raises(ap.QuotaError, match="two specs"):
        plan([spec("x"), spec("x")], NODES)
    with pytest.raises(ap.QuotaError, match="give an apportion.Config"):
        plan({"x": 1}, NODES)


def test_replace_lost_moves_replicas_to_survivors() -> None:
    p = plan([spec("x", 2), spec("y", 1)], [Node("a", 2), Node("b", 1), Node("c", 4)])
    assert p.nodes_of("x") == ("a",) and p.nodes_of("y") == ("b",)
    r = replace_lost(p, "a")
    assert r.moved == {"x": "c"} and r.lost_capacity == {}
    assert [n.node.name for n in r.plan.nodes] == ["b", "c"] and r.plan.nodes_of("x") == ("c",)


def test_replace_lost_keeps_required_labels() -> None:
    nodes = [Node("a", 2, labels={"zone": "x"}), Node("b", 2, labels={"zone": "y"}),
             Node("c", 2, labels={"zone": "x"})]
    p = plan([spec("z", 2)], nodes, labels={"z": {"zone": "x"}})
    assert p.nodes_of("z") == ("a",)
    assert replace_lost(p, "a").moved == {"z": "c"}
    r = replace_lost(replace_lost(p, "a").plan, "c")
    assert r.moved == {} and "no node has label zone=x" in r.lost_capacity["z"]


def test_replace_lost_reports_what_cannot_move() -> None:
    p = plan([spec("x", 3)], [Node("a", 4), Node("b", 4), Node("c", 2)], replicas=2)
    lost = p.nodes_of("x")[0]
    r = replace_lost(p, lost)
    assert r.moved == {} and "1 of 2 replicas left" in r.lost_capacity["x"]
    assert "short by 1" in r.lost_capacity["x"]


def test_importing_apportion_imports_no_ray() -> None:
    code = "import sys, apportion, apportion.ray; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_replace_lost_with_no_node_left_says_so() -> None:
    # The sentence was cut off: "0 of 1 replicas left; no node has ".
    r = replace_lost(plan([spec("x", 1)], [Node("a", 2)]), "a")
    assert r.moved == {} and r.lost_capacity["x"].endswith("no node is left in the cluster")


def test_a_planned_batching_keeps_the_users_word_on_a_batch_of_one() -> None:
    # The plan's batching came from its shape alone: single_unbatched=False (this model needs
    # its batch dim) became the default on every replica, True was dropped.
    cost = CostModel(alpha_ms=2.0, beta_ms=0.2, serial=1.0)
    for word in (True, False, None):
        m = ModelConfig(spec("ranker", None, batching=ap.Batching(8, 2.0, single_unbatched=word)),
                        slo={"latency_ms": 50.0, "percentile": 99.0}, load={"rate": 2000.0})
        (r,) = plan(ap.Config(models={"ranker": m}), [Node("a", 8)], costs={"ranker": cost}).node("a").replicas
        assert r.spec.batching is not None and r.spec.batching.max_size > 1, "the plan batches"
        assert r.spec.batching.single_unbatched is word
