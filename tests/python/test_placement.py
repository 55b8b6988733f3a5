from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion.errors import ApportionError, PlacementError, QuotaError
from apportion.placement import Plan, Quota, plan
from apportion.topology import Topology, topology

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "topology"
NAMES = ["vm2", "server_2s128t", "hybrid_8p16e", "container_scattered", "offline_cpu", "arm_big_little"]
TOPOLOGIES = {name: topology(str(FIXTURES / name)) for name in NAMES}


def names_model_and_field(err: BaseException, model: str, field: str) -> None:
    text = str(err)
    assert f"model {model!r}" in text, text
    assert f"field {field!r}" in text, text
    assert getattr(err, "model") == model
    assert getattr(err, "field") == field


# --- invariant checks, used by the examples and the property tests -----------------------------


def core_of(t: Topology, cpu: int) -> int:
    return t.cpu(cpu).core


def check_plan(t: Topology, quotas: list[Quota], p: Plan) -> None:
    owner: dict[int, str] = {}
    for q in quotas:
        m = p[q.name]
        assert len(m.instances) == q.instances
        assert sorted({c for i in m.instances for c in i.cpus}) == list(m.cpus)
        assert set(m.cpus) <= set(t.usable), f"{q.name} got CPUs outside the usable set"
        for inst in m.instances:
            assert inst.cpus and inst.memory_nodes
            assert inst.threads == (q.threads or len(inst.cpus))
            if not q.oversubscribe:
                assert inst.threads <= len(inst.cpus)
        cores = {core_of(t, c) for c in m.cpus}
        if q.isolation == "exclusive":
            for cpu in (*m.cpus, *m.reserved):
                assert cpu not in owner, f"CPU {cpu} given to both {owner[cpu]} and {q.name}"
                owner[cpu] = q.name
            if q.cpus is None:
                assert len(cores) == q.cores, f"{q.name} asked {q.cores} cores, got {len(cores)}"
        else:
            assert set(m.cpus) <= set(p.shared_pool)
        if q.cpus is not None:
            assert m.cpus == q.cpus
        elif not q.smt:
            assert len(m.cpus) == len(cores), f"{q.name} was given SMT siblings with smt=False"
        if q.numa != "auto":
            assert {t.cpu(c).node for c in m.cpus} == {q.numa}
            assert all(i.memory_nodes == (q.numa,) for i in m.instances)
    assert not set(p.shared_pool) & set(owner)
    # Without smt, an exclusive model's physical cores are its alone (its siblings held idle),
    # whether it counted its cores or listed its CPUs.
    for q in quotas:
        if q.isolation == "exclusive" and not q.smt:
            mine = {core_of(t, c) for c in p[q.name].cpus}
            for other in p.models:
                if other.name != q.name:
                    shared_cores = mine & {core_of(t, c) for c in other.cpus}
                    assert not shared_cores, f"{q.name} (smt=False) shares cores {shared_cores} with {other.name}"
            assert not mine & {core_of(t, c) for c in p.shared_pool}, f"{q.name}'s cores are in the shared pool"


def check_locality(t: Topology, quotas: list[Quota], p: Plan) -> None:
    """Replays the placement order: an exclusive count-model must sit in one L3 domain whenever
    one had enough wholly free cores when it was placed, else in one node whenever one had."""
    by_name = {q.name: q for q in quotas}
    taken: set[int] = set()  # physical cores held by earlier exclusive models
    for m in sorted(p.models, key=lambda m: m.order):
        q = by_name[m.name]
        if q.isolation != "exclusive":
            continue
        if q.cpus is None and q.numa == "auto":
            free = [c for c in t.usable_cores if c.index not in taken]
            per_l3: dict[tuple[int, int], int] = {}
            per_node: dict[int, int] = {}
            for c in free:
                per_l3[(c.node, c.l3)] = per_l3.get((c.node, c.l3), 0) + 1
                per_node[c.node] = per_node.get(c.node, 0) + 1
            l3s = {(t.cpu(c).node, t.cpu(c).l3) for c in m.cpus}
            nodes = {t.cpu(c).node for c in m.cpus}
            if max(per_l3.values(), default=0) >= q.cores:
                assert len(l3s) == 1, f"{q.name} spans L3 domains {l3s} though one had room"
                assert m.locality == "l3"
            elif max(per_node.values(), default=0) >= q.cores:
                assert len(nodes) == 1, f"{q.name} spans nodes {nodes} though one had room"
        taken |= {core_of(t, c) for c in (*m.cpus, *m.reserved)}


