from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from apportion import _core
from apportion.topology import CpuQuota, Topology, format_cpulist, parse_cpulist, read_cpu_quota, topology

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
    if t.cpu_quota is not None and t.cpu_quota.narrowed_from:  # a container's CPU limit
        assert list(t.cpu_quota.narrowed_from) == expected and set(t.usable) < set(expected)
    else:
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


# --- cgroup CPU quota -------------------------------------------------------------------------


def quota_tree(tmp_path: Path, fixture_name: str, cgroup: str, files: dict[str, str]) -> str:
    """A fixture machine with ``proc/self/cgroup`` and cgroup files under ``sys/fs/cgroup``."""
    root = tmp_path / fixture_name
    shutil.copytree(FIXTURES / fixture_name, root, dirs_exist_ok=True)
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        path = root / "sys/fs/cgroup" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_a_v2_quota_on_an_ancestor_narrows_to_one_cpu_per_core(tmp_path: Path) -> None:
    # Kubernetes: the pod's group carries the limit, the container's own says "max".
    root = quota_tree(tmp_path, "server_2s128t", "0::/kubepods/pod1/ctr\n", {
        "kubepods/cpu.max": "max 100000\n",
        "kubepods/pod1/cpu.max": "350000 100000\n",
        "kubepods/pod1/ctr/cpu.max": "max 100000\n",
    })
    t = topology(root)
    assert t.cpu_quota is not None and t.cpu_quota.cpus == 3.5
    assert t.cpu_quota.source.endswith("sys/fs/cgroup/kubepods/pod1/cpu.max")
    assert t.usable == (0, 1, 2, 3)  # ceil(3.5) physical cores of node 0, no SMT sibling
    assert len(t.cpu_quota.narrowed_from) == 128
    text = str(t)
    assert "cgroup CPU quota: 3.5 CPUs" in text and "usable narrowed from 0-127 to 4 CPUs" in text
    assert "not allowed" not in text
    assert json.loads(json.dumps(t.to_dict()))["cpu_quota"]["cpus"] == 3.5
    # SMT siblings come last: 66 CPUs are the 64 first siblings, then node 0's first two cores' others.
    root66 = quota_tree(tmp_path / "b", "server_2s128t", "0::/\n", {"cpu.max": "6600000 100000\n"})
    assert topology(root66).usable == tuple(range(64)) + (64, 65)


def test_a_v1_quota_and_the_tightest_of_several(tmp_path: Path) -> None:
    root = quota_tree(tmp_path, "server_2s128t", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/docker/cpu.cfs_quota_us": "800000\n",
        "cpu,cpuacct/docker/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "75000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "50000\n",
    })
    q = read_cpu_quota(root)
    assert q == CpuQuota(1.5, q.source) and q.source.endswith("docker/abc/cpu.cfs_quota_us")
    assert topology(root).usable == (0, 1)
    # A quantum under one CPU still leaves one CPU to run on.
    small = quota_tree(tmp_path / "s", "vm2", "0::/\n", {"cpu.max": "20000 100000\n"})
    assert topology(small).usable == (0,)


def test_no_quota_and_a_quota_the_cpus_fit_in(tmp_path: Path) -> None:
    unlimited = quota_tree(tmp_path, "vm2", "0::/a\n", {"a/cpu.max": "max 100000\n"})
    assert read_cpu_quota(unlimited) is None and topology(unlimited).cpu_quota is None
    v1 = quota_tree(tmp_path / "v1", "vm2", "3:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n"})
    assert read_cpu_quota(v1) is None
    roomy = quota_tree(tmp_path / "r", "vm2", "0::/\n", {"cpu.max": "400000 100000\n"})
    t = topology(roomy)
    assert t.cpu_quota == CpuQuota(4.0, t.cpu_quota.source, ()) and len(t.usable) == 2
    assert "the usable CPUs fit in it" in str(t)
    # No proc/self/cgroup (every fixture tree): no quota.
    assert read_cpu_quota(str(FIXTURES / "vm2")) is None


