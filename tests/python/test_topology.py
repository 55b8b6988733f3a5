from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from apportion import _core
from apportion.topology import Topology, format_cpulist, parse_cpulist, topology

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "topology"
NAMES = ["vm2", "server_2s128t", "hybrid_8p16e", "container_scattered", "offline_cpu", "arm_big_little"]


def fixture(name: str) -> Topology:
    return topology(str(FIXTURES / name))


def test_cpulist_round_trip_and_errors() -> None:
    assert parse_cpulist("0-3,8,10-11") == (0, 1, 2, 3, 8, 10, 11)
    assert format_cpulist([11, 10, 8, 3, 2, 1, 0]) == "0-3,8,10-11"
    with pytest.raises(ValueError, match="bad cpulist token '3-1'"):
        parse_cpulist("3-1")


@pytest.mark.parametrize("name", NAMES)
def test_every_fixture_is_consistent(name: str) -> None:
    t = fixture(name)
    usable = set(t.usable)
    assert usable and usable <= set(t.online) & set(t.allowed)
    assert not usable & set(t.offline)
    for core in t.cores:
        assert set(core.usable) == set(core.cpus) & usable
        for cpu in core.cpus:
            c = t.cpu(cpu)
            assert (c.core, c.node, c.l3) == (core.index, core.node, core.l3)
    for cpu in t.usable:
        assert sum(cpu in n.cpus for n in t.nodes) == 1
        assert sum(cpu in d.cpus for d in t.l3_domains) == 1
    # to_dict is JSON and agrees with the dataclasses.
    d = json.loads(json.dumps(t.to_dict()))
    assert d["usable"] == list(t.usable)
    assert len(d["cores"]) == len(t.cores)
    assert d["threads_per_core"] == t.threads_per_core


def test_server_fixture_shape() -> None:
    t = fixture("server_2s128t")
    assert (len(t.cpus), len(t.usable_cores), len(t.nodes), len(t.l3_domains)) == (128, 64, 2, 8)
    assert t.threads_per_core == 2
    assert t.cores[0].cpus == (0, 64)
    assert [n.memory_bytes for n in t.nodes] == [128 << 30, 128 << 30]
    text = str(t)
    assert "2 NUMA node(s), 8 L3 domain(s), 64 usable physical cores, up to 2 thread(s) per core" in text
    assert "node 1: 128.0 GiB, usable CPUs 32-63,96-127" in text
    assert "L3 7 (32 MiB): 8 cores, CPUs 56-63,120-127" in text


def test_hybrid_fixture_kinds_and_text() -> None:
    t = fixture("hybrid_8p16e")
    assert t.hybrid
    kinds = [c.kind for c in t.cores]
    assert kinds.count("performance") == 8 and kinds.count("efficiency") == 16
    assert all(len(c.cpus) == (2 if c.kind == "performance" else 1) for c in t.cores)
    assert "performance cores: 8 (CPUs 0-15)" in str(t)
    assert "efficiency cores: 16 (CPUs 16-31)" in str(t)
    big_little = fixture("arm_big_little")
    assert [c.kind for c in big_little.cpus] == ["efficiency"] * 4 + ["performance"] * 2


def test_container_fixture_intersects_status_and_cgroup() -> None:
    t = fixture("container_scattered")
    assert t.allowed == (1, 3, 4, 9, 14)
    assert t.usable == t.allowed
    assert "not allowed to this process: 0,2,5-8,10-13,15" in str(t)
    assert len(t.nodes) == 1 and t.nodes[0].memory_bytes == 32 << 30
    assert len(t.l3_domains) == 1 and t.l3_domains[0].id == -1


def test_offline_fixture() -> None:
    t = fixture("offline_cpu")
    assert t.offline == (5,)
    assert not t.cpu(5).usable and t.cpu(5).core == -1
    assert "offline: 5" in str(t)
    with pytest.raises(KeyError, match="CPU 99"):
        t.cpu(99)