def plans_equal(a: Plan, b: Plan) -> bool:
    return a.to_dict() == b.to_dict()


# --- examples -----------------------------------------------------------------------------------


def test_default_quota_is_one_instance_on_the_shared_pool() -> None:
    t = TOPOLOGIES["server_2s128t"]
    p = plan([Quota("m")], t)
    m = p["m"]
    assert m.isolation == "shared" and len(m.instances) == 1
    assert m.cpus == tuple(range(64))  # one thread per physical core of the pool
    assert m.instances[0].threads == 64  # framework threads capped to the pool's cores


def test_exclusive_models_are_local_and_the_pool_is_what_remains() -> None:
    t = TOPOLOGIES["server_2s128t"]
    quotas = [
        Quota("ranker", cores=4, instances=2, threads=2, isolation="exclusive"),
        Quota("encoder", cores=8, isolation="exclusive", smt=True, numa=1, memory_policy="prefer"),
        Quota("rest"),
    ]
    p = plan(quotas, t)
    check_plan(t, quotas, p)
    assert p["encoder"].cpus == (*range(32, 40), *range(96, 104))
    assert p["encoder"].locality == "l3"
    assert p["ranker"].reserved == tuple(c + 64 for c in p["ranker"].cpus)
    assert [i.cpus for i in p["ranker"].instances] == [(0, 1), (2, 3)]
    assert len(p.shared_pool) == 128 - 8 - 16
    text = str(p)
    assert "ranker" in text and "#1 2-3 x2" in text and "(+64-67 idle)" in text
    assert json.loads(json.dumps(p.to_dict()))["models"][0]["name"] == "ranker"


def test_a_listed_exclusive_model_keeps_its_cores_siblings_idle_without_smt() -> None:
    t = TOPOLOGIES["server_2s128t"]  # CPU 64 is CPU 0's sibling, 65 CPU 1's
    p = plan([Quota("pinned", cores="0-1", isolation="exclusive"), Quota("s")], t)
    assert p["pinned"].cpus == (0, 1) and p["pinned"].reserved == (64, 65)
    assert not {64, 65} & set(p.shared_pool) and not {64, 65} & set(p["s"].cpus)
    assert "0-1 (+64-65 idle)" in str(p)
    # Another exclusive model on a sibling: refused, naming the sibling rule, in either order.
    for a, b in (("a", "b"), ("b", "a")):
        with pytest.raises(PlacementError, match=r"CPUs (0|64) already belong to exclusive model '[ab]' "
                                                 r"\(SMT siblings of its CPUs, held idle since it has smt=False\)") as e:
            plan([Quota(a, cores="0", isolation="exclusive"), Quota(b, cores="64", isolation="exclusive")], t)
        assert e.value.field == "cores"
    # With smt=True on both, they share the core, as asked.
    both = plan([Quota("a", cores="0", isolation="exclusive", smt=True),
                 Quota("b", cores="64", isolation="exclusive", smt=True)], t)
    assert both["a"].cpus == (0,) and both["b"].cpus == (64,)


def test_models_accepted_as_dicts_and_mapping() -> None:
    t = TOPOLOGIES["vm2"]
    a = plan([{"name": "x", "cores": 1, "isolation": "exclusive"}, {"name": "y"}], t)
    b = plan({"x": {"cores": 1, "isolation": "exclusive"}, "y": {}}, t)
    assert plans_equal(a, b)
    assert a["x"].cpus == (0,) and a["y"].cpus == (1,)
    # A key Quota lacks, or no name: a QuotaError naming them (was Quota's bare TypeError).
    with pytest.raises(QuotaError, match=r"model 'a', field 'coers': unknown key 'coers'; allowed: name, cores"):
        plan({"a": {"coers": 2}}, t)
    with pytest.raises(QuotaError, match=r"field 'name': a model's fields need its name"):
        plan([{"cores": 2}], t)


