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


def test_a_link_planted_in_the_claims_directory_is_not_followed(tmp_path: Path) -> None:
    # The directory is writable by every user: a link there made the runtime truncate another
    # file, write its pid into it and make it writable by every user.
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    victim.chmod(0o600)
    (tmp_path / "apportion-cpu-0.claim").symlink_to(victim)
    os.link(victim, tmp_path / "apportion-cpu-1.claim")  # a second name of it: no plain claim file either
    claims = CpuClaims(str(tmp_path))
    assert claims.claim([0, 1, 2]) == {} and claims.held == {2}
    assert victim.read_text() == "precious data" and (victim.stat().st_mode & 0o777) == 0o600
    claims.release()


def test_a_forked_child_does_not_keep_its_parents_claims(tmp_path: Path) -> None:
    # The child inherited the locked descriptors: the claims outlived the parent's release for
    # as long as the child lived, and the parent's next runtime was warned of its own CPUs.
    script = textwrap.dedent(f"""
        import os, sys, time, warnings
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        from apportion._private.claims import CpuClaims
        parent = CpuClaims({str(tmp_path)!r})
        parent.claim([0])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, b"x")
            time.sleep(3)
            os._exit(0)
        os.close(w)
        os.read(r, 1)  # the child runs, holding what it inherited
        parent.release()
        print(CpuClaims({str(tmp_path)!r}).claim([0]))
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{}"


def test_claims_collected_or_closed_let_go_and_claim_no_more(tmp_path: Path) -> None:
    import gc

    claims = CpuClaims(str(tmp_path))
    claims.claim([0])
    del claims
    gc.collect()
    other = CpuClaims(str(tmp_path))
    assert other.claim([0]) == {}  # the collected one's claim went with it
    other.close()
    assert other.held == frozenset() and other.claim([0, 1]) == {} and other.held == frozenset()


def test_a_runtime_warns_once_per_cpu_taken_and_never_in_place_of_an_error() -> None:
    first = exclusive().start()
    try:
        second = ap.Runtime()
        second.add_model("m", model=echo, cores=1, isolation="exclusive")
        with pytest.warns(ap.PinningWarning):
            second.start()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said already: not again at every plan change
            second.add_model("shared", model=echo)
            second.remove_model("shared")
        second.close()
        # A factory that fails at start: its error is raised, not the warning, even when
        # warnings are errors, and the runtime's records stay whole.
        third = ap.Runtime()
        third.add_model("m", model=echo, cores=1, isolation="exclusive")

        def broken(ctx: Any) -> Any:
            raise RuntimeError("no weights")

        third.add_model("f1", factory=broken)
        third.add_model("f2", factory=broken)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ap.PinningWarning)
            with pytest.raises(Exception, match="no weights"):
                third.start()
        assert third.models == ["m"] and sorted(m.name for m in third.plan().models) == ["m"]
        third.close()
    finally:
        first.close()