def test_restriction_narrows_the_usable_set() -> None:
    t = fixture("server_2s128t")
    r = t.restricted_to("0-3,64")
    assert r.usable == (0, 1, 2, 3, 64)
    assert topology(str(FIXTURES / "server_2s128t"), cpus=[5, 6]).usable == (5, 6)
    assert len(t.usable) == 128
    with pytest.raises(ValueError, match="not present"):
        t.restricted_to([500])


def test_live_machine_matches_sched_getaffinity() -> None:
    t = topology()
    assert t.root == "/"
    expected = sorted(os.sched_getaffinity(0) & set(t.online))
    assert list(t.usable) == expected
    assert str(t).startswith("topology of /:")


def test_malformed_tree_names_the_file(tmp_path: Path) -> None:
    cpu = tmp_path / "sys/devices/system/cpu"
    (cpu / "cpu0/topology").mkdir(parents=True)
    (cpu / "present").write_text("0\n")
    (cpu / "online").write_text("0\n")
    (cpu / "cpu0/topology/physical_package_id").write_text("0\n")
    with pytest.raises(RuntimeError, match="cpu0/topology/core_id"):
        topology(str(tmp_path))
    (cpu / "cpu0/topology/core_id").write_text("zero\n")
    with pytest.raises(RuntimeError, match="expected an integer.*'zero'"):
        topology(str(tmp_path))


def test_pin_and_read_back_in_a_thread() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    seen: dict[str, object] = {}

    def worker() -> None:
        seen["pin"] = _core.pin_current_thread([allowed[-1]])
        seen["mask"] = _core.current_thread_affinity()
        seen["mem"] = _core.set_memory_policy("bind", [0])
        seen["policy"] = _core.current_memory_policy()
        seen["threads"] = _core.thread_affinities()

    th = threading.Thread(target=worker)
    th.start()
    th.join(30)
    assert seen["pin"] == (True, "")
    assert seen["mask"] == [allowed[-1]]
    assert seen["mem"] == (True, "")
    assert seen["policy"] == (_core.MemoryPolicy.bind, [0])
    with pytest.raises(ValueError, match='policy must be "bind", "prefer" or "none", not "bond"'):
        _core.set_memory_policy("bond", [0])
    assert any(cpus == [allowed[-1]] for _, _, cpus in seen["threads"])  # type: ignore[attr-defined]
    # The calling (main) thread kept its mask.
    assert _core.current_thread_affinity() == allowed
    ok, reason = _core.pin_current_thread([4000])
    assert not ok and "4000" in reason and "errno" in reason
    assert _core.current_thread_affinity() == allowed


def test_native_topology_is_bound_types_with_bound_enums() -> None:
    native = _core.read_topology(str(FIXTURES / "hybrid_8p16e"))
    assert isinstance(native.cpus[0], _core.Cpu) and isinstance(native.cores[0], _core.Core)
    assert isinstance(native.nodes[0], _core.NumaNode) and isinstance(native.l3_domains[0], _core.L3Domain)
    kinds = {c.kind for c in native.cpus}
    assert kinds == {_core.CoreKind.performance, _core.CoreKind.efficiency}
    with pytest.raises(AttributeError):
        native.cpus[0].id = 7  # type: ignore[misc]
    t = Topology._from_native(native)
    assert [c.kind for c in t.cpus] == [c.kind.name for c in native.cpus]
    assert {c.kind for c in t.cores} == {"performance", "efficiency"}
    assert [n.memory_bytes for n in t.nodes] == [n.memory_bytes for n in native.nodes]
    # The enums' members are the Python API's words; words are parsed once, in the core.
    assert list(_core.CoreKind.__members__) == ["unknown", "performance", "efficiency"]
    assert list(_core.MemoryPolicy.__members__) == ["bind", "prefer", "none"]
    assert list(_core.Isolation.__members__) == ["exclusive", "shared"]
    assert _core.Quota(name="m", isolation="exclusive", memory_policy="prefer").memory_policy == "prefer"
    with pytest.raises(ValueError, match='isolation must be "exclusive" or "shared", not "solo"'):
        _core.Quota(name="m", isolation="solo")
    with pytest.raises(ValueError, match='memory_policy must be "bind", "prefer" or "none", not "bond"'):
        _core.Quota(name="m", memory_policy="bond")