def test_plan_defaults_to_this_machine() -> None:
    p = plan([Quota("m")])
    assert p.topology.root == "/"
    assert set(p["m"].cpus) <= set(p.usable)


# --- invalid quotas: each names the model and the field ------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cores": -1, "isolation": "exclusive"}, "cores"),
        ({"cores": 0, "isolation": "exclusive"}, "cores"),
        ({"cores": 2.5, "isolation": "exclusive"}, "cores"),
        ({"cores": "2", "isolation": "exclusive", "instances": 1.0}, "instances"),
        ({"cores": True}, "cores"),
        ({"cores": "0-x"}, "cores"),
        ({"cores": ""}, "cores"),
        ({"cores": [0, -1]}, "cores"),
        ({"isolation": "exclusive"}, "cores"),
        ({"instances": 0}, "instances"),
        ({"instances": -2}, "instances"),
        ({"threads": 0}, "threads"),
        ({"threads": 1.5}, "threads"),
        ({"isolation": "private"}, "isolation"),
        ({"numa": -1}, "numa"),
        ({"numa": "near"}, "numa"),
        ({"smt": "yes"}, "smt"),
        ({"oversubscribe": 1}, "oversubscribe"),
        ({"memory_policy": "interleave"}, "memory_policy"),
        ({"cores": 2, "threads": 3}, "threads"),
        ({"cores": 4, "instances": 2, "threads": 3}, "threads"),
        ({"cores": "0-1", "threads": 3, "smt": True}, "threads"),
    ],
)
def test_invalid_quota_is_rejected_before_placement(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(QuotaError) as info:
        Quota("bad-model", **kwargs)
    names_model_and_field(info.value, "bad-model", field)
    assert isinstance(info.value, ApportionError)


def test_threads_beyond_cores_allowed_with_consent() -> None:
    t = TOPOLOGIES["server_2s128t"]
    assert plan([Quota("m", cores=2, threads=4, smt=True, isolation="exclusive")], t)["m"].instances[0].threads == 4
    assert plan([Quota("m", cores=2, threads=5, oversubscribe=True)], t)["m"].instances[0].threads == 5
    # smt=True is consent, but a machine without SMT has no sibling threads to give.
    with pytest.raises(QuotaError) as info:
        plan([Quota("m", cores=2, threads=4, smt=True, isolation="exclusive")], TOPOLOGIES["vm2"])
    names_model_and_field(info.value, "m", "threads")


@pytest.mark.parametrize(
    ("quotas", "model", "field", "error"),
    [
        ([Quota("huge", cores=65, isolation="exclusive")], "huge", "cores", QuotaError),
        ([Quota("far", cores=2, isolation="exclusive", numa=2)], "far", "numa", QuotaError),
        ([Quota("off", cores="200")], "off", "cores", QuotaError),
        ([Quota("sib", cores="0,64", isolation="exclusive")], "sib", "smt", QuotaError),
        (
            [Quota("a", cores="0-3", isolation="exclusive"), Quota("b", cores="2-5", isolation="exclusive")],
            "b",
            "cores",
            PlacementError,
        ),
        (
            [Quota("a", cores=40, isolation="exclusive"), Quota("b", cores=30, isolation="exclusive")],
            "b",
            "cores",
            PlacementError,
        ),
        ([Quota("a", cores=64, isolation="exclusive"), Quota("s")], "s", "isolation", PlacementError),
        ([Quota("d"), Quota("d")], "d", "name", QuotaError),
    ],
)
def test_infeasible_quota_names_model_and_field(
    quotas: list[Quota], model: str, field: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        plan(quotas, TOPOLOGIES["server_2s128t"])
    names_model_and_field(info.value, model, field)


def test_placement_error_says_what_is_left() -> None:
    with pytest.raises(PlacementError, match="24 free cores left"):
        plan([Quota("a", cores=40, isolation="exclusive"), Quota("b", cores=30, isolation="exclusive")],
             TOPOLOGIES["server_2s128t"])
    # The largest is placed first: the model that does not fit may be the first one listed, and
    # the message said only "after earlier exclusive models".
    with pytest.raises(PlacementError, match=r"model 'm', field 'cores': .*0 free cores left after earlier exclusive "
                                             r"models; held by 'n' 2 cores \(placed largest first\)"):
        plan([Quota("m", cores=1, isolation="exclusive"), Quota("n", cores=2, isolation="exclusive")], TOPOLOGIES["vm2"])
    with pytest.raises(QuotaError, match="NUMA node 2 has no usable CPU.*nodes with CPUs: 0, 1"):
        plan([Quota("far", cores=1, isolation="exclusive", numa=2)], TOPOLOGIES["server_2s128t"])
    with pytest.raises(QuotaError, match=r"CPUs 5 are not usable here \(5: offline\)"):
        plan([Quota("x", cores="5")], TOPOLOGIES["offline_cpu"])


def test_unusable_named_cpus_say_why_each_is_not_usable() -> None:
    # Every one read "offline, absent or outside the allowed set", for a CPU the cgroup's
    # quota or the runtime's own cpus= left out too.
    from apportion.topology import CpuQuota

    server = TOPOLOGIES["server_2s128t"]
    with pytest.raises(QuotaError, match=r"CPUs 5,200 are not usable here \(5: outside the CPUs this runtime "
                       r"\(Runtime\(cpus=...\), \[runtime\] cpus\) or this process may use; 200: absent from this "
                       r"machine\); usable: 0-3"):
        plan([Quota("x", cores="5,200", isolation="exclusive")], server.restricted_to("0-3"))
    quota = server.within_quota(CpuQuota(1.5, "cpu.max"))
    with pytest.raises(QuotaError, match=r"\(7: left out for the cgroup CPU quota of 1.5 \(name CPUs in the full "
                       r"topology, topology\(cpus=...\), to use them anyway\)\)") as err:
        plan([Quota("x", cores="7", isolation="exclusive")], quota)
    assert (err.value.model, err.value.field) == ("x", "cores")
    with pytest.raises(QuotaError, match=r"\(0,2: outside the CPUs"):
        plan([Quota("x", cores="0,2", isolation="exclusive")], TOPOLOGIES["container_scattered"])


# --- property tests over random quotas on every fixture -------------------------------------------


@st.composite
def quota_sets(draw: st.DrawFn, t: Topology) -> list[Quota]:
    ncores = len(t.usable_cores)
    nodes = [n.id for n in t.nodes if set(n.cpus) & set(t.usable)]
    quotas = []
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["exclusive", "exclusive", "shared", "explicit"]))
        smt = draw(st.booleans())
        instances = draw(st.integers(1, 3))
        numa: int | str = draw(st.sampled_from(["auto", "auto", *nodes]))
        name = f"m{i}"
        if kind == "explicit":
            cpus = draw(st.lists(st.sampled_from(t.usable), min_size=1, max_size=4, unique=True))
            quotas.append(Quota(name, cores=",".join(map(str, cpus)), isolation="exclusive", smt=smt,
                                instances=min(instances, len(cpus))))
        elif kind == "exclusive":
            cores = draw(st.integers(1, max(1, ncores // 2)))
            quotas.append(Quota(name, cores=cores, isolation="exclusive", smt=smt, numa=numa,
                                instances=min(instances, cores)))
        else:
            cores = draw(st.sampled_from([None, 1, 2]))
            quotas.append(Quota(name, cores=cores, smt=smt, numa=numa, instances=1))
    return quotas


def _property_case(name: str, data: st.DataObject) -> None:
    t = TOPOLOGIES[name]
    quotas = data.draw(quota_sets(t))
    try:
        p = plan(quotas, t)
    except (QuotaError, PlacementError) as e:
        assert getattr(e, "model") in {q.name for q in quotas}
        assert f"model {getattr(e, 'model')!r}, field {getattr(e, 'field')!r}" in str(e)
        with pytest.raises(type(e)):
            plan(list(reversed(quotas)), t)  # infeasible in any order
        return
    check_plan(t, quotas, p)
    check_locality(t, quotas, p)
    assert plans_equal(p, plan(quotas, t)), "same input, different plan"
    shuffled = data.draw(st.permutations(quotas))
    again = plan(shuffled, t)
    assert all(again[m.name] == m for m in p.models), "plan depends on the order of the models"
    assert again.shared_pool == p.shared_pool


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_quotas_keep_every_invariant(name: str, data: st.DataObject) -> None:
    _property_case(name, data)