def test_named_cpus_are_taken_as_named_beside_a_quota(tmp_path: Path) -> None:
    root = quota_tree(tmp_path, "server_2s128t", "0::/\n", {"cpu.max": "100000 100000\n"})
    t = topology(root, cpus="0-3")
    assert t.usable == (0, 1, 2, 3) and t.cpu_quota is not None and not t.cpu_quota.narrowed_from
    assert "CPUs named, not narrowed: workers busy on more CPUs than the quota are throttled" in str(t)
    # Narrowing a narrowed topology keeps the quota on record, and says why a CPU the quota
    # left out is not there (not "not allowed to this process": the process may use it).
    assert topology(root).restricted_to([0]).cpu_quota.cpus == 1.0
    with pytest.raises(ValueError, match=r"CPU 64 leaves no usable CPU \(left out for the cgroup CPU quota of 1"):
        topology(root).restricted_to([64])


def test_a_runtime_plans_within_the_quota(tmp_path: Path) -> None:
    import apportion as ap

    root = quota_tree(tmp_path, "server_2s128t", "0::/\n", {"cpu.max": "200000 100000\n"})
    rt = ap.Runtime(topology_root=root)
    try:
        rt.add_model("a", model=lambda x: x, isolation="exclusive", cores=1)
        rt.add_model("b", model=lambda x: x)
        plan = rt.plan()
        assert set(plan.usable) == {0, 1}
        assert {c for m in plan.models for c in m.cpus} <= {0, 1}
        assert "2 usable CPUs (cgroup CPU quota 2)" in str(plan)
        with pytest.raises(ap.PlacementError):
            rt.add_model("c", model=lambda x: x, isolation="exclusive", cores=2)
    finally:
        rt.close()


@pytest.mark.parametrize(("cgroup", "files", "match"), [
    ("0::/\n", {"cpu.max": "lots 100000\n"}, "cpu.max: expected 'max PERIOD' or 'QUOTA PERIOD'.*'lots 100000'"),
    ("0::/\n", {"cpu.max": "100000\n"}, "cpu.max: expected"),
    ("3:cpu:/\n", {"cpu/cpu.cfs_quota_us": "half\n"}, "cpu.cfs_quota_us: expected an integer"),
    ("3:cpu:/\n", {"cpu/cpu.cfs_quota_us": "50000\n"}, "cpu.cfs_period_us: expected a period"),
    ("garbage\n", {}, "proc/self/cgroup: expected 'ID:CONTROLLERS:PATH' lines, got 'garbage'"),
])
def test_a_malformed_quota_names_the_file(tmp_path: Path, cgroup: str, files: dict[str, str], match: str) -> None:
    root = quota_tree(tmp_path, "vm2", cgroup, files)
    with pytest.raises(RuntimeError, match=match):
        topology(root)


def _writable_cpu_cgroup() -> Path | None:
    """A cgroup directory under which this process may make a child with a CPU quota."""
    if os.geteuid() != 0:
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, group = line.split(":", 2)
        if controllers == "" and "cpu" in Path("/sys/fs/cgroup/cgroup.controllers").read_text(errors="ignore").split():
            base = Path("/sys/fs/cgroup") / group.lstrip("/")
        elif "cpu" in controllers.split(","):
            base = Path("/sys/fs/cgroup") / controllers / group.lstrip("/")
        else:
            continue
        if base.is_dir() and os.access(base, os.W_OK):
            return base
    return None


def test_a_real_cgroup_quota_narrows_a_child_process() -> None:
    base = _writable_cpu_cgroup()
    if base is None:
        pytest.skip("no writable cgroup with the cpu controller (needs root and a cgroup mount)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one usable CPU: a quota of one cannot narrow it")
    group = base / f"apportion-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a cgroup under {base}: {e}")
    try:
        v2 = (group / "cpu.max").exists()
        if v2:
            (group / "cpu.max").write_text("100000 100000")
        else:
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text("100000")
        # The child joins the group itself, before apportion reads anything.
        code = (f"import os; open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()));"
                f"import apportion as ap, json; t = ap.topology();"
                f"print(json.dumps([list(t.usable), t.cpu_quota.cpus, t.cpu_quota.source]))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        usable, cpus, source = json.loads(out.stdout)
        assert len(usable) == 1 and cpus == 1.0 and source.startswith(str(group))
    finally:
        for _ in range(50):  # the child has exited; the kernel may take a moment to let go
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
