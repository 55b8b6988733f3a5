"""Runtimes that give models the same CPUs exclusively, in one process or in several, are told
so (PinningWarning): each plans on every CPU its process may use and knows nothing of others."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest

import apportion as ap
from apportion._private.claims import CpuClaims

VM2 = str(Path(__file__).resolve().parents[1] / "fixtures" / "topology" / "vm2")


def echo(x: Any) -> Any:
    return x


def exclusive(cpus: str | None = None, **kw: Any) -> ap.Runtime:
    rt = ap.Runtime(cpus=cpus, **kw)
    rt.add_model("m", model=echo, cores=1, isolation="exclusive")
    return rt


def exclusive_cpus(rt: ap.Runtime) -> set[int]:
    return {c for m in rt.plan().models if m.isolation == "exclusive" for c in (*m.cpus, *m.reserved)}


def test_two_runtimes_of_one_process_on_the_same_cores_are_told(tmp_path: Path) -> None:
    first = exclusive().start()
    try:
        second = exclusive()
        with pytest.warns(ap.PinningWarning, match=r"CPU \d+, which this runtime gives model\(s\) 'm' exclusively, "
                                                   r"are claimed by another apportion runtime \(this process\)"):
            second.start()
        assert second.call("m", 1) == 1  # the plan stands: told, not refused
        second.close()
        assert first._claims.held == exclusive_cpus(first) and second._claims.held == frozenset()
    finally:
        first.close()
    assert first._claims.held == frozenset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # released at close: a new runtime takes them silently
        third = exclusive().start()
        third.close()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_runtimes_given_cpus_of_their_own_claim_without_a_word() -> None:
    a, b = sorted(os.sched_getaffinity(0))[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = exclusive(str(a)).start()
        second = exclusive(str(b)).start()
        assert first._claims.held.isdisjoint(second._claims.held)
        second.close()
        first.close()


def test_a_runtime_of_another_process_is_named_by_its_pid() -> None:
    script = textwrap.dedent("""
        import sys, apportion as ap
        rt = ap.Runtime()
        rt.add_model("other", model=lambda x: x, cores=1, isolation="exclusive")
        rt.start()
        print("ready", flush=True)
        sys.stdin.readline()
        rt.close()
    """)
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        rt = exclusive()
        with pytest.warns(ap.PinningWarning, match=rf"claimed by another apportion runtime \(process {other.pid}\)"):
            rt.start()
        rt.close()
    finally:
        other.communicate("\n", timeout=60)
    assert other.returncode == 0
    # Its claim went with it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exclusive().start().close()


def test_claims_follow_the_plan_through_moves_and_removal() -> None:
    with ap.Runtime() as rt:
        rt.add_model("shared", model=echo)  # a shared model claims nothing
        rt.start()
        assert rt._claims.held == frozenset()
    rt = exclusive().start()
    try:
        held = rt._claims.held
        assert held == exclusive_cpus(rt) and len(held) == 1
        rt.apply(ap.ModelSpec("m", model=echo, isolation="shared"))
        assert rt._claims.held == frozenset()
        rt.apply(ap.ModelSpec("m", model=echo, cores=1, isolation="exclusive"))
        assert rt._claims.held == exclusive_cpus(rt) != frozenset()
        rt.remove_model("m")
        assert rt._claims.held == frozenset()
        rt.add_model("m", model=echo, cores=1, isolation="exclusive")  # added to a running runtime
        assert rt._claims.held == exclusive_cpus(rt) != frozenset()
    finally:
        rt.close()


def test_a_runtime_on_another_machines_tree_claims_nothing() -> None:
    rt = exclusive(topology_root=VM2).start()
    try:
        assert rt._claims.held == frozenset()
    finally:
        rt.close()


def test_claims_on_their_own(tmp_path: Path) -> None:
    one, two = CpuClaims(str(tmp_path)), CpuClaims(str(tmp_path))
    assert one.claim([3, 5]) == {} and one.held == {3, 5}
    assert two.claim([5, 7]) == {5: os.getpid()} and two.held == {7}
    assert one.claim([3]) == {} and one.held == {3}  # lets go of 5
    assert two.claim([5, 7]) == {} and two.held == {5, 7}
    one.release()
    one.release()  # idempotent
    assert one.held == frozenset() and two.claim([3, 5, 7]) == {}
    two.release()
    unwritable = tmp_path / "nowhere"  # a directory that does not exist: nothing claimed, nothing said
    assert CpuClaims(str(unwritable)).claim([1]) == {}
