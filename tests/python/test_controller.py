"""The online controller: its decisions from synthetic windows (no timing), and one short run
beside a real runtime."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import apportion as ap
from apportion.controller import Controller, Window, within
from apportion.errors import QuotaError
from apportion.tune import CostModel


def win(*, p99: float = 5.0, busy: float = 0.5, refused: int = 0, instances: int = 1, rate: float = 100.0,
        batch: float = 1.0) -> Window:
    """A one-second window with the given p99, utilisation and refusals."""
    completed = int(rate)
    cost_ms = busy * instances / max(completed, 1) * 1e3 * batch
    return Window(seconds=1.0, arrivals=int(rate), completed=completed, refused=refused, p99_ms=p99,
                  queue_wait_p99_ms=0.0, compute_ms=cost_ms, mean_batch=batch, instances=instances)


def spec(name: str, instances: int = 1, **kw: Any) -> ap.ModelSpec:
    return ap.ModelSpec(name, model=lambda x: x, instances=instances, **kw)


def controller(**kw: Any) -> Controller:
    args: dict[str, Any] = {"capacity": 4, "confirm": 2, "dwell_s": 5.0, "window_s": 1.0, "batchable": True}
    args.update(kw)
    return Controller(None, {"a": 50.0, "b": 50.0}, **args)


def test_window_figures() -> None:
    w = win(busy=0.5, instances=2, rate=100.0)
    assert w.rate == 100.0
    assert w.busy == pytest.approx(0.5)
    assert w.needed(0.5) == 2
    assert Window(1.0, 0, 0, 0, 0.0, 0.0, 0.0, 1.0, 1).needed(0.7) == 1


def test_a_window_counts_the_completions_within_the_slo_from_the_histogram() -> None:
    def model(ms: float) -> float:
        time.sleep(ms / 1e3)
        return ms

    with ap.Runtime() as rt:
        rt.add_model("m", model=model)
        rt.start()
        before = rt.stats()["m"]
        # 1 ms calls against a 100 ms objective: within it but for a stall of 99 ms.
        for ms in [1.0] * 10 + [200.0] * 3:
            rt.call("m", ms)
        after = rt.stats()["m"]
    hist = after.end_to_end.since(before.end_to_end).histogram
    assert hist is not None
    assert (within(hist, 0), within(hist, 100e6), within(hist, 1e10)) == (0, 10, 13)
    w = Window.between(before, after, 1.0, slo_ms=100.0)
    assert (w.completed, w.good) == (13, 10)
    assert Window.between(before, after, 1.0).good is None, "no SLO: not known"


def test_a_model_at_risk_for_confirm_windows_grows_into_free_capacity() -> None:
    c = controller()
    specs = {"a": spec("a", 1), "b": spec("b", 1)}
    risky = {"a": win(p99=45.0), "b": win(p99=5.0)}
    assert c.decide(risky, specs, 1.0) == [], "one window is not enough (hysteresis)"
    moves = c.decide(risky, specs, 2.0)
    assert [(m.model, m.change) for m in moves] == [("a", "instances 1 -> 2")]
    assert "SLO at risk" in moves[0].reason and "free capacity" in moves[0].reason
    assert moves[0].spec.instances == 2


def test_a_risky_window_between_calm_ones_moves_nothing() -> None:
    c = controller()
    specs = {"a": spec("a", 1), "b": spec("b", 1)}
    for t, p99 in enumerate([45.0, 5.0, 45.0, 5.0, 45.0]):
        assert c.decide({"a": win(p99=p99), "b": win()}, specs, float(t)) == []


def test_refusals_and_hot_instances_count_as_risk() -> None:
    for w in (win(refused=3), win(busy=0.95)):
        c = controller(confirm=1)
        moves = c.decide({"a": w, "b": win()}, {"a": spec("a"), "b": spec("b")}, 0.0)
        assert [m.model for m in moves] == ["a"]


def test_with_no_free_capacity_an_idle_model_gives_an_instance_first() -> None:
    c = controller(capacity=4, confirm=1)
    specs = {"a": spec("a", 1), "b": spec("b", 3)}
    moves = c.decide({"a": win(p99=60.0), "b": win(busy=0.1, p99=2.0, instances=3)}, specs, 0.0)
    assert [(m.model, m.change) for m in moves] == [("b", "instances 3 -> 2"), ("a", "instances 1 -> 2")]
    assert "gives an instance to 'a'" in moves[0].reason and "taken from 'b'" in moves[1].reason


def test_a_moved_model_dwells_before_it_moves_again() -> None:
    c = controller(confirm=1, dwell_s=5.0)
    specs = {"a": spec("a", 1), "b": spec("b", 1)}
    risky = {"a": win(p99=60.0), "b": win()}
    assert len(c.decide(risky, specs, 0.0)) == 1
    specs["a"] = spec("a", 2)
    assert c.decide(risky, specs, 4.9) == []
    assert [m.change for m in c.decide(risky, specs, 5.0)] == ["instances 2 -> 3"]


def test_an_idle_model_whose_admission_comes_back_gives_no_instance_in_the_same_window() -> None:
    # Both were proposed at once ("max_queue 4 -> 64" and "instances 2 -> 1" for 'b'): the
    # runtime refused the whole set (a model named twice in one apply), and both kinds of move
    # went tabu.
    c = controller(capacity=3, confirm=1, dwell_s=0.0, batchable=False)
    specs = {"a": spec("a", 1, max_queue=8), "b": spec("b", 2, max_queue=4)}
    c._full_queue["b"] = 64  # the controller lowered b's bound earlier
    windows = {"a": win(p99=49.0, busy=0.95, rate=800.0), "b": win(p99=1.0, busy=0.05, rate=10.0, instances=2)}
    moves = c.decide(windows, specs, 10.0)
    assert [(m.model, m.change) for m in moves] == [("b", "max_queue 4 -> 64")]
    assert "no idle model to take from" in c.held["a"][2]
    # The next window it gives the instance (from its spec with the bound restored).
    specs["b"] = moves[0].spec
    moves = c.decide(windows, specs, 11.0)
    assert [(m.model, m.change) for m in moves] == [("b", "instances 2 -> 1"), ("a", "instances 1 -> 2")]
    assert moves[0].spec.max_queue == 64


def test_without_capacity_to_take_it_batches_then_limits_admission_then_restores_it() -> None:
    c = controller(capacity=2, confirm=1, dwell_s=0.0)
    specs = {"a": spec("a", 1, max_queue=256), "b": spec("b", 1)}
    busy_b = win(busy=0.6)  # neither idle nor at risk: gives nothing
    moves = c.decide({"a": win(p99=80.0), "b": busy_b}, specs, 0.0)
    assert [m.change for m in moves] == ["batching off -> 8"]
    specs["a"] = moves[0].spec
    moves = c.decide({"a": win(p99=80.0, busy=0.9, rate=200.0, batch=4.0), "b": busy_b}, specs, 1.0)
    assert len(moves) == 1 and moves[0].change.startswith("max_queue 256 -> ")
    assert "refuse what would miss the SLO" in moves[0].reason
    lowered = moves[0].spec.max_queue
    assert 1 <= lowered < 256
    specs["a"] = moves[0].spec
    moves = c.decide({"a": win(p99=3.0, busy=0.1), "b": busy_b}, specs, 2.0)
    assert [(m.model, m.change) for m in moves] == [("a", f"max_queue {lowered} -> 256")]
    assert "idle" in moves[0].reason


def test_a_model_whose_calls_are_full_batches_gets_bigger_ones_once_per_size_then_admission() -> None:
    c = controller(capacity=2, confirm=1, dwell_s=0.0, max_batch_size=16)
    specs = {"a": spec("a", 1, max_queue=256, batching=ap.Batching(8, 1.0)), "b": spec("b", 1)}
    busy_b = win(busy=0.6)
    partial = c.decide({"a": win(p99=80.0, busy=0.9, rate=200.0, batch=4.0), "b": busy_b}, specs, 0.0)
    assert [m.change for m in partial][0].startswith("max_queue 256 -> ")  # half-full calls: no bigger batch
    c = controller(capacity=2, confirm=1, dwell_s=0.0, max_batch_size=16)
    full = win(p99=80.0, busy=0.95, rate=800.0, batch=7.6)
    moves = c.decide({"a": full, "b": busy_b}, specs, 0.0)
    assert [m.change for m in moves] == ["batch 8 -> 16"]
    assert "calls full (mean batch 7.6)" in moves[0].reason
    assert moves[0].spec.batching == ap.Batching(16, 1.0) and moves[0].spec.max_queue == 256
    specs["a"] = moves[0].spec
    full16 = win(p99=80.0, busy=0.95, rate=800.0, batch=15.0)
    moves = c.decide({"a": full16, "b": busy_b}, specs, 1.0)
    assert moves[0].change.startswith("max_queue 256 -> ")  # 32 is beyond max_batch_size
    specs["a"] = moves[0].spec
    specs["a"] = ap.ModelSpec("a", model=lambda x: x, max_queue=256, batching=ap.Batching(8, 1.0))  # moved back
    moves = c.decide({"a": full, "b": busy_b}, specs, 2.0)
    assert moves[0].change.startswith("max_queue 256 -> ")  # 16 was tried once: not again


def test_a_cost_model_that_says_a_bigger_batch_saves_little_holds_the_batch_move() -> None:
    # conv-like: 0.23 ms a call and 0.93 ms a request; a batch of 16 saves ~1.5% against 8.
    flat = CostModel(alpha_ms=0.23, beta_ms=0.93)
    c = controller(capacity=2, confirm=1, dwell_s=0.0, max_batch_size=16, costs={"a": flat})
    # max_queue 16: at most what the SLO allows (~21), so no admission move either: held.
    specs = {"a": spec("a", 1, max_queue=16, batching=ap.Batching(8, 1.0)), "b": spec("b", 1)}
    full = win(p99=80.0, busy=0.95, rate=800.0, batch=7.6)
    assert c.decide({"a": full, "b": win(busy=0.6)}, specs, 0.0) == []
    assert "its cost model says batch 16 saves 1.5% a request against 8" in c.held["a"][2]
    # A call's fixed part the larger batch shares: 4 ms a call, 0.5 a request (8 -> 16: 25% less).
    c = controller(capacity=2, confirm=1, dwell_s=0.0, max_batch_size=16, costs={"a": CostModel(4.0, 0.5)})
    moves = c.decide({"a": full, "b": win(busy=0.6)}, specs, 0.0)
    assert [m.change for m in moves] == ["batch 8 -> 16"]
    assert moves[0].reason.endswith("(its cost model: 25.0% less a request)")
    # Switching batching on is asked of the cost model too (1 -> 8 saves ~17% for 'flat').
    off = {"a": spec("a", 1, max_queue=4), "b": spec("b", 1)}
    c = controller(capacity=2, confirm=1, dwell_s=0.0, max_batch=8, costs={"a": CostModel(0.02, 0.93)})
    assert c.decide({"a": win(p99=80.0), "b": win(busy=0.6)}, off, 0.0) == []
    assert "its cost model says a batch of 8 saves 1.8% a request" in c.held["a"][2]
    c = controller(capacity=2, confirm=1, dwell_s=0.0, max_batch=8, costs={"a": flat})
    moves = c.decide({"a": win(p99=80.0), "b": win(busy=0.6)}, off, 0.0)
    assert [m.change for m in moves] == ["batching off -> 8"] and "17.3% less a request" in moves[0].reason
    # A cost model fitted from one batch size says nothing about batching: the move is tried.
    c = controller(capacity=2, confirm=1, dwell_s=0.0, max_batch_size=16,
                   costs={"a": CostModel(0.0, 1.0, batchable=False)})
    moves = c.decide({"a": full, "b": win(busy=0.6)}, specs, 0.0)
    assert [m.change for m in moves] == ["batch 8 -> 16"] and "cost model" not in moves[0].reason


def test_a_batching_move_waits_while_the_load_moves() -> None:
    c = controller(capacity=2, confirm=1, dwell_s=0.0, max_batch_size=16)
    # max_queue 64, above what the SLO allows: the model waits rather than take the admission
    # move that comes after batching (its trial could not judge that one either).
    specs = {"a": spec("a", 1, max_queue=64, batching=ap.Batching(8, 1.0)), "b": spec("b", 1)}
    full = win(p99=80.0, busy=0.95, rate=800.0, batch=7.6)
    assert c.decide({"a": full, "b": win(busy=0.6)}, specs, 0.0, load_held=False) == []
    assert "the load is moving: a batching move waits for it to hold" in c.held["a"][2]
    moves = c.decide({"a": full, "b": win(busy=0.6)}, specs, 1.0)
    assert [m.change for m in moves] == ["batch 8 -> 16"]  # the size was not spent while it waited
    # The same for switching batching on; a model that could not batch anyway is not told so.
    off = {"a": spec("a", 1, max_queue=4), "b": spec("b", 1)}
    c = controller(capacity=2, confirm=1, dwell_s=0.0)
    c.decide({"a": win(p99=80.0), "b": win(busy=0.6)}, off, 0.0, load_held=False)
    assert "the load is moving" in c.held["a"][2]
    c = controller(capacity=2, confirm=1, dwell_s=0.0, batchable=False)
    c.decide({"a": win(p99=80.0), "b": win(busy=0.6)}, off, 0.0, load_held=False)
    assert "the load is moving" not in c.held["a"][2] and "not batchable" in c.held["a"][2]


def test_the_load_held_over_the_windows_a_move_would_be_judged_against() -> None:
    c = controller(judge=3)
    assert c.load_held()  # no window: nothing says the load moved
    for t in range(3):
        c.history.append((float(t), {"a": win(rate=100.0), "b": win(rate=100.0)}))
    assert c.load_held()
    c.history.append((3.0, {"a": win(rate=100.0), "b": win(rate=300.0)}))  # b's rate tripled
    assert not c.load_held()
    c.history.append((4.0, {"a": win(rate=100.0), "b": win(rate=300.0)}))
    assert not c.load_held()  # against (100 + 300) / 2
    c.history.append((5.0, {"a": win(rate=100.0), "b": win(rate=300.0)}))
    assert c.load_held()  # the judge - 1 windows before it had the new load too
    c.history.append((6.0, {"a": win(rate=115.0), "b": win(rate=260.0)}))  # within MIX_MOVED
    assert c.load_held()
    one = controller(judge=1)
    one.history.extend(list(c.history))
    assert one.load_held()
    one.history.append((7.0, {"a": win(rate=100.0), "b": win(rate=100.0)}))
    assert not one.load_held()  # judge 1: against the window before it


def test_admission_is_lowered_only_while_the_latency_is_at_risk_and_raised_while_it_has_room() -> None:
    c = controller(capacity=2, confirm=1, dwell_s=0.0)
    specs = {"a": spec("a", 1, max_queue=4, batching=ap.Batching(8, 1.0)), "b": spec("b", 1)}
    busy_b = win(p99=30.0, busy=0.6)  # within its SLO without room to spare: no share to take from it
    # Busy and refusing with p99 at 40% of the SLO: a bound planned for a lower rate. 1.125 ms
    # of instance time per request: 50 ms x 0.5 allows 22 queued; at most 4x per move.
    roomy = win(p99=20.0, busy=0.9, refused=30, rate=800.0, batch=4.0)
    sizes = {"a": 64, "b": 64}
    moves = c.decide({"a": roomy, "b": busy_b}, specs, 0.0, queue_sizes=sizes)
    assert [(m.model, m.change) for m in moves] == [("a", "max_queue 4 -> 16")]
    assert "latency has room: admit what the SLO allows" in moves[0].reason
    specs["a"] = moves[0].spec
    moves = c.decide({"a": roomy, "b": busy_b}, specs, 1.0, queue_sizes=sizes)
    assert [m.change for m in moves] == ["max_queue 16 -> 22"]
    specs["a"] = moves[0].spec
    assert c.decide({"a": roomy, "b": busy_b}, specs, 2.0, queue_sizes=sizes) == []  # what the SLO allows
    # Late at the same cost: the bound already is what the SLO allows, so nothing flaps back.
    late = win(p99=45.0, busy=0.9, refused=30, rate=800.0, batch=4.0)
    assert c.decide({"a": late, "b": busy_b}, specs, 3.0, queue_sizes=sizes) == []
    # Never beyond the model's queue; without the sizes, never beyond the bound it was given.
    c = controller(capacity=2, confirm=1, dwell_s=0.0)
    small = {**specs, "a": spec("a", 1, max_queue=4, batching=ap.Batching(8, 1.0))}
    moves = c.decide({"a": roomy, "b": busy_b}, small, 0.0, queue_sizes={"a": 10})
    assert [m.change for m in moves] == ["max_queue 4 -> 10"]
    assert c.decide({"a": roomy, "b": busy_b}, small, 1.0) == []
    # Busy and refusing with room, but no more than the bound allows: never lowered.
    c = controller(capacity=2, confirm=1, dwell_s=0.0)
    wide = {**specs, "a": spec("a", 1, max_queue=256, batching=ap.Batching(8, 1.0))}
    assert c.decide({"a": roomy, "b": busy_b}, wide, 0.0) == []
    # Late: lowered to what the SLO allows, but never below one full batch; and never for
    # admission by deadline, which refuses each request that would miss on its own.
    slow = win(p99=45.0, busy=0.9, refused=30, rate=100.0, batch=4.0)  # 9 ms per request: allows 2
    c = controller(capacity=2, confirm=1, dwell_s=0.0)
    moves = c.decide({"a": slow, "b": busy_b}, {**specs, "a": spec("a", 1, max_queue=64, batching=ap.Batching(8, 1.0))},
                     0.0, queue_sizes=sizes)
    assert [m.change for m in moves] == ["max_queue 64 -> 8"]
    c = controller(capacity=2, confirm=1, dwell_s=0.0)
    by_deadline = spec("a", 1, max_queue=64, batching=ap.Batching(8, 1.0), admission="deadline", timeout_ms=50.0)
    assert c.decide({"a": slow, "b": busy_b}, {**specs, "a": by_deadline}, 0.0, queue_sizes=sizes) == []
    # A bound below one batch, with latency to spare, is raised to a batch at least.
    c = controller(capacity=2, confirm=1, dwell_s=0.0)
    tiny = win(p99=10.0, busy=0.9, refused=30, rate=100.0, batch=1.0)  # 9 ms per request: allows 2
    moves = c.decide({"a": tiny, "b": busy_b}, {**specs, "a": spec("a", 1, max_queue=1, batching=ap.Batching(8, 1.0))},
                     0.0, queue_sizes=sizes)
    assert [m.change for m in moves] == ["max_queue 1 -> 4"]  # at most 4x per move
    # A model that refuses nothing has its bound left alone however fast it runs.
    c = controller(capacity=2, confirm=1, dwell_s=0.0)
    hot = win(p99=20.0, busy=0.95, rate=800.0, batch=4.0)
    assert c.decide({"a": hot, "b": busy_b}, specs | {"a": spec("a", 1, max_queue=4, batching=ap.Batching(8, 1.0))},
                    0.0) == []
    # A raise by less than a quarter of the bound is not worth its trial and dwell: 20 -> 22 is
    # not made, 17 -> 22 is.
    c = controller(capacity=2, confirm=1, dwell_s=0.0)
    near = specs | {"a": spec("a", 1, max_queue=20, batching=ap.Batching(8, 1.0))}
    assert c.decide({"a": roomy, "b": busy_b}, near, 0.0, queue_sizes=sizes) == []
    assert "a raise to 22 would admit too few more" in c.held["a"][2]
    near = specs | {"a": spec("a", 1, max_queue=17, batching=ap.Batching(8, 1.0))}
    assert [m.change for m in c.decide({"a": roomy, "b": busy_b}, near, 1.0, queue_sizes=sizes)] == ["max_queue 17 -> 22"]


def test_models_without_an_slo_are_left_alone() -> None:
    c = Controller(None, {"a": 50.0}, capacity=4, confirm=1)
    moves = c.decide({"a": win(), "x": win(p99=500.0)}, {"a": spec("a"), "x": spec("x")}, 0.0)
    assert moves == []


def test_a_saturated_shared_model_grows_into_idle_cpu_time_beyond_the_nominal_capacity() -> None:
    # Three shared models on two CPUs hold three instances: no nominal capacity is left, yet
    # the pool's CPUs sat idle while "a" had every instance busy.
    specs = {"a": spec("a", 1, batching=ap.Batching(8, 1.0)), "b": spec("b", 1), "c": spec("c", 1)}
    hot = {"a": win(p99=60.0, busy=1.1), "b": win(busy=0.4), "c": win(busy=0.2)}
    c = controller(capacity=2, confirm=1)
    moves = c.decide(hot, specs, 0.0, idle_cpus=0.8)
    assert [(m.model, m.change) for m in moves] == [("a", "instances 1 -> 2")]
    assert "0.8 of the pool's CPUs sat idle" in moves[0].reason
    # A quarter of a CPU idle is room (the default headroom): a saturated single instance
    # cannot reach the idle time on the other CPU, a second one can.
    moves = controller(capacity=2, confirm=1).decide(hot, specs, 0.0, idle_cpus=0.3)
    assert [(m.model, m.change) for m in moves] == [("a", "instances 1 -> 2")]
    # Too little idle time, idle time unknown, or instances not all busy: admission instead.
    for idle, busy in ((0.2, 1.1), (None, 1.1), (0.8, 0.5)):
        c = controller(capacity=2, confirm=1)
        moves = c.decide({**hot, "a": win(p99=60.0, busy=busy)}, specs, 0.0, idle_cpus=idle)
        assert [m.change.split(" ")[0] for m in moves] == ["max_queue"], (idle, busy)
    # Never past oversubscribe x capacity instances in all.
    c = controller(capacity=2, confirm=1, oversubscribe=1.5)
    moves = c.decide(hot, specs, 0.0, idle_cpus=1.5)
    assert [m.change.split(" ")[0] for m in moves] == ["max_queue"]
    # A model with cores of its own grows only into cores, not into idle time of the pool.
    excl = {**specs, "a": spec("a", 1, cores=1, isolation="exclusive", batching=ap.Batching(8, 1.0))}
    c = controller(capacity=2, confirm=1)
    moves = c.decide(hot, excl, 0.0, fits=lambda s: sum(_s.instances for _s in s.values()) <= 3, idle_cpus=1.5)
    assert [m.change.split(" ")[0] for m in moves] == ["max_queue"]


def test_a_refusing_shared_model_takes_a_larger_share_of_a_saturated_pool_from_roomy_neighbours() -> None:
    # Three shared models on two CPUs, no CPU time idle: "a" turns requests away with every
    # instance busy and its calls not full batches, "b" and "c" keep their p99 far under their
    # SLOs. One more instance of "a" gets it more of the pool's CPUs (the OS divides them by
    # runnable threads), out of "b"'s and "c"'s.
    specs = {"a": spec("a", 1, batching=ap.Batching(8, 1.0)), "b": spec("b", 1), "c": spec("c", 1)}
    slos = {"a": 50.0, "b": 50.0, "c": 40.0}
    hot = win(p99=30.0, busy=1.1, refused=20, batch=2.0)
    roomy = {"a": hot, "b": win(p99=10.0, busy=0.6), "c": win(p99=5.0, busy=0.3)}

    def ctl(**kw: Any) -> Controller:
        return Controller(None, slos, **{"capacity": 2, "confirm": 1, "dwell_s": 0.0, "batchable": True, **kw})

    c = ctl()
    moves = c.decide(roomy, specs, 0.0, idle_cpus=0.0)
    assert [(m.model, m.change) for m in moves] == [("a", "instances 1 -> 2")]
    assert "a larger share" in moves[0].reason
    assert "b p99 10.0 of 50 ms, c p99 5.0 of 40 ms" in moves[0].reason
    assert moves[0].spec.instances == 2
    # A neighbour without latency to spare (p99 at half its SLO or more, refusing, stalled, a
    # call running half its SLO) holds it.
    for b in (win(p99=25.0, busy=0.6), win(p99=10.0, busy=0.6, refused=1),
              dataclasses.replace(win(p99=10.0, busy=0.6), completed=0, queued=3),
              dataclasses.replace(win(p99=10.0, busy=0.6), oldest_call_ms=30.0)):
        c = ctl()
        moves = c.decide({**roomy, "b": b}, specs, 0.0, idle_cpus=0.0)
        assert all("a larger share" not in m.reason for m in moves), b
        if not moves:  # (a refusing or stalled "b" is at risk itself, and may be moved first)
            assert "no neighbour in the pool has latency to spare" in c.held["a"][2], b
    # No neighbour in the pool at all: nothing to take a share from.
    c = ctl(capacity=1)
    assert c.decide({"a": hot}, {"a": specs["a"]}, 0.0, idle_cpus=0.0) == []
    assert "no neighbour in the pool has latency to spare" in c.held["a"][2]
    # A model that refuses nothing, or whose instances are not all busy, is not grown this way.
    for a in (win(p99=30.0, busy=1.1, batch=2.0), win(p99=30.0, busy=0.7, refused=20, batch=2.0)):
        c = ctl()
        moves = c.decide({**roomy, "a": a}, specs, 0.0, idle_cpus=0.0)
        assert all(m.change != "instances 1 -> 2" for m in moves), a
    # The pool's busy threads (each neighbour's instances by the share it used) bound it:
    # 1 + 0.6 + 0.3 busy, one more would be 2.9 of at most 2 x 1.
    c = ctl(oversubscribe=1.0)
    assert c.decide(roomy, specs, 0.0, idle_cpus=0.0) == []
    assert "1.9 busy threads in the pool: one more instance passes 2 (oversubscribe x its CPUs)" in c.held["a"][2]
    # ... of the pool's CPUs where they are known: a pool of one CPU (the other a model's own)
    # takes oversubscribe 2 x 1 CPU busy threads at most.
    c = ctl(oversubscribe=2.0)
    assert c.decide(roomy, specs, 0.0, idle_cpus=0.0, pool_cpus=1) == []
    assert "one more instance passes 2 " in c.held["a"][2]
    # Neighbours count by the share of their instances they used: three instances of "b"
    # busy 35% of the time are ~1 busy thread, which leaves room for one more of "a".
    many = specs | {"b": spec("b", 3)}
    c = ctl(oversubscribe=2.0)
    moves = c.decide({**roomy, "b": win(p99=10.0, busy=0.35, instances=3)}, many, 0.0, idle_cpus=0.0)
    assert [(m.model, m.change) for m in moves] == [("a", "instances 1 -> 2")]
    # Neighbours that keep under half a thread busy between them leave no share to take: the
    # pool's CPUs are "a"'s already.
    c = ctl()
    assert c.decide({**roomy, "b": win(p99=10.0, busy=0.2), "c": win(p99=5.0, busy=0.1)}, specs, 0.0,
                    idle_cpus=0.0) == []
    assert "its neighbours in the pool keep 0.3 threads busy: no share to take" in c.held["a"][2]
    # Its threads' CPU time, where read: one more thread helps while each runs most of a CPU
    # (one thread can use one CPU); at 0.5 of a CPU each its threads wait for CPU time the
    # neighbours use for their own load, which a thread more does not get it.
    # (Where it is not read, as in the windows above, the move is made without it.)
    c = ctl()
    moves = c.decide({**roomy, "a": dataclasses.replace(hot, pool_cpu_s=0.7)}, specs, 0.0, idle_cpus=0.0)
    assert [(m.model, m.change) for m in moves] == [("a", "instances 1 -> 2")]  # target: 0.7
    c = ctl()
    assert c.decide({**roomy, "a": dataclasses.replace(hot, pool_cpu_s=0.69)}, specs, 0.0, idle_cpus=0.0) == []
    assert "its 1 threads used 0.69 of a CPU each (under 0.7)" in c.held["a"][2]
    two = specs | {"a": spec("a", 2, batching=ap.Batching(8, 1.0))}
    c = ctl(capacity=3)
    hot2 = dataclasses.replace(win(p99=30.0, busy=1.1, refused=20, batch=2.0, instances=2), pool_cpu_s=1.0)
    assert c.decide({**roomy, "a": hot2}, two, 0.0, idle_cpus=0.0) == []
    assert "its 2 threads used 0.50 of a CPU each (under 0.7) and other processes kept an unknown share of the " \
        "pool's CPUs busy: no sign that a thread more would get it more CPU time" in c.held["a"][2]
    # ... unless other processes keep headroom (0.25) of the pool's CPUs busy: the OS shares
    # the CPUs out by thread, and a thread more takes its share from them.
    c = ctl(capacity=3)
    moves = c.decide({**roomy, "a": hot2}, two, 0.0, idle_cpus=0.0, outside_cpus=0.25)
    assert [(m.model, m.change) for m in moves] == [("a", "instances 2 -> 3")]
    c = ctl(capacity=3)
    assert c.decide({**roomy, "a": hot2}, two, 0.0, idle_cpus=0.0, outside_cpus=0.24) == []
    assert "and other processes kept 0.24 of the pool's CPUs busy" in c.held["a"][2]
    # On a scheduled pool the runtime, not the OS, divides the units: no share to take.
    c = ctl()
    c.release = False
    assert c.decide(roomy, specs, 0.0, idle_cpus=0.0) == []
    # A model with cores of its own is not in the pool.
    excl = specs | {"a": spec("a", 1, cores=1, isolation="exclusive", batching=ap.Batching(8, 1.0))}
    c = ctl()
    assert all(m.change != "instances 1 -> 2" for m in c.decide(roomy, excl, 0.0, idle_cpus=0.0))


def gives_nothing_in_its_dwell_nor_given_back_lately(ctl: Any, windows: dict[str, Window],
                                                     specs: dict[str, ap.ModelSpec], donor: str,
                                                     pool_cpus: int) -> None:
    """A donor that would give (``windows``) gives nothing while in its dwell (moved at 0 s,
    dwell 5 s) nor while its shrinking is held after an undo."""
    c = ctl(dwell_s=5.0)
    c._last_move[donor] = 0.0
    assert all(m.model != donor for m in c.decide(windows, specs, 1.0, idle_cpus=0.0, pool_cpus=pool_cpus))
    c = ctl()
    c._tabu[(donor, "shrink")] = 100.0
    assert all(m.model != donor for m in c.decide(windows, specs, 1.0, idle_cpus=0.0, pool_cpus=pool_cpus))


def test_a_pool_neighbour_whose_threads_use_little_cpu_gives_an_instance_to_a_model_that_refuses() -> None:
    # "m" has two instances on the pool whose calls read 60% busy (wall time, stretched while
    # its threads wait for the pool's CPUs: not idle) but whose threads used 0.3 CPUs, latency
    # to spare; "a" turns requests away with every instance busy. One thread of "m" serves its
    # load: it gives the other to "a".
    specs = {"a": spec("a", 2, batching=ap.Batching(8, 1.0)), "m": spec("m", 2)}
    slos = {"a": 75.0, "m": 50.0}
    hot = win(p99=60.0, busy=1.1, refused=50, batch=2.0, instances=2)
    light = dataclasses.replace(win(p99=10.0, busy=0.6, instances=2), pool_cpu_s=0.3)

    def ctl(**kw: Any) -> Controller:
        return Controller(None, slos, **{"capacity": 2, "confirm": 1, "dwell_s": 0.0, **kw})

    moves = ctl().decide({"a": hot, "m": light}, specs, 0.0, idle_cpus=0.0, pool_cpus=2)
    assert [(m.model, m.change) for m in moves] == [("m", "instances 2 -> 1"), ("a", "instances 2 -> 3")]
    assert "spare: its threads used 0.30 CPUs, with latency to spare: gives an instance to 'a'" in moves[0].reason
    assert "taken from 'm'" in moves[1].reason
    # Not when one instance fewer would run past target (0.7 CPUs on one thread), its latency
    # has no room, its CPU time is not known, it is down to one instance, the model that needs
    # it refuses nothing, or on a scheduled pool.
    one = specs | {"m": spec("m", 1)}
    for a, m, sp, release in (
            (hot, dataclasses.replace(light, pool_cpu_s=0.75), specs, True),
            (hot, dataclasses.replace(light, p99_ms=30.0), specs, True),
            (hot, dataclasses.replace(light, pool_cpu_s=None), specs, True),
            (hot, dataclasses.replace(light, instances=1), one, True),
            # two instances of two threads each: its calls queue per instance, not per thread
            (hot, dataclasses.replace(light, pool_cpu_s=0.9), specs | {"m": spec("m", 2, threads=2)}, True),
            (hot, dataclasses.replace(light, instances=1), specs | {"m": spec("m", 1, threads=4)}, True),
            (dataclasses.replace(hot, refused=0), light, specs, True),
            (hot, light, specs, False)):
        c = ctl()
        c.release = release
        moves = c.decide({"a": a, "m": m}, sp, 0.0, idle_cpus=0.0, pool_cpus=2)
        assert all(mv.model != "m" for mv in moves), (a, m, release)
    # Latency to spare for confirm windows in a row, out of its dwell, not given back lately.
    c = ctl(confirm=2)
    assert c.decide({"a": hot, "m": dataclasses.replace(light, p99_ms=30.0)}, specs, 0.0, idle_cpus=0.0,
                    pool_cpus=2) == []
    assert all(mv.model != "m" for mv in c.decide({"a": hot, "m": light}, specs, 1.0, idle_cpus=0.0, pool_cpus=2))
    c = ctl(confirm=2)
    assert c.decide({"a": hot, "m": light}, specs, 0.0, idle_cpus=0.0, pool_cpus=2) == []
    assert [mv.model for mv in c.decide({"a": hot, "m": light}, specs, 1.0, idle_cpus=0.0, pool_cpus=2)] == ["m", "a"]
    gives_nothing_in_its_dwell_nor_given_back_lately(ctl, {"a": hot, "m": light}, specs, "m", pool_cpus=2)
    # An instance more for "a" undone lately (a thread added to the pool) does not hold a swap
    # of one thread for another; for a model of several threads an instance, it does.
    c = ctl()
    c._tabu[("a", "grow")] = 100.0
    moves = c.decide({"a": hot, "m": light}, specs, 1.0, idle_cpus=0.0, pool_cpus=2)
    assert [(mv.model, mv.change) for mv in moves] == [("m", "instances 2 -> 1"), ("a", "instances 2 -> 3")]
    # A swap undone holds the receiving model's swaps from every donor, not only that one's.
    three = specs | {"n": spec("n", 2)}
    slos3 = {"a": 75.0, "m": 50.0, "n": 50.0}
    c = Controller(None, slos3, capacity=2, confirm=1, dwell_s=0.0, judge=1)
    windows = {"a": hot, "m": light, "n": light}
    moves = c.decide(windows, three, 0.0, idle_cpus=0.0, pool_cpus=2)
    assert [(mv.model, mv.change) for mv in moves] == [("m", "instances 2 -> 1"), ("a", "instances 2 -> 3")]
    c.trial(moves, three, [windows])
    worse = {**windows, "a": dataclasses.replace(hot, completed=20)}  # served 73% of arrivals, against 100%
    undo = c.verdict(worse, 1.0)
    assert undo is not None and [(mv.model, mv.undo) for mv in undo] == [("m", True), ("a", True)]
    assert c._tabu[("a", "swap")] == c._tabu[("m", "shrink")] == 1.0 + c.tabu_s
    assert c._gave == {}  # the swap undone: nothing given to take back
    later = c.decide(windows, three, 2.0, idle_cpus=0.0, pool_cpus=2)
    assert all(mv.model not in ("m", "n") for mv in later), later  # 'n' could give, and does not
    c = ctl(capacity=4)
    c._tabu[("a", "grow")] = 100.0
    wide = specs | {"a": spec("a", 2, threads=2, batching=ap.Batching(8, 1.0))}
    assert all(mv.model != "m" for mv in c.decide({"a": hot, "m": light}, wide, 1.0, idle_cpus=0.0, pool_cpus=2))


def test_a_model_that_takes_back_an_instance_it_gave_in_a_swap_gives_none_for_a_while() -> None:
    # On a saturated pool each model's threads read spare whenever its latency has room: "m"
    # gives "a" an instance, then needs it back and takes it, and would give it again. It takes
    # it back once; then its giving is held for tabu_s, and "a" stays at risk without it (its
    # threads use half a CPU each: no larger share of the pool either).
    hot = dataclasses.replace(win(p99=60.0, busy=1.1, refused=50, instances=2), pool_cpu_s=1.0)
    light = dataclasses.replace(win(p99=10.0, busy=0.6, instances=2), pool_cpu_s=0.3)
    c = Controller(None, {"a": 75.0, "m": 50.0}, capacity=2, confirm=1, dwell_s=0.0, tabu_s=30.0)
    specs = {"a": spec("a", 2), "m": spec("m", 2)}
    moves = c.decide({"a": hot, "m": light}, specs, 0.0, idle_cpus=0.0, pool_cpus=2)
    assert [(m.model, m.change) for m in moves] == [("m", "instances 2 -> 1"), ("a", "instances 2 -> 3")]
    specs = {m.model: m.spec for m in moves}
    back = c.decide({"a": dataclasses.replace(light, instances=3), "m": dataclasses.replace(hot, instances=1)},
                    specs, 3.0, idle_cpus=0.0, pool_cpus=2)
    assert [(m.model, m.change) for m in back] == [("a", "instances 3 -> 2"), ("m", "instances 1 -> 2")]
    assert c.stats()["tabu"] == {"m shrink": 33.0}
    assert c._gave == {"m": ("a", 0.0), "a": ("m", 3.0)}
    specs = {m.model: m.spec for m in back}
    again = c.decide({"a": hot, "m": light}, specs, 6.0, idle_cpus=0.0, pool_cpus=2)
    assert all(m.model != "m" for m in again), again
    assert again == [] and c.held["a"][0] == 6.0, (again, c.held)
    # Past tabu_s it may give again; and a swap from another donor, or to another receiver, is
    # no taking back.
    assert [m.model for m in c.decide({"a": hot, "m": light}, specs, 34.0, idle_cpus=0.0, pool_cpus=2)] == ["m", "a"]
    # A model added again under a name forgets what it gave and what was given to it.
    c._forget("a")
    assert c._gave == {}
    three = {"a": spec("a", 2), "m": spec("m", 2), "n": spec("n", 1)}
    c = Controller(None, {"a": 75.0, "m": 50.0, "n": 50.0}, capacity=2, confirm=1, dwell_s=0.0)
    c._gave["m"] = ("n", 0.0)  # "m" gave "n" an instance, not "a"
    moves = c.decide({"a": dataclasses.replace(light, instances=2), "m": dataclasses.replace(hot, instances=2),
                      "n": dataclasses.replace(light, instances=1)}, three, 1.0, idle_cpus=0.0, pool_cpus=2)
    assert [(m.model, m.change) for m in moves] == [("a", "instances 2 -> 1"), ("m", "instances 2 -> 3")]
    assert c.stats()["tabu"] == {}


def test_the_receivers_of_a_swap_are_the_moved_models_but_its_donor() -> None:
    from apportion.controller import RESTORED, SPARE, Move, _swap_receivers

    s = spec("m", 1)
    donor = Move(0.0, "m", "instances 2 -> 1", SPARE + "its threads used 0.30 CPUs", s)
    taker = Move(0.0, "a", "instances 2 -> 3", "SLO at risk; taken from 'm'", s)
    restored = Move(0.0, "b", "max_queue 8 -> 16", RESTORED, s)
    assert _swap_receivers([donor, taker]) == ["a"]
    assert _swap_receivers([restored, donor, taker]) == ["a"]  # an admission restored with it is not
    assert _swap_receivers([taker]) == [] and _swap_receivers([]) == []  # no swap among them


def test_an_underused_model_gives_its_core_to_a_saturated_pool_whose_model_refuses() -> None:
    # "e" has a core of its own and uses 40% of it (not idle: 30%), p99 far under its SLO;
    # "a" in the one-CPU pool turns requests away with every instance busy. The core serves
    # more in the pool: "e" moves there, "a" gets an instance.
    specs = {"a": spec("a", 1, batching=ap.Batching(8, 1.0)),
             "e": spec("e", 1, cores=1, isolation="exclusive")}
    slos = {"a": 75.0, "e": 40.0}
    hot = win(p99=60.0, busy=1.1, refused=50, batch=2.0)
    under = win(p99=6.0, busy=0.4)

    def ctl(**kw: Any) -> Controller:
        return Controller(None, slos, **{"capacity": 2, "confirm": 1, "dwell_s": 0.0, **kw})

    moves = ctl().decide({"a": hot, "e": under}, specs, 0.0, idle_cpus=0.0, pool_cpus=1)
    assert [(m.model, m.change) for m in moves] == [("e", "cores 1 -> the shared pool"), ("a", "instances 1 -> 2")]
    assert "underused (used 40%) with latency to spare: gives its core to the shared pool for 'a'" in moves[0].reason
    assert "taken from 'e'" in moves[1].reason
    assert moves[0].spec.isolation == "shared" and moves[0].spec.cores is None
    # A model of two cores gives one while its load fits the core it keeps under target (70%):
    # 32% of two is 64% of one; 40% of two would be 80%.
    two = specs | {"e": spec("e", 2, cores=2, isolation="exclusive")}
    moves = ctl(capacity=3).decide({"a": hot, "e": win(p99=6.0, busy=0.32, instances=2)}, two, 0.0, idle_cpus=0.0,
                                   pool_cpus=1)
    assert [(m.model, m.change) for m in moves] == [("e", "instances 2 -> 1, cores 2 -> 1"), ("a", "instances 1 -> 2")]
    assert "gives a core to the shared pool" in moves[0].reason
    moves = ctl(capacity=3).decide({"a": hot, "e": win(p99=6.0, busy=0.4, instances=2)}, two, 0.0, idle_cpus=0.0,
                                   pool_cpus=1)
    assert all(m.model != "e" for m in moves)
    # Cores named by CPU list: shrinking them frees no CPU, so they are not taken this way.
    listed = specs | {"e": spec("e", 2, cores=[2, 3], isolation="exclusive")}
    moves = ctl(capacity=3).decide({"a": hot, "e": win(p99=6.0, busy=0.32, instances=2)}, listed, 0.0,
                                   idle_cpus=0.0, pool_cpus=1)
    assert all(m.model != "e" for m in moves)
    # Latency to spare for confirm windows in a row, out of its dwell, not given back lately.
    c = ctl(confirm=2)
    assert c.decide({"a": hot, "e": win(p99=30.0, busy=0.4)}, specs, 0.0, idle_cpus=0.0, pool_cpus=1) == []
    assert c.decide({"a": hot, "e": under}, specs, 1.0, idle_cpus=0.0, pool_cpus=1) == []  # one roomy window
    assert [m.model for m in c.decide({"a": hot, "e": under}, specs, 2.0, idle_cpus=0.0, pool_cpus=1)] == ["e", "a"]
    gives_nothing_in_its_dwell_nor_given_back_lately(ctl, {"a": hot, "e": under}, specs, "e", pool_cpus=1)
    # A model whose admission is given back in the same window is not also a donor: one apply
    # names each model once.
    c = ctl()
    c._full_queue["e"] = 64
    lowered = specs | {"e": spec("e", 1, cores=1, isolation="exclusive", max_queue=8)}
    calm = win(p99=6.0, busy=0.1)
    moves = c.decide({"a": hot, "e": calm}, lowered, 0.0, idle_cpus=0.0, pool_cpus=1)
    assert [m.model for m in moves].count("e") <= 1 and moves[0].change == "max_queue 8 -> 64"
    # Not when the model uses half its core or more, its latency has no room to spare, the
    # pool model refuses nothing or is not busy, or on a scheduled pool.
    for a, e, release in ((hot, win(p99=6.0, busy=0.6), True), (hot, win(p99=25.0, busy=0.4), True),
                          (win(p99=60.0, busy=1.1, batch=2.0), under, True),
                          (win(p99=60.0, busy=0.7, refused=50, batch=2.0), under, True), (hot, under, False)):
        c = ctl()
        c.release = release
        moves = c.decide({"a": a, "e": e}, specs, 0.0, idle_cpus=0.0, pool_cpus=1)
        assert all(m.model != "e" for m in moves), (a, e, release)


def test_a_refusing_model_with_its_own_core_and_none_to_take_joins_the_pool_with_it() -> None:
    # "a" has one core of its own, every call busy, requests turned away; the pool's one CPU
    # serves "b" and "c" with latency to spare. No core is free and none idles: "a" joins the
    # pool with its core and a second instance (a share of both CPUs).
    specs = {"a": spec("a", 1, cores=1, isolation="exclusive"), "b": spec("b", 1), "c": spec("c", 1)}
    slos = {"a": 75.0, "b": 50.0, "c": 40.0}
    hot = win(p99=60.0, busy=1.1, refused=50)
    roomy = {"a": hot, "b": win(p99=10.0, busy=0.6), "c": win(p99=5.0, busy=0.4)}

    def ctl(**kw: Any) -> Controller:
        return Controller(None, slos, **{"capacity": 2, "confirm": 1, "dwell_s": 0.0, **kw})

    moves = ctl().decide(roomy, specs, 0.0, idle_cpus=0.0, pool_cpus=1)
    assert [(m.model, m.change) for m in moves] == [("a", "cores 1 -> the shared pool, instances 1 -> 2")]
    assert "joins the pool with its cores" in moves[0].reason
    assert "b p99 10.0 of 50 ms, c p99 5.0 of 40 ms" in moves[0].reason
    joined = moves[0].spec
    assert (joined.isolation, joined.cores, joined.instances, joined.threads) == ("shared", None, 2, 1)
    # Not when a pool model has no latency to spare, the pool's busy threads would pass
    # oversubscribe x its CPUs (0.6 + 0.4 + 2 = 3 of at most 1 x 2), it refuses nothing, it was
    # given back lately, or on a scheduled pool.
    c = ctl()
    assert c.decide({**roomy, "b": win(p99=30.0, busy=0.6)}, specs, 0.0, idle_cpus=0.0, pool_cpus=1) == []
    assert "no neighbour in the pool has latency to spare to join" in c.held["a"][2]
    c = ctl(oversubscribe=1.0)
    assert c.decide(roomy, specs, 0.0, idle_cpus=0.0, pool_cpus=1) == []
    assert "joining the pool would make 3.0 busy threads there, past 2" in c.held["a"][2]
    assert all(m.model != "a" for m in ctl().decide({**roomy, "a": win(p99=60.0, busy=1.1)}, specs, 0.0,
                                                    idle_cpus=0.0, pool_cpus=1))
    c = ctl()
    c._tabu[("a", "shrink")] = 100.0
    assert c.decide(roomy, specs, 1.0, idle_cpus=0.0, pool_cpus=1) == []
    c = ctl()
    c.release = False
    assert c.decide(roomy, specs, 0.0, idle_cpus=0.0, pool_cpus=1) == []
    # Several threads an instance, or cores named by list: not this way.
    for other in (spec("a", 1, cores=2, threads=2, isolation="exclusive"),
                  spec("a", 1, cores=[0], isolation="exclusive")):
        assert all("joins the pool" not in m.reason
                   for m in ctl().decide(roomy, {**specs, "a": other}, 0.0, idle_cpus=0.0, pool_cpus=1))
    # A free core comes first: it grows on its own cores.
    moves = ctl(capacity=4).decide(roomy, specs, 0.0, idle_cpus=0.0, pool_cpus=1)
    assert [(m.model, m.change) for m in moves] == [("a", "instances 1 -> 2, cores 1 -> 2")]


def test_on_a_scheduled_pool_a_higher_class_never_grows_to_hold_every_unit() -> None:
    # A unit of the scheduled pool goes to the highest class waiting: two instances of class 2
    # on a two-unit pool would leave "b" (class 0) a unit only when both idle, none while "a"
    # is saturated.
    specs = {"a": spec("a", 1, priority_class=2, admission="deadline", timeout_ms=50.0),
             "b": spec("b", 1, priority_class=0)}
    hot = {"a": win(p99=45.0, busy=1.0, refused=10), "b": win(p99=10.0, busy=0.3)}

    def ctl(**kw: Any) -> Controller:
        c = controller(capacity=4, confirm=1, dwell_s=0.0, batchable=False, **kw)
        c.release = False  # the runtime's shared_pool="scheduled"
        return c

    # ("b" without latency to spare: "a" may not join its class either, even where it may
    # change classes; see the next test)
    tight = {**hot, "b": win(p99=30.0, busy=0.3)}
    c = ctl()
    assert c.decide(tight, specs, 0.0, pool_cpus=2) == []
    assert ("the move would leave no unit of the scheduled pool to b (class 0): the classes above it would hold 2 "
            "of its 2") in c.held["a"][2]
    c = ctl(classes=True)
    assert c.decide(tight, specs, 0.0, pool_cpus=2) == []
    assert "no neighbour in the pool has latency to spare to share a class with" in c.held["a"][2]
    # A third unit leaves one to "b"; a model of the same class, one without an objective, or an
    # "os" pool (the OS runs every thread) do not hold it back.
    assert [m.change for m in ctl().decide(hot, specs, 0.0, pool_cpus=3)] == ["instances 1 -> 2"]
    same = specs | {"b": spec("b", 1, priority_class=2)}
    assert [m.change for m in ctl().decide(hot, same, 0.0, pool_cpus=2)] == ["instances 1 -> 2"]
    c = Controller(None, {"a": 50.0}, capacity=4, confirm=1, dwell_s=0.0)
    c.release = False
    assert [m.change for m in c.decide(hot, specs, 0.0, pool_cpus=2)] == ["instances 1 -> 2"]
    assert [m.change for m in controller(capacity=4, confirm=1, dwell_s=0.0).decide(hot, specs, 0.0, pool_cpus=2)
            ] == ["instances 1 -> 2"]
    # A model of a higher class without an objective holds units too (other_specs): with it,
    # "a" at two instances would leave "b" none of four.
    beside = {"x": spec("x", 2, priority_class=3)}
    c = ctl()
    assert c.decide(tight, specs, 0.0, pool_cpus=4, other_specs=beside) == []
    assert "the classes above it would hold 4 of its 4" in c.held["a"][2]
    assert [m.change for m in ctl().decide(hot, specs, 0.0, pool_cpus=4, other_specs={"x": spec("x", 2)})] == [
        "instances 1 -> 2"]  # x in class 0: not above "b"
    # Growth that takes an idle model's instance of the same class adds no unit above "b": made.
    donor = specs | {"d": spec("d", 2, priority_class=2)}
    c = Controller(None, {"a": 50.0, "b": 50.0, "d": 50.0}, capacity=4, confirm=1, dwell_s=0.0)
    c.release = False
    moves = c.decide({**hot, "d": win(p99=5.0, busy=0.1, instances=2)}, donor, 0.0, pool_cpus=4)
    assert [(m.model, m.change) for m in moves] == [("d", "instances 2 -> 1"), ("a", "instances 1 -> 2")]
    # A model that already had no unit left is not this move's doing.
    crowded = specs | {"x": spec("x", 2, priority_class=3, admission="deadline", timeout_ms=50.0)}
    c = Controller(None, {"a": 50.0, "b": 50.0, "x": 50.0}, capacity=8, confirm=1, dwell_s=0.0)
    c.release = False
    assert c.decide({**hot, "x": win(p99=5.0, busy=0.5, instances=2)}, crowded, 0.0, pool_cpus=2) != []


def test_on_a_scheduled_pool_a_saturated_top_class_joins_the_highest_class_below_it_where_nobody_starves() -> None:
    # Three units; "a" (class 2) turns requests away with its one instance busy, "m" (class 1)
    # and "b" (class 0) have latency to spare. Another instance of "a" in class 2 or 1 would
    # leave "b" no unit: "a" joins class 0 with it.
    specs = {"a": spec("a", 1, priority_class=2, admission="deadline", timeout_ms=50.0),
             "m": spec("m", 1, priority_class=1), "b": spec("b", 1, priority_class=0)}
    windows = {"a": win(p99=45.0, busy=1.0, refused=10), "m": win(p99=10.0, busy=0.3),
               "b": win(p99=10.0, busy=0.3)}
    slos = {"a": 50.0, "m": 50.0, "b": 50.0}

    def ctl(**kw: Any) -> Controller:
        c = Controller(None, slos, **{"capacity": 4, "confirm": 1, "dwell_s": 0.0, "classes": True, **kw})
        c.release = False  # the runtime's shared_pool="scheduled"
        return c

    # Only given classes=True: by default a class stays where it was set.
    c = ctl(classes=False)
    assert c.decide(windows, specs, 0.0, pool_cpus=3) == []
    assert "the move would leave no unit of the scheduled pool to b" in c.held["a"][2]
    moves = ctl().decide(windows, specs, 0.0, pool_cpus=3)
    assert [(m.model, m.change) for m in moves] == [("a", "instances 1 -> 2, priority_class 2 -> 0")]
    assert moves[0].spec.priority_class == 0 and moves[0].spec.instances == 2
    assert "joins class 0 and shares the pool with it" in moves[0].reason
    assert "b p99 10.0 of 50 ms, m p99 10.0 of 50 ms" in moves[0].reason
    # With two units "b" gets none already (while "a" and "m" are saturated). In class 1 "a"
    # would starve nobody new, but "b" the more: it joins class 0, where nobody starves.
    moves = ctl().decide(windows, specs, 0.0, pool_cpus=2)
    assert [m.change for m in moves] == ["instances 1 -> 2, priority_class 2 -> 0"]
    # Classes 3, 2 and 1 on three units: in class 2, beside "m", "a" would leave "b" none; it
    # joins class 1, which is not the lowest class there is (0, of a model without an objective).
    higher = {"a": dataclasses.replace(specs["a"], priority_class=3), "m": spec("m", 1, priority_class=2),
              "b": spec("b", 1, priority_class=1), "x": spec("x", 1, priority_class=0)}
    c = ctl()
    got = c.decide(windows, higher, 0.0, pool_cpus=3)
    assert [m.change for m in got] == ["instances 1 -> 2, priority_class 3 -> 1"]
    # With four, class 2 leaves "b" a unit: it grows where it is.
    assert [m.change for m in ctl().decide(windows, specs, 0.0, pool_cpus=4)] == ["instances 1 -> 2"]
    # Not while it refuses nothing, is not busy, a neighbour has no latency to spare, its
    # growth was undone lately, or the instance does not fit.
    for w, sp, kw, tabu in (
            (dict(windows, a=win(p99=45.0, busy=1.0)), specs, {}, False),
            (dict(windows, a=win(p99=45.0, busy=0.5, refused=10)), specs, {}, False),
            (dict(windows, m=win(p99=30.0, busy=0.3)), specs, {}, False),
            (windows, specs, {}, True)):
        c = ctl(**kw)
        if tabu:
            c._tabu[("a", "grow")] = 100.0
        assert c.decide(w, sp, 0.0, pool_cpus=3) == [], (w, sp)
    c = ctl()
    assert c.decide(windows, specs, 0.0, fits=lambda s: s["a"].instances < 2, pool_cpus=3) == []
    assert "no class below 2 to join" in c.held["a"][2]
    # Undone, it is a growth undone: held for tabu_s like one.
    c = ctl(judge=1)
    moves = c.decide(windows, specs, 0.0, pool_cpus=3)
    c.trial(moves, specs, [windows])
    undo = c.verdict({**windows, "a": dataclasses.replace(windows["a"], completed=20)}, 1.0)
    assert undo is not None and [(m.model, m.change) for m in undo] == [
        ("a", "undone: instances 1 -> 2, priority_class 2 -> 0")]
    assert undo[0].spec.priority_class == 2 and undo[0].spec.instances == 1
    assert c.stats()["tabu"] == {"a grow": 1.0 + c.tabu_s}
    # Beside a pool_reserve a class cannot change live: the controller does not try.
    with ap.Runtime(shared_pool="scheduled", pool_reserve={1: 1}) as rt:
        rt.add_model("a", model=lambda x: x, priority_class=0)
        assert Controller(rt, {"a": 50.0}, classes=True).classes is False
    with ap.Runtime(shared_pool="scheduled") as rt:
        rt.add_model("a", model=lambda x: x, priority_class=0)
        assert Controller(rt, {"a": 50.0}, classes=True).classes is True


def test_longest_miss_is_the_longest_run_of_windows_with_a_p99_over_its_slo() -> None:
    c = controller()
    ok, miss_a, miss_b = win(p99=10.0), win(p99=70.0), win(p99=80.0)
    timeline = [(1.0, {"a": miss_a, "b": ok}),   # before since_s: not counted
                (2.0, {"a": ok, "b": ok}),
                (3.0, {"a": miss_a, "b": ok}),   # a run of three windows: a misses 2, b 2
                (4.0, {"a": miss_a, "b": miss_b}),
                (5.0, {"a": ok, "b": miss_b}),
                (6.0, {"a": ok, "b": ok}),
                (7.0, {"a": ok, "b": miss_b})]   # a run of one
    assert c.longest_miss() == (0.0, None)
    c.history.extend(timeline)
    seconds, who = c.longest_miss(since_s=1.5)
    assert seconds == pytest.approx(3.0) and who in ("a", "b")
    assert c.longest_miss(since_s=5.5) == (pytest.approx(1.0), "b")
    assert c.longest_miss(since_s=7.0) == (0.0, None)
    # A window where the model completed nothing has no p99 to miss.
    c.history.clear()
    c.history.append((1.0, {"a": Window(1.0, 5, 0, 5, 0.0, 0.0, 0.0, 1.0, 1)}))
    assert c.longest_miss() == (0.0, None)


def test_a_running_controller_measures_the_idle_cpus_of_its_runtime() -> None:
    def spin(seconds: float) -> float:  # seconds of its thread's CPU time, however long that takes
        end = time.thread_time() + seconds
        n = 0
        while time.thread_time() < end:
            n += 1
        return seconds

    with ap.Runtime() as rt:
        rt.add_model("a", model=spin)
        rt.start()
        cpus = len(rt.plan().shared_pool)
        c = Controller(rt, {"a": 50.0}, window_s=0.05)
        assert c.step() == [] and c.idle_cpus is None  # the first step only takes a reading
        # One CPU kept busy for the whole window by the model: at most cpus - 1 (and a bit) idle.
        rt.call("a", 0.5)
        c.step()
        assert [sorted(w) for _, w in c.history] == [["a"]]  # every window read is kept
        idle = c.stats()["idle_cpus"]
        assert idle is not None and 0.0 <= idle <= cpus - 0.6, (idle, cpus)
        # Its own spinning (most of a CPU over the window) is this process's, not another
        # process's use of the pool. A busy loop in another process is (it gets a share of a
        # CPU, whatever else runs).
        outside, seconds = c.stats()["outside_cpus"], c.windows["a"].seconds
        assert outside is not None and 0.0 <= outside <= (cpus - idle) - 0.4 / seconds, (outside, idle, seconds)
        loop = subprocess.Popen([sys.executable, "-c", "import time\nend = time.monotonic() + 60\n"
                                 "while time.monotonic() < end: pass"])
        try:
            time.sleep(0.3)  # started
            c.step()
            rt.call("a", 0.5)
            c.step()
        finally:
            loop.kill()
            loop.wait()
        assert c.outside_cpus is not None and c.outside_cpus >= 0.5, c.outside_cpus


def test_a_model_removed_and_added_again_has_no_window_until_its_next_reading() -> None:
    # The two readings were of two histograms: subtracting them raised ValueError, logged as a
    # controller error each time.
    with ap.Runtime() as rt:
        rt.add_model("a", model=lambda x: x)
        rt.add_model("b", model=lambda x: x)
        rt.start()
        c = Controller(rt, {"a": 50.0, "b": 50.0}, window_s=0.05)
        c.step()
        for i in range(20):
            rt.call("a", i)
        rt.remove_model("a")
        rt.add_model("a", model=lambda x: x)
        rt.call("a", 1)
        c.step()
        assert sorted(c.windows) == ["b"] and c.errors == []
        rt.call("a", 2)
        c.step()
        assert sorted(c.windows) == ["a", "b"] and c.windows["a"].completed == 1


def test_only_the_shared_pools_cpus_count_as_idle_time_for_shared_models() -> None:
    # An exclusive model's idle core is no room for a shared model: its instances cannot run
    # there. The reading covers the shared pool alone.
    def spin(seconds: float) -> float:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return seconds

    with ap.Runtime() as rt:
        if len(rt.topology.usable_cores) != 2:
            pytest.skip("needs exactly two cores: one exclusive and idle, one shared and kept busy")
        rt.add_model("own", model=lambda x: x, cores=1, isolation="exclusive")
        rt.add_model("a", model=spin)
        rt.start()
        assert len(rt.plan().shared_pool) == 1
        c = Controller(rt, {"a": 50.0}, window_s=0.05)
        c.step()
        rt.call("a", 0.5)  # the shared CPU busy for the whole window; the exclusive one idles
        c.step()
        # Counting the idle exclusive core would read ~1 CPU idle.
        assert c.idle_cpus is not None and c.idle_cpus <= 0.4, c.idle_cpus


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kw", [
    {"window_s": 0}, {"window_s": NAN}, {"window_s": INF}, {"window_s": "1"}, {"dwell_s": NAN}, {"dwell_s": -1},
    {"confirm": 0}, {"confirm": NAN}, {"confirm": 1.5}, {"judge": 0}, {"judge": NAN}, {"idle": 0.8}, {"idle": NAN},
    {"risk": 0}, {"risk": NAN}, {"headroom": 0}, {"headroom": INF}, {"tolerance": 1.0}, {"tolerance": NAN},
    {"tabu_s": -1.0}, {"tabu_s": NAN}, {"oversubscribe": 0.5}, {"oversubscribe": INF}, {"capacity": 0},
    {"capacity": -2}, {"capacity": True}, {"max_batch": 0}, {"max_batch_size": 0}, {"history": 0},
    {"batch_delay_ms": -1.0}, {"batch_delay_ms": INF}, {"window_s": 1e10},
    # a window of 1 us spun its thread at 0.75 CPU; the CLI refused it, the API took it
    {"window_s": 1e-6}, {"window_s": 0.049}, {"log": 5}, {"on_error": "print"}, {"clock": 1.0}, {"clock": None},
    {"classes": 1}, {"classes": "yes"}, {"classes": None}])
def test_bad_settings_are_refused(kw: dict[str, Any]) -> None:
    args = {"capacity": 2, **kw}
    field = next(iter(kw))
    with pytest.raises(QuotaError, match=field) as err:
        Controller(None, {"a": 50.0}, **args)
    if field not in ("idle", "risk", "headroom", "oversubscribe"):  # refused together with a second setting
        assert err.value.field == field


@pytest.mark.parametrize(("costs", "model", "match"), [
    ([("a", CostModel(0.1, 1.0))], None, "must be a mapping"),
    ({"z": CostModel(0.1, 1.0)}, "z", "costs names 'z', which is neither in slos nor a model of the runtime"),
    ({3: CostModel(0.1, 1.0)}, None, "costs names 3"),
    ({"a": (0.1, 1.0)}, "a", "must be an apportion.tune.CostModel, got tuple")])
def test_bad_cost_models_are_refused_naming_the_model(costs: Any, model: str | None, match: str) -> None:
    with pytest.raises(QuotaError, match=match) as err:
        Controller(None, {"a": 50.0}, capacity=2, costs=costs)
    assert err.value.field == "costs" and err.value.model == model


def test_cost_models_of_the_runtime_s_models_without_an_objective_are_taken_unused() -> None:
    # The tuner fits one for every model of its config.
    with ap.Runtime() as rt:
        rt.add_model("a", model=lambda x: x)
        rt.add_model("logger", model=lambda x: x)
        c = Controller(rt, {"a": 50.0}, costs={"a": CostModel(0.1, 1.0), "logger": CostModel(0.0, 1.0)})
        assert set(c.costs) == {"a", "logger"}
        with pytest.raises(QuotaError, match="costs names 'loger'") as err:
            Controller(rt, {"a": 50.0}, costs={"loger": CostModel(0.0, 1.0)})
        assert err.value.model == "loger"


def test_the_default_capacity_is_the_cpus_the_runtime_may_use() -> None:
    with ap.Runtime(cpus=[0]) as rt:
        rt.add_model("a", model=lambda x: x)
        assert Controller(rt, {"a": 10.0}).capacity == len(rt.topology.usable) == 1


@pytest.mark.parametrize("slo", [-1, 0, NAN, INF, True, "50", 10**400])
def test_bad_slos_are_refused_naming_the_model(slo: Any) -> None:
    with pytest.raises(QuotaError) as err:
        Controller(None, {"a": slo}, capacity=2)
    assert err.value.model == "a" and err.value.field == "slo"


def test_slos_for_models_the_runtime_does_not_have_are_refused() -> None:
    with ap.Runtime() as rt:
        rt.add_model("ranker", model=lambda x: x)
        rt.start()
        with pytest.raises(ap.ModelNotFound, match=r"model 'rankr' \(field 'slos'\) is not registered.*\['ranker'\]"):
            Controller(rt, {"ranker": 50.0, "rankr": 50.0})
        with pytest.raises(ap.ModelNotFound) as err:
            Controller(rt, {"rankr": 50.0})
        assert err.value.model == "rankr"
        assert Controller(rt, {"ranker": 50.0}).slos == {"ranker": 50.0}


def test_running_says_whether_the_thread_runs_and_start_after_stop_starts_again() -> None:
    rt = ap.Runtime()
    rt.add_model("a", model=lambda x: x)
    rt.start()
    c = Controller(rt, {"a": 50.0}, window_s=0.05)
    assert c.stats()["running"] is False
    c.start()
    assert c.stats()["running"] is True
    c.stop()
    assert c.stats()["running"] is False
    c.start()  # again after a stop
    assert c.stats()["running"] is True
    rt.close()  # the thread ends by itself once the runtime is closed
    assert c._thread is not None
    c._thread.join(10)
    assert c.stats()["running"] is False
    c.stop()


def test_a_short_run_moves_the_model_at_risk_and_loses_nothing() -> None:
    def slow(x: Any) -> Any:
        time.sleep(0.002)
        return x

    moves: list[Any] = []
    with ap.Runtime() as rt:
        rt.add_model("slow", model=slow)
        rt.add_model("fast", model=lambda x: x)
        rt.start()
        # An SLO below the model's own compute time: at risk in every window.
        c = Controller(rt, {"slow": 1.0, "fast": 50.0}, capacity=3, confirm=1, dwell_s=0.0, window_s=0.1,
                       log=moves.append)
        stop = threading.Event()
        done: list[int] = []

        def client(k: int) -> None:
            i = 0
            while not stop.is_set() and i < 2000:
                done.append(rt.call("slow", i))
                i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        c.step()
        for _ in range(50):
            time.sleep(0.05)
            if c.step():
                break
        stop.set()
        for t in threads:
            t.join(60)
        state = c.stats()
        s = rt.stats()["slow"]
    assert moves and moves[0].model == "slow" and moves[0].change == "instances 1 -> 2"
    assert state["moves"] == moves and state["errors"] == []
    assert "slow" in state["windows"]
    assert s.instances == 2
    assert s.completed == len(done) == s.submitted


def test_a_model_with_cores_of_its_own_grows_by_a_core_and_what_does_not_fit_is_not_proposed() -> None:
    c = controller(confirm=1, capacity=4)
    specs = {"a": spec("a", 1, cores=1, isolation="exclusive"), "b": spec("b", 1)}
    risky = {"a": win(p99=60.0), "b": win()}
    moves = c.decide(risky, specs, 0.0)
    assert [m.change for m in moves] == ["instances 1 -> 2, cores 1 -> 2"]
    assert (moves[0].spec.cores, moves[0].spec.instances, moves[0].spec.threads) == (2, 2, 1)
    # When the placement says it does not fit, the controller batches instead.
    c = controller(confirm=1, capacity=4)
    seen: list[dict[str, ap.ModelSpec]] = []

    def never(s: Any) -> bool:
        seen.append(dict(s))
        return False

    moves = c.decide(risky, specs, 0.0, fits=never)
    assert [m.change for m in moves] == ["batching off -> 8"]
    assert seen and seen[0]["a"].cores == 2


def test_an_idle_donor_down_to_one_core_gives_it_to_the_shared_pool() -> None:
    c = controller(confirm=1, capacity=2)
    specs = {"a": spec("a", 1), "b": spec("b", 1, cores=1, isolation="exclusive", max_queue=9)}
    moves = c.decide({"a": win(p99=60.0), "b": win(busy=0.05, p99=1.0)}, specs, 0.0)
    assert [(m.model, m.change) for m in moves] == [("b", "cores 1 -> the shared pool"), ("a", "instances 1 -> 2")]
    released = moves[0].spec
    assert (released.isolation, released.cores, released.instances, released.max_queue) == ("shared", None, 1, 9)
    assert "gives its core to the shared pool to 'a'" in moves[0].reason
    assert "taken from 'b'" in moves[1].reason
    # Judged like any move: undone, 'b' gets its core back and giving it is tabu for a while.
    c.trial(moves, specs, [{"a": win(), "b": win()}])
    c.judge = 1
    undo = c.verdict({"a": win(), "b": Window(1.0, 100, 50, 50, 90.0, 0.0, 5.0, 1.0, 1)}, 1.0)
    assert undo is not None and [(m.model, m.spec) for m in undo] == [("b", specs["b"]), ("a", specs["a"])]
    assert c.stats()["tabu"] == {"b shrink": 31.0, "a grow": 31.0}


def test_a_model_idles_by_the_cpu_its_threads_used_when_that_reads_lower() -> None:
    # Wall busy 40% (its calls were slow: a busier neighbour held the CPU), 10% of CPU used:
    # its core is idle. Read from whichever measure is lower: CPU time that reads higher
    # (a worker spinning before it parks) makes no model look busier than its calls.
    w = win(busy=0.4)
    assert w.cpu_s is None and w.used == pytest.approx(0.4)
    assert dataclasses.replace(w, cpu_s=0.1).used == pytest.approx(0.1)
    assert dataclasses.replace(w, cpu_s=0.7).used == pytest.approx(0.4)
    assert dataclasses.replace(win(busy=0.4, instances=2), cpu_s=0.2).used == pytest.approx(0.1)
    c = controller(confirm=1, capacity=2)
    specs = {"a": spec("a", 1), "b": spec("b", 1, cores=1, isolation="exclusive")}
    assert c.idle == pytest.approx(0.3)
    moves = c.decide({"a": win(p99=60.0), "b": win(busy=0.4, p99=1.0)}, specs, 0.0)
    assert [m.change for m in moves] == ["batching off -> 8"]  # by wall time 'b' is not idle
    c = controller(confirm=1, capacity=2)
    moves = c.decide({"a": win(p99=60.0), "b": dataclasses.replace(win(busy=0.4, p99=1.0), cpu_s=0.1)}, specs, 0.0)
    assert [(m.model, m.change) for m in moves] == [("b", "cores 1 -> the shared pool"), ("a", "instances 1 -> 2")]
    assert "idle (used 10%)" in moves[0].reason


def test_a_donor_with_burst_instances_keeps_its_core() -> None:
    c = controller(confirm=1, capacity=2)
    specs = {"a": spec("a", 1), "b": spec("b", 1, cores=1, isolation="exclusive", burst=True)}
    moves = c.decide({"a": win(p99=60.0), "b": win(busy=0.05, p99=1.0)}, specs, 0.0)
    assert [m.change for m in moves] == ["batching off -> 8"]


def test_a_donor_down_to_one_core_gives_nothing_on_a_scheduled_pool() -> None:
    with ap.Runtime(shared_pool="scheduled") as rt:
        rt.add_model("a", model=lambda x: x)
        rt.add_model("b", model=lambda x: x)
        c = Controller(rt, {"a": 50.0, "b": 50.0}, capacity=2, confirm=1, batchable=True)
    assert (rt.shared_pool, c.release) == ("scheduled", False)
    specs = {"a": spec("a", 1), "b": spec("b", 1, cores=1, isolation="exclusive")}
    moves = c.decide({"a": win(p99=60.0), "b": win(busy=0.05, p99=1.0)}, specs, 0.0)
    assert [m.change for m in moves] == ["batching off -> 8"]
    with ap.Runtime() as rt:
        rt.add_model("a", model=lambda x: x)
        assert (rt.shared_pool, Controller(rt, {"a": 50.0}).release) == ("os", True)


def test_a_model_that_waits_in_its_calls_reads_busy_but_not_used() -> None:
    # 'b' owns a core and spends its calls asleep: by wall time its instance is busy, by the
    # CPU time of its threads the core is idle. The step reads both.
    rt = ap.Runtime(cpus=[0, 1])
    rt.add_model("a", model=lambda x: x)
    rt.add_model("b", model=lambda x: time.sleep(0.02) or x, cores=1, isolation="exclusive")
    with rt:
        c = Controller(rt, {"a": 50.0, "b": 1000.0}, capacity=2, confirm=5, dwell_s=0.0)
        c.step()
        # 0.4 s asleep in calls: busy reads under 0.5 only if 0.4 s more pass between them.
        for i in range(20):
            assert rt.call("b", i) == i
        c.step()
        w = c.windows["b"]
    assert w.cpu_s is not None and w.busy > 0.5, w
    assert w.used < 0.2 and w.used == pytest.approx(w.cpu_s / w.seconds), w


def test_a_core_given_to_the_pool_moves_live_and_loses_nothing() -> None:
    # 'b' holds a core of its own and idles; 'a' serves from the shared pool and is at risk.
    # One step: 'b' moves to the pool, 'a' grows into it; every request completes once.
    block = bytes(64 << 10)

    def factory(ctx: ap.InstanceContext) -> Any:
        def run(x: Any) -> Any:
            if ctx.model == "b":
                time.sleep(0.001)
                return x
            end = time.perf_counter() + 0.001
            while time.perf_counter() < end:  # CPU, not sleep (the pool's CPU has no idle time),
                hashlib.sha256(block).digest()  # and without the GIL ('b' runs meanwhile)
            return x

        return run

    rt = ap.Runtime(cpus=[0, 1])
    rt.add_model("a", factory=factory, max_queue=512)
    rt.add_model("b", factory=factory, cores=1, isolation="exclusive")
    with rt:
        core_b = rt.plan()["b"].instances[0].cpus
        c = Controller(rt, {"a": 1.0, "b": 1000.0}, capacity=2, confirm=1, dwell_s=0.0)
        c.step()
        futs = [rt.submit("a", i) for i in range(200)] + [rt.submit("b", -1)]
        futs[-1].result(10)
        time.sleep(0.05)  # a window in which 'b' idles (its one call: ~1 ms of 50)
        moves = c.step()
        # 'b''s CPU time is its use of the CPUs of its own (cpu_s); 'a''s is not (its CPUs are
        # the pool's)
        assert c.windows["b"].cpu_s is not None and c.windows["a"].cpu_s is None
        # ... and for 'a' its share of the pool, which only the spare-instance move reads.
        assert c.windows["a"].pool_cpu_s is not None and c.windows["b"].pool_cpu_s is None
        assert c.windows["b"].used <= c.windows["b"].busy
        assert [(m.model, m.change) for m in moves] == [("b", "cores 1 -> the shared pool"), ("a", "instances 1 -> 2")]
        assert rt.spec("b").isolation == "shared" and rt.spec("a").instances == 2
        assert rt.plan().shared_pool == (0, 1) and core_b[0] in rt.plan()["a"].instances[0].cpus
        assert [f.result(10) for f in futs[:200]] == list(range(200))
        assert rt.call("b", 5) == 5
        stats = rt.stats()
        assert stats["a"].completed == 200 and stats["a"].failed == stats["a"].expired == 0


def test_a_move_that_fails_is_reported_and_the_model_keeps_serving() -> None:
    def factory(ctx: ap.InstanceContext) -> Any:
        if ctx.instance >= 1:
            raise RuntimeError("no second instance here")

        def slow(x: Any) -> Any:
            time.sleep(0.002)
            return x

        return slow

    with ap.Runtime() as rt:
        rt.add_model("m", factory=factory)
        rt.start()
        reported: list[str] = []
        c = Controller(rt, {"m": 0.5}, capacity=4, confirm=1, dwell_s=0.0, window_s=0.1, on_error=reported.append)
        c.step()
        for i in range(5):
            rt.call("m", i)
        assert c.step() == []
        assert len(c.errors) == 1 and "no second instance here" in c.errors[0]
        # It names the model, the move and the exception's type, and is reported as it happens.
        assert "m: instances 1 -> 2: RuntimeError: no second instance here" in c.errors[0], c.errors
        assert reported == c.errors
        assert c.moves == [] and rt.spec("m").instances == 1
        assert rt.call("m", 7) == 7


def test_a_move_undone_on_a_real_runtime_is_marked_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    # The second instance fails every call: after the move 'm' fails a share of its requests,
    # so the move is undone whatever the load did.
    def factory(ctx: ap.InstanceContext) -> Any:
        def slow(x: Any) -> Any:
            time.sleep(0.002)
            if ctx.instance >= 1:
                raise RuntimeError("a broken instance")
            return x

        return slow

    monkeypatch.setattr("apportion.controller.MOVES_KEPT", 1)  # moves keeps the last ones, counts all
    with ap.Runtime() as rt:
        rt.add_model("m", factory=factory)
        rt.start()
        c = Controller(rt, {"m": 0.5}, capacity=4, confirm=1, dwell_s=0.0, window_s=0.1, judge=1)
        c.step()
        for i in range(5):
            rt.call("m", i)
        moves = c.step()
        assert [(m.change, m.undo) for m in moves] == [("instances 1 -> 2", False)], c.errors
        futures = [rt.submit("m", i) for i in range(60)]
        failed = sum(f.exception(timeout=30) is not None for f in futures)
        assert failed >= 5, "both instances took calls"
        undo = c.step()
        assert [(m.change, m.undo) for m in undo] == [("undone: instances 1 -> 2", True)], c.errors
        assert "failed" in undo[0].reason and rt.spec("m").instances == 1
        assert c.stats()["counts"] == {"m": {"moves": 2, "undone": 1, "held": 0}}
        assert c.moves == undo


def test_a_stopped_controller_starts_no_move() -> None:
    # stop(wait=False) returns while a step may still be deciding: what it decided after the
    # stop is not applied (a server that drains must not get new instances).
    with ap.Runtime() as rt:
        rt.add_model("m", model=lambda x: (time.sleep(0.002), x)[1])
        rt.start()
        c = Controller(rt, {"m": 0.5}, capacity=4, confirm=1, dwell_s=0.0, window_s=0.1)
        c.step()
        for i in range(5):
            rt.call("m", i)
        c.stop(wait=False)
        assert c.step() == [] and c.moves == [] and rt.spec("m").instances == 1
        # The same windows move a controller that was not stopped.
        other = Controller(rt, {"m": 0.5}, capacity=4, confirm=1, dwell_s=0.0, window_s=0.1)
        other.step()
        for i in range(5):
            rt.call("m", i)
        assert [m.change for m in other.step()] == ["instances 1 -> 2"], other.errors


def _risky_raise(c: Controller, specs: dict[str, ap.ModelSpec], t0: float) -> list[Any]:
    """Two windows in which 'a' refuses requests with its latency well under its SLO: the
    controller raises its admission bound (nothing else to take on a full machine)."""
    w = {"a": win(p99=10.0, refused=20, busy=0.1), "b": win(p99=10.0, busy=0.5)}
    c.decide(w, specs, t0)
    return c.decide(w, specs, t0 + 1.0, queue_sizes={"a": 64, "b": 64})


def test_a_move_after_which_less_of_the_arrivals_is_served_is_undone_and_not_tried_again_for_a_while() -> None:
    c = controller(capacity=2, judge=2, tolerance=0.05, tabu_s=20.0)
    specs = {"a": spec("a", 1, max_queue=8, batching=ap.Batching(8, 1.0)), "b": spec("b", 1)}
    moves = _risky_raise(c, specs, 0.0)
    assert [(m.model, m.change) for m in moves] == [("a", "max_queue 8 -> 25")]
    before = [{"a": win(rate=100.0), "b": win(rate=100.0)}] * 2  # every arrival served
    c.trial(moves, specs, before)
    # After it: 'b' (sharing the CPUs) serves 60 of its 100 arrivals: 80% in all, against 100%.
    worse = {"a": win(rate=100.0), "b": Window(1.0, 100, 60, 40, 30.0, 0.0, 5.0, 1.0, 1)}
    assert c.verdict(worse, 2.0) is None, "judged over `judge` windows"
    undo = c.verdict(worse, 3.0)
    assert undo is not None and [(m.model, m.change) for m in undo] == [("a", "undone: max_queue 8 -> 25")]
    assert undo[0].spec == specs["a"], "the model's spec before the move comes back"
    assert undo[0].undo and not moves[0].undo
    assert "served 80.0% of arrivals within SLO after it against 100.0% before" in undo[0].reason
    assert c.stats()["tabu"] == {"a raise": 23.0}
    # The same kind of move is not tried again within tabu_s (a dwell of 5 s has passed).
    assert _risky_raise(c, specs, 9.0) == []
    # ... and is tried again after it.
    assert [m.change for m in _risky_raise(c, specs, 24.0)] == ["max_queue 8 -> 25"]


def test_a_move_after_which_as_many_complete_but_fewer_within_the_slo_is_undone() -> None:
    c = controller(capacity=2, judge=1)
    specs = {"a": spec("a", 1, max_queue=8, batching=ap.Batching(8, 1.0)), "b": spec("b", 1)}
    moves = _risky_raise(c, specs, 0.0)
    c.trial(moves, specs, [{"a": win(rate=100.0), "b": win(rate=100.0)}])
    # 'b' completes all 100 of its arrivals after the move, but only 50 within its SLO.
    late = {"a": win(rate=100.0), "b": Window(1.0, 100, 100, 0, 90.0, 0.0, 5.0, 1.0, 1, good=50)}
    undo = c.verdict(late, 2.0)
    assert undo is not None and [m.change for m in undo] == ["undone: max_queue 8 -> 25"]
    assert "served 75.0% of arrivals within SLO after it against 100.0% before" in undo[0].reason


def test_batching_is_switched_on_only_for_models_said_to_take_batches() -> None:
    # A model taking one input per call was given a list by the controller's "batching off ->
    # 8" and failed every request; only Controller(max_batch=1) turned that off, for all.
    specs = {"a": spec("a", 1), "b": spec("b", 1)}
    risky = {"a": win(p99=80.0), "b": win(busy=0.6)}
    default = controller(capacity=2, confirm=1, dwell_s=0.0, batchable=False)
    moves = default.decide(risky, specs, 0.0)
    assert [m.change for m in moves] == ["max_queue 1024 -> 5"]  # the next kind in line: admission
    named = controller(capacity=2, confirm=1, dwell_s=0.0, batchable=["a"])
    assert [m.change for m in named.decide(risky, specs, 0.0)] == ["batching off -> 8"]
    assert named.batchable == {"a"} and controller(batchable=True).batchable == {"a", "b"}
    # A model that batches already has its size changed whatever batchable says.
    full = {"a": win(p99=80.0, busy=0.95, rate=400.0, batch=8.0), "b": win(busy=0.6)}
    batched = {**specs, "a": spec("a", 1, batching=ap.Batching(8, 1.0))}
    assert [m.change for m in default.decide(full, batched, 1.0)] == ["batch 8 -> 16"]
    for bad in ("a", 3, ["nope"]):
        with pytest.raises(QuotaError, match="batchable"):
            controller(batchable=bad)


def test_a_move_after_which_a_moved_model_fails_is_undone_whatever_the_load_did() -> None:
    # Its requests failing fast raised a closed loop's arrival rate: the verdict read "the load
    # itself moved" and kept a move after which every request failed.
    c = controller(capacity=2, judge=1)
    specs = {"a": spec("a", 1, max_queue=8, batching=ap.Batching(8, 1.0)), "b": spec("b", 1)}
    moves = _risky_raise(c, specs, 0.0)
    c.trial(moves, specs, [{"a": win(rate=100.0), "b": win(rate=100.0)}])
    failing = {"a": Window(1.0, 400, 0, 0, 5.0, 0.0, 1.0, 1.0, 1, failed=400), "b": win(rate=100.0)}
    undo = c.verdict(failing, 2.0)
    assert undo is not None and [m.change for m in undo] == ["undone: max_queue 8 -> 25"]
    assert "'a' failed 100% of its requests after it against 0% before" in undo[0].reason


def test_a_move_that_serves_as_much_stays() -> None:
    c = controller(capacity=2, judge=2, tolerance=0.05)
    specs = {"a": spec("a", 1, max_queue=8, batching=ap.Batching(8, 1.0)), "b": spec("b", 1)}
    moves = _risky_raise(c, specs, 0.0)
    c.trial(moves, specs, [{"a": Window(1.0, 100, 90, 10, 10.0, 0.0, 5.0, 1.0, 1), "b": win()}])
    # 96% after against 95% before (within noise of it, or better): kept, nothing tabu.
    after = {"a": Window(1.0, 100, 92, 8, 10.0, 0.0, 5.0, 1.0, 1), "b": win()}
    assert c.verdict(after, 2.0) is None
    assert c.verdict(after, 3.0) == []
    assert c.stats()["tabu"] == {} and c.stats()["judging"] == []
    assert c.verdict(after, 4.0) == [], "no trial open: nothing to judge"


def _grow_a(c: Controller, before: dict[str, Window]) -> tuple[dict[str, ap.ModelSpec], dict[str, Window]]:
    """Two windows with 'a' at risk: the controller gives it an instance of the free capacity,
    and the move's trial opens against ``before``. Returns the specs before it and the window."""
    specs = {"a": spec("a", 1), "b": spec("b", 1)}
    risky = {"a": win(p99=45.0), "b": win(p99=5.0)}
    c.decide(risky, specs, 1.0)
    moves = c.decide(risky, specs, 2.0)
    assert [m.change for m in moves] == ["instances 1 -> 2"]
    c.trial(moves, specs, [before])
    return specs, risky


def test_with_growth_tabu_the_model_at_risk_gets_the_next_kind_of_move() -> None:
    c = controller(judge=1, tolerance=0.01)
    specs, risky = _grow_a(c, {"a": win(), "b": win()})
    undo = c.verdict({"a": Window(1.0, 100, 50, 50, 45.0, 0.0, 5.0, 1.0, 2), "b": win()}, 3.0)
    assert undo is not None and [m.change for m in undo] == ["undone: instances 1 -> 2"]
    c.decide(risky, specs, 9.0)
    assert [m.change for m in c.decide(risky, specs, 10.0)] == ["batching off -> 8"]


def test_a_running_controller_makes_no_other_move_while_it_judges_one() -> None:
    def slow(x: Any) -> Any:
        time.sleep(0.002)
        return x

    with ap.Runtime() as rt:
        rt.add_model("slow", model=slow)
        rt.start()
        # At risk in every window (an SLO below the compute time), no dwell, one window to confirm.
        c = Controller(rt, {"slow": 1.0}, capacity=4, confirm=1, dwell_s=0.0, window_s=0.05, judge=3)
        c.step()
        made: list[list[Any]] = []
        for _ in range(8):
            for i in range(5):
                rt.call("slow", i)
            made.append(c.step())
        # One move, then three windows judged: no move in the first two; the third closes the
        # trial (the share served did not fall: it stays) and decides again.
        assert [len(m) for m in made[:4]] == [1, 0, 0, 1], [[x.change for x in m] for m in made]
        assert [m.change for m in c.moves[:2]] == ["instances 1 -> 2", "instances 2 -> 3"]


def test_a_trial_across_a_shift_of_the_load_keeps_the_move() -> None:
    c = controller(judge=1, tolerance=0.01)
    _grow_a(c, {"a": win(rate=100.0), "b": win(rate=100.0)})
    # 'a' now gets twice the requests and serves less of them: the load moved, not the move's doing.
    shifted = {"a": Window(1.0, 200, 150, 50, 45.0, 0.0, 5.0, 1.0, 2), "b": win(rate=100.0)}
    assert c.verdict(shifted, 3.0) == []
    assert c.stats()["tabu"] == {}


def _judge(c: Controller, before: list[dict[str, Window]], after: list[dict[str, Window]]) -> list[Any]:
    """Opens the trial of a grow of 'a' (two windows at risk) against ``before`` and returns the
    verdict after ``after``."""
    specs = {"a": spec("a", 1), "b": spec("b", 1)}
    risky = {"a": win(p99=45.0), "b": win(p99=5.0)}
    c.decide(risky, specs, 1.0)
    moves = c.decide(risky, specs, 2.0)
    assert [m.change for m in moves] == ["instances 1 -> 2"]
    c.trial(moves, specs, before)
    for i, w in enumerate(after[:-1]):
        assert c.verdict(w, 3.0 + i) is None
    undo = c.verdict(after[-1], 3.0 + len(after))
    assert undo is not None
    return undo


def _b_served(good: int) -> dict[str, Window]:
    """'a' serves its 100 arrivals, 'b' ``good`` of its 100."""
    return {"a": win(), "b": Window(1.0, 100, good, 100 - good, 30.0, 0.0, 5.0, 1.0, 1)}


def test_a_fall_within_the_spread_of_the_windows_before_the_move_keeps_it() -> None:
    # Beside a busy process the share served moves from window to window without any move:
    # here 100%, 93% and 98% (97% in all). After the move 92.5% is served: 4.6% less, more
    # than the tolerance of 3%, but less than the 7 points the windows moved by themselves.
    noisy = _judge(controller(judge=3, tolerance=0.03), [_b_served(100), _b_served(86), _b_served(96)],
                   [_b_served(85)] * 3)
    assert noisy == [], "kept: the fall is within the noise"
    # The same fall after three steady windows at the same 97% is the move's doing: undone.
    steady = _judge(controller(judge=3, tolerance=0.03), [_b_served(94)] * 3, [_b_served(85)] * 3)
    assert [m.change for m in steady] == ["undone: instances 1 -> 2"]
    assert "served 92.5% of arrivals within SLO after it against 97.0% before" in steady[0].reason
    # A window with a handful of arrivals (a short one: 10 ms, 2 arrivals, both refused) says
    # nothing of the spread.
    few = {"a": Window(0.01, 1, 0, 1, 5.0, 0.0, 5.0, 1.0, 1), "b": Window(0.01, 1, 0, 1, 5.0, 0.0, 5.0, 1.0, 1)}
    sparse = _judge(controller(judge=3, tolerance=0.03), [_b_served(100), few, _b_served(100)], [_b_served(85)] * 3)
    assert [m.change for m in sparse] == ["undone: instances 1 -> 2"]
    # A fall beyond the spread is undone however noisy the windows before.
    beyond = _judge(controller(judge=3, tolerance=0.03), [_b_served(100), _b_served(86), _b_served(96)],
                    [_b_served(70)] * 3)
    assert [m.change for m in beyond] == ["undone: instances 1 -> 2"]


def test_a_move_undone_under_one_load_is_tried_again_once_the_load_moves() -> None:
    # Before a shift, a grow of 'a' was undone; after the shift the hold kept 'a' from the move
    # it now needed for tabu_s. The verdict was about the old load: a moved load lifts it.
    c = controller(judge=1, tolerance=0.01, tabu_s=30.0)
    specs, risky = _grow_a(c, {"a": win(), "b": win()})
    worse = {"a": Window(1.0, 100, 50, 50, 45.0, 0.0, 5.0, 1.0, 2), "b": win()}
    undo = c.verdict(worse, 3.0)
    assert undo and c.stats()["tabu"] == {"a grow": 33.0}
    # The same load: held.
    c.history.append((4.0, risky))
    assert c.lift_stale() == [] and c.stats()["tabu"] == {"a grow": 33.0}
    # Held, 'a' at risk gets the next kind of move instead.
    assert [m.change for m in c.decide(risky, specs, 8.0) + c.decide(risky, specs, 9.0)] == ["batching off -> 8"]
    # 'a' gets 1.4x the arrivals: more than MIX_MOVED (a quarter of the larger rate) but, at 100
    # and 140 arrivals, within LIFT_SIGMAS standard deviations of Poisson noise: held.
    c.history.append((10.0, {"a": win(p99=45.0, rate=140.0), "b": win()}))
    assert c.lift_stale() == [] and c.stats()["tabu"] == {"a grow": 33.0}
    # Twice the arrivals: the hold is lifted, and 'a' grows (once its dwell after the batching
    # move has passed).
    moved = {"a": win(p99=45.0, rate=200.0), "b": win()}
    c.history.append((11.0, moved))
    assert c.lift_stale() == [("a", "grow")] and c.stats()["tabu"] == {}
    assert [m.change for m in c.decide(moved, specs, 15.0) + c.decide(moved, specs, 16.0)] == ["instances 1 -> 2"]


def test_a_hold_is_not_lifted_by_chance_nor_when_the_move_failed_requests() -> None:
    # 'a' at 30 arrivals a window: 42 is 29% more (past MIX_MOVED), well within chance.
    c = controller(judge=1, tolerance=0.01, tabu_s=30.0)
    _grow_a(c, {"a": win(rate=30.0), "b": win()})
    assert c.verdict({"a": Window(1.0, 30, 15, 15, 45.0, 0.0, 5.0, 1.0, 2), "b": win()}, 3.0)
    c.history.append((4.0, {"a": win(p99=45.0, rate=42.0), "b": win()}))
    assert c.lift_stale() == [] and c.stats()["tabu"] == {"a grow": 33.0}
    # Past tabu_s the hold is over: nothing to lift, and nothing kept for it.
    c.history.append((40.0, {"a": win(p99=45.0, rate=300.0), "b": win()}))
    assert c.lift_stale() == [] and c._tabu_load == {}
    # A move undone because 'a' failed its requests: failing fast raised its closed loop's
    # rate, and the undo brings it back down. That is no new load: the hold stays.
    f = controller(judge=1, tolerance=0.01, tabu_s=30.0)
    _grow_a(f, {"a": win(), "b": win()})
    undo = f.verdict({"a": Window(1.0, 400, 0, 0, 5.0, 0.0, 1.0, 1.0, 2, failed=400), "b": win()}, 3.0)
    assert undo and "'a' failed 100% of its requests" in undo[0].reason
    f.history.append((4.0, {"a": win(p99=45.0), "b": win()}))
    assert f.lift_stale() == [] and f.stats()["tabu"] == {"a grow": 33.0}


def _after_a_shift() -> tuple[Controller, dict[str, ap.ModelSpec], Window, Window, Window]:
    """'a' gets 3.5x the arrivals and serves 500 of 1,400 within its SLO; 'b' runs one instance
    above 100% busy (the higher p99/SLO + busy) but leaves only 20 unserved; 'idle' holds a
    core of its own."""
    c = Controller(None, {"a": 50.0, "b": 75.0, "idle": 40.0}, capacity=3, confirm=1, dwell_s=5.0, window_s=1.0)
    specs = {"a": spec("a", 1), "b": spec("b", 1), "idle": spec("idle", 1, cores=1, isolation="exclusive")}
    a = dataclasses.replace(win(p99=45.0, busy=0.95, rate=1400.0), completed=900, good=500)
    b = dataclasses.replace(win(p99=60.0, busy=1.1, rate=400.0), completed=390, good=380)
    return c, specs, a, b, win(busy=0.05, p99=1.0)


def test_of_two_models_at_risk_the_one_leaving_more_arrivals_unserved_gains() -> None:
    c, specs, a, b, calm = _after_a_shift()
    assert a.unserved == 900 and b.unserved == 20
    assert 60.0 / 75.0 + b.busy > 45.0 / 50.0 + a.busy  # the old ranking picked 'b'
    moves = c.decide({"a": a, "b": b, "idle": calm}, specs, 0.0)
    assert [(m.model, m.change) for m in moves] == [("idle", "cores 1 -> the shared pool"), ("a", "instances 1 -> 2")]
    # Without a count within the SLO, completions stand in for it.
    assert dataclasses.replace(b, good=None).unserved == 10


def test_while_the_model_leaving_most_unserved_dwells_a_lesser_one_does_not_take_the_capacity() -> None:
    # 'a' moved at 0 s and still leaves 900 arrivals a second unserved; 'b' is at risk with 20.
    # The idle model's core waits for 'a' instead of going to 'b' during a's dwell.
    c, specs, a, b, calm = _after_a_shift()
    c._last_move["a"] = 0.0  # a trial of 'a' undone at 0 s
    assert c.decide({"a": a, "b": b, "idle": calm}, specs, 2.0) == []
    moves = c.decide({"a": a, "b": b, "idle": calm}, specs, 5.0)
    assert [(m.model, m.change) for m in moves] == [("idle", "cores 1 -> the shared pool"), ("a", "instances 1 -> 2")]
    # Once 'a' leaves less unserved than 'b', 'b' is not held back by a's dwell.
    c2, *_ = _after_a_shift()
    c2._last_move["a"] = 0.0
    few = dataclasses.replace(a, completed=1390, good=1385)  # 15 unserved
    moves = c2.decide({"a": few, "b": b, "idle": calm}, specs, 2.0)
    assert [(m.model, m.change) for m in moves] == [("idle", "cores 1 -> the shared pool"), ("b", "instances 1 -> 2")]


def test_a_model_at_risk_that_gets_no_move_is_held_with_what_stopped_each_way() -> None:
    # Two models on two instances' capacity: nothing free, 'b' busy (no donor), 'a' batches
    # but its calls are half full, and its bound is already what its SLO allows.
    c = controller(capacity=2, confirm=1, dwell_s=0.0)
    specs = {"a": spec("a", 1, max_queue=8, batching=ap.Batching(8, 1.0)), "b": spec("b", 1)}
    a = win(p99=45.0, busy=0.8, rate=800.0, batch=4.0, refused=3)
    assert c.decide({"a": a, "b": win(busy=0.6)}, specs, 3.0) == []
    at_s, count, why = c.held["a"]
    assert (at_s, count) == (3.0, 1)
    assert why.startswith("SLO at risk: p99 45.0 ms of 50 ms")
    for part in ("no free capacity (2 of 2 instances held)", "no idle model to take from",
                 "calls not full (mean batch 4.0 of 8, busy 80%)", "max_queue 8 already at most what the SLO allows"):
        assert part in why, (part, why)
    assert c.decide({"a": a, "b": win(busy=0.6)}, specs, 4.0) == []
    assert c.held["a"][:2] == (4.0, 2), "counted per window"
    assert c.stats()["held"] == {"a": c.held["a"]}
    assert c.stats()["counts"]["a"] == {"moves": 0, "undone": 0, "held": 2}
    assert "b" not in c.held, "only the model most at risk is held"


def test_a_model_at_risk_in_its_dwell_is_held_for_it_and_one_that_moves_is_not() -> None:
    c, specs, a, b, calm = _after_a_shift()
    c._last_move["a"] = 0.0
    assert c.decide({"a": a, "b": b, "idle": calm}, specs, 2.0) == []
    assert c.held["a"][2] == "in its dwell since its move at 0.0 s"
    c2, *_ = _after_a_shift()
    assert c2.decide({"a": a, "b": b, "idle": calm}, specs, 0.0) != []
    assert c2.held == {}, "a move is not a hold"
    # Growth undone lately and batching off: the reason says so.
    c3 = controller(capacity=2, confirm=1, dwell_s=0.0)
    c3._tabu[("a", "grow")] = c3._tabu[("a", "batch")] = 100.0
    specs3 = {"a": spec("a", 1, admission="deadline", timeout_ms=50.0), "b": spec("b", 1)}
    assert c3.decide({"a": win(p99=45.0, busy=0.9), "b": win(busy=0.6)}, specs3, 1.0) == []
    why = c3.held["a"][2]
    for part in ("another instance was undone lately", "a batching move was undone lately",
                 "admission by deadline already refuses what would miss"):
        assert part in why, (part, why)
    # Latency with room: refusing nothing, or already admitting what the SLO allows.
    c4 = controller(capacity=2, confirm=1, dwell_s=0.0)
    specs4 = {"a": spec("a", 1, max_queue=4), "b": spec("b", 1)}
    hot = win(p99=10.0, busy=0.95, rate=100.0)
    assert c4.decide({"a": hot, "b": win(busy=0.6)}, specs4, 1.0)[0].change == "batching off -> 8"
    c4._tabu[("a", "batch")] = 100.0
    assert c4.decide({"a": hot, "b": win(busy=0.6)}, specs4, 2.0) == []
    assert "its latency has room and it refuses nothing" in c4.held["a"][2]
    full = spec("a", 1, max_queue=256)
    # ("b" without latency to spare: no share of the pool to take from it)
    assert c4.decide({"a": dataclasses.replace(hot, refused=5), "b": win(p99=30.0, busy=0.6)}, {**specs4, "a": full},
                     3.0) == []
    assert "max_queue 256 already admits what the SLO allows" in c4.held["a"][2]


def test_a_model_whose_move_reset_its_streak_still_holds_the_others_back_during_its_dwell() -> None:
    # confirm=2: after a move, 'a' needs two risky windows again while 'b' is confirmed already.
    _, specs, a, b, calm = _after_a_shift()
    c = Controller(None, {"a": 50.0, "b": 75.0, "idle": 40.0}, capacity=3, confirm=2, dwell_s=2.0, window_s=1.0)
    windows = {"a": a, "b": b, "idle": calm}
    assert c.decide(windows, specs, 0.0) == []  # first risky window of each
    c._move(0.5, "a", specs["a"], "batch 8 -> 16", "a trial")  # its streak starts again
    assert c.decide(windows, specs, 1.5) == [], "b confirmed, a not yet, but a dwells and leaves more unserved"
    assert c.held["a"][2] == "in its dwell since its move at 0.5 s"
    moves = c.decide(windows, specs, 2.5)
    assert [(m.model, m.change) for m in moves] == [("idle", "cores 1 -> the shared pool"), ("a", "instances 1 -> 2")]
    # A dwelling model that is no longer at risk holds nobody back.
    c2 = Controller(None, {"a": 50.0, "b": 75.0, "idle": 40.0}, capacity=3, confirm=2, dwell_s=2.0, window_s=1.0)
    c2.decide(windows, specs, 0.0)
    c2._move(0.5, "a", specs["a"], "batch 8 -> 16", "a trial")
    fine = win(p99=5.0, busy=0.5, rate=1400.0)
    moves = c2.decide({**windows, "a": fine}, specs, 1.5)
    assert [(m.model, m.change) for m in moves] == [("idle", "cores 1 -> the shared pool"), ("b", "instances 1 -> 2")]


# -- what an adversarial review found -------------------------------------------------------------
def test_a_failed_move_starts_no_dwell_is_not_retried_and_does_not_hold_the_others() -> None:
    # The failed grow started the model's dwell (nothing had moved), the others were held for
    # it, and the same move failed again every window after it: the errors grew for ever.
    def factory(ctx: ap.InstanceContext) -> Any:
        if ctx.instance >= 1:
            raise RuntimeError("no second instance here")
        return lambda x: (time.sleep(0.002), x)[1]

    with ap.Runtime() as rt:
        rt.add_model("m", factory=factory)
        rt.start()
        c = Controller(rt, {"m": 0.5}, capacity=4, confirm=1, dwell_s=10.0, window_s=0.1, tabu_s=60.0,
                       max_batch=1)
        c.step()
        for i in range(5):
            rt.call("m", i)
        assert c.step() == []
        assert len(c.errors) == 1 and "no second instance here" in c.errors[0]
        assert "m" not in c._last_move, "nothing moved: no dwell"
        assert "m grow" in c.stats()["tabu"]
        for _ in range(3):
            for i in range(5):
                rt.call("m", i)
            c.step()
        assert len(c.errors) == 1, c.errors  # not tried again while tabu
        assert all("batching" not in e for e in c.errors)


def test_models_whose_instances_cannot_change_are_not_grown_nor_batched_nor_donors() -> None:
    c = controller(capacity=2)
    burst = spec("a", 1, cores=1, isolation="exclusive", burst=True)
    specs = {"a": burst, "b": spec("b", 1)}
    risky = {"a": win(p99=45.0), "b": win(p99=5.0)}
    c.decide(risky, specs, 1.0)
    moves = c.decide(risky, specs, 2.0)
    assert [m.change for m in moves] == ["max_queue 1024 -> 5"]  # its admission bound alone can change
    c = controller(capacity=2)
    w = {"a": win(p99=45.0), "b": win(p99=5.0)}
    c.decide(w, {"a": dataclasses.replace(burst, max_queue=5), "b": spec("b", 1)}, 1.0)
    assert c.decide(w, {"a": dataclasses.replace(burst, max_queue=5), "b": spec("b", 1)}, 2.0) == []
    assert "cannot change while it serves" in c.held["a"][2]
    # As a donor: an idle burst model gives nothing to a model at risk.
    c = controller(capacity=2)
    specs = {"a": spec("a", 2, cores=2, isolation="exclusive", burst=True), "b": spec("b", 1)}
    windows = {"a": win(p99=1.0, busy=0.05, instances=2), "b": win(p99=45.0)}
    c.decide(windows, specs, 1.0)
    assert all(m.model != "a" for m in c.decide(windows, specs, 2.0))


def test_a_model_of_several_threads_per_instance_grows_and_gives_a_whole_instance() -> None:
    # "Growing" 1 x 4 threads gave 2 x 1 (half the threads), and a donor of 2 x 4 gave 7 of its
    # 8 threads to give one instance.
    from apportion.controller import _grown, _kind, _shrunk

    s = spec("a", 1, threads=4)
    g = _grown(s)
    assert (g.instances, g.threads) == (2, 4) and _kind(s, g) == "grow"
    d = _shrunk(spec("d", 2, threads=4))
    assert d is not None and (d.instances, d.threads) == (1, 4) and _kind(spec("d", 2, threads=4), d) == "shrink"
    one = _shrunk(spec("d", 1, threads=4))
    assert one is not None and (one.instances, one.threads) == (1, 3)
    ex = _grown(spec("e", 1, cores=4, isolation="exclusive", threads=4))
    assert (ex.cores, ex.instances, ex.threads) == (8, 2, 4)
    ex1 = _shrunk(spec("e", 1, cores=4, isolation="exclusive", threads=4))
    assert ex1 is not None and (ex1.cores, ex1.instances, ex1.threads) == (3, 1, 3)
    # A 4-thread model grows only where 4 more threads fit the capacity.
    c = controller(capacity=6)
    specs = {"a": s, "b": spec("b", 1)}
    risky = {"a": win(p99=45.0), "b": win(p99=5.0)}
    c.decide(risky, specs, 1.0)
    assert [m.change for m in c.decide(risky, specs, 2.0)] == ["batching off -> 8"]  # not an instance
    c = controller(capacity=9)
    c.decide(risky, specs, 1.0)
    assert [m.change for m in c.decide(risky, specs, 2.0)] == ["instances 1 -> 2"]


def test_models_without_an_slo_count_against_the_capacity() -> None:
    c = controller(capacity=2, max_batch=1)
    specs = {"a": spec("a", 1)}
    risky = {"a": win(p99=45.0, refused=0)}
    c.decide(risky, specs, 1.0, held_by_others=1)
    moves = c.decide(risky, specs, 2.0, held_by_others=1)
    assert all("instances" not in m.change for m in moves), moves
    c = controller(capacity=2, max_batch=1)
    c.decide(risky, specs, 1.0)
    assert c.decide(risky, specs, 2.0)[0].change == "instances 1 -> 2"  # with nobody else's instance
    with ap.Runtime() as rt:
        rt.add_model("a", model=lambda x: (time.sleep(0.002), x)[1])
        rt.add_model("bg", model=lambda x: x, instances=2)  # no SLO, holds 2 of the 2 CPUs
        rt.start()
        c = Controller(rt, {"a": 0.5}, confirm=1, dwell_s=0.0, window_s=0.1, max_batch=1, capacity=3,
                       headroom=100.0)  # no growth into idle pool time
        c.step()
        for i in range(20):
            rt.call("a", i)
        moves = c.step()
        assert all("instances" not in m.change for m in moves) and rt.spec("a").instances == 1


def test_a_model_added_again_under_the_same_name_starts_with_no_state() -> None:
    with ap.Runtime() as rt:
        rt.add_model("a", model=lambda x: x, max_queue=1024)
        rt.start()
        c = Controller(rt, {"a": 50.0}, confirm=1, window_s=0.1)
        c.step()
        c._full_queue["a"] = 1024
        c._tabu[("a", "grow")] = 1e9
        c._last_move["a"] = c.elapsed_s()
        rt.remove_model("a")
        rt.add_model("a", model=lambda x: x, max_queue=64)
        c.step()
        assert "a" not in c._full_queue and "a" not in c._last_move and not c.stats()["tabu"]
        for _ in range(3):
            c.step()
        assert c.errors == []


def test_the_objective_percentile_is_the_one_steered_by() -> None:
    # `run --adapt` passed the latency alone: a p50 objective was steered as a p99 one.
    c = Controller(None, {"a": 10.0, "b": 50.0}, capacity=4, confirm=1, percentiles={"a": 50.0})
    assert c.percentiles == {"a": 50.0, "b": 99.0}
    w = dataclasses.replace(win(p99=30.0), tail_ms=3.0)  # p99 way over, the median well under
    assert c.decide({"a": w}, {"a": spec("a")}, 1.0) == []
    late = dataclasses.replace(win(p99=30.0), tail_ms=9.0)
    moves = c.decide({"a": late}, {"a": spec("a")}, 2.0)
    assert moves and "p50 9.0 ms of 10 ms" in moves[0].reason
    with pytest.raises(QuotaError, match="percentile"):
        Controller(None, {"a": 10.0}, capacity=4, percentiles={"a": 0})
    with pytest.raises(QuotaError, match="no SLO"):
        Controller(None, {"a": 10.0}, capacity=4, percentiles={"b": 50})
    with ap.Runtime() as rt:
        rt.add_model("a", model=lambda x: x)
        rt.start()
        before = rt.stats()["a"]
        for i in range(50):
            rt.call("a", i)
        w = Window.between(before, rt.stats()["a"], 1.0, 10.0, percentile=50.0)
        assert w.tail_ms is not None and w.tail_ms <= w.p99_ms


def test_a_log_callback_that_raises_leaves_the_move_recorded_and_judged() -> None:
    def log(m: Any) -> None:
        raise ValueError("logger down")

    with ap.Runtime() as rt:
        rt.add_model("m", model=lambda x: (time.sleep(0.002), x)[1])
        rt.start()
        c = Controller(rt, {"m": 0.5}, capacity=4, confirm=1, dwell_s=0.0, window_s=0.1, log=log)
        c.step()
        for i in range(5):
            rt.call("m", i)
        moves = c.step()
        assert [m.model for m in moves] == ["m"] and c.moves == moves
        assert c.stats()["judging"] == [moves[0].change]
        assert any("the log callback raised" in e and "logger down" in e for e in c.errors)


def test_failed_calls_take_instance_time() -> None:
    w = Window(seconds=1.0, arrivals=100, completed=0, refused=0, p99_ms=20.0, queue_wait_p99_ms=0.0,
               compute_ms=20.0, mean_batch=1.0, instances=2, failed=100)
    assert w.busy == pytest.approx(1.0)

    def boom(x: Any) -> Any:
        time.sleep(0.005)
        raise RuntimeError("no")

    with ap.Runtime() as rt:
        rt.add_model("f", model=boom)
        rt.start()
        before = rt.stats()["f"]
        for i in range(10):
            with pytest.raises(RuntimeError):
                rt.call("f", i)
        w = Window.between(before, rt.stats()["f"], 0.1)
        assert w.failed == 10 and w.mean_batch == 1.0 and w.busy > 0.3


@pytest.mark.parametrize("kw", [{"max_batch": 10**9}, {"max_batch": 64, "max_batch_size": 8},
                                {"max_batch_size": 10**9}])
def test_batching_the_controller_could_not_apply_is_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(QuotaError, match="max_batch"):
        Controller(None, {"a": 50.0}, capacity=2, **kw)


def test_misuse_gets_clear_errors() -> None:
    from apportion.cli import ADAPT_WINDOW_S
    from apportion.controller import MIN_WINDOW_S

    assert ADAPT_WINDOW_S[0] == MIN_WINDOW_S  # --adapt-window-s refuses what the API does
    with pytest.raises(QuotaError, match="slos must be a mapping"):
        Controller(None, ["a"], capacity=2)  # type: ignore[arg-type]
    with pytest.raises(QuotaError, match="give capacity"):
        Controller(None, {"a": 50.0})
    # A controller of no model started and managed nothing; a key that is no name raised
    # ModelNotFound naming no field.
    for slos, message in (({}, "slos is empty"), ({1: 5.0}, "keyed by model name, got the key 1")):
        with pytest.raises(QuotaError, match=message) as err:
            Controller(None, slos, capacity=2)  # type: ignore[arg-type]
        assert err.value.field == "slos"
    rt = ap.Runtime()
    rt.add_model("a", model=lambda x: x)
    c = Controller(rt, {"a": 50.0}, window_s=0.05)
    # Started on a runtime not started, it read windows of nothing and re-planned models not built.
    with pytest.raises(ap.ApportionError, match=r"the runtime is not started; call rt.start\(\) first"):
        c.start()
    assert not c.stats()["running"]
    rt.start()
    c.start().stop()
    rt.close()
    with pytest.raises(ap.RuntimeClosed, match="closed"):
        c.start()


def test_stop_from_the_log_callback_stops_the_controller() -> None:
    box: dict[str, Any] = {}

    def log(m: Any) -> None:
        box["c"].stop()

    with ap.Runtime() as rt:
        rt.add_model("m", model=lambda x: (time.sleep(0.002), x)[1])
        rt.start()
        c = box["c"] = Controller(rt, {"m": 0.5}, capacity=4, confirm=1, dwell_s=0.0, window_s=0.05, log=log)
        c.start()
        deadline = time.monotonic() + 20
        while c.stats()["running"] and time.monotonic() < deadline:
            rt.call("m", 1)
        assert not c.stats()["running"] and c.moves
        assert not any("cannot join" in e for e in c.errors)
        c.stop()


def test_a_restarted_controller_reads_a_fresh_first_window() -> None:
    with ap.Runtime() as rt:
        rt.add_model("a", model=lambda x: x)
        rt.start()
        c = Controller(rt, {"a": 50.0}, window_s=0.05)
        c.start()
        time.sleep(0.2)
        c.stop()
        time.sleep(0.5)
        c.start()
        time.sleep(0.2)
        c.stop()
        spans = [max(w.seconds for w in ws.values()) for _, ws in c.history if ws]
        assert spans and max(spans) < 0.4, spans  # none spans the pause


def test_a_second_controller_on_one_runtime_is_refused_while_the_first_runs() -> None:
    # Both read the same windows and made the same move: 'a' grew twice, beyond the CPUs.
    with ap.Runtime() as rt:
        rt.add_model("a", model=lambda x: x)
        rt.start()
        first = Controller(rt, {"a": 50.0}, window_s=0.05).start()
        second = Controller(rt, {"a": 50.0}, window_s=0.05)
        with pytest.raises(ap.ApportionError, match="another controller already runs on this runtime"):
            second.start()
        first.stop()
        second.start()  # once the first stopped
        assert second.stats()["running"]
        second.stop()


def test_a_model_nothing_can_help_does_not_hold_back_the_next_one_at_risk() -> None:
    # "a" misses its SLO the worst, but no move helps it (no room, no idle donor, batching not
    # allowed, admission by deadline already refuses what would miss); "b" refuses requests its
    # latency had room for. "b" went unhelped for good while "a" stayed the neediest.
    specs = {"a": spec("a", 1, max_queue=4, admission="deadline"), "b": spec("b", 1, max_queue=8)}
    late = Window(seconds=1.0, arrivals=400, completed=100, refused=300, p99_ms=500.0, queue_wait_p99_ms=0.0,
                  compute_ms=10.0, mean_batch=1.0, instances=1)
    refusing = Window(seconds=1.0, arrivals=1000, completed=980, refused=20, p99_ms=10.0, queue_wait_p99_ms=0.0,
                      compute_ms=0.9, mean_batch=1.0, instances=1)
    assert late.unserved > refusing.unserved
    c = controller(capacity=2, confirm=1, batchable=False)
    moves = c.decide({"a": late, "b": refusing}, specs, 0.0, queue_sizes={"a": 64, "b": 64})
    assert [(m.model, m.change) for m in moves] == [("b", "max_queue 8 -> 27")]
    assert "admission by deadline already refuses what would miss" in c.held["a"][2]
    # While "b" dwells after its move, "a" is still held, and "b" is not moved again.
    assert c.decide({"a": late, "b": refusing}, {**specs, "b": moves[0].spec}, 1.0,
                    queue_sizes={"a": 64, "b": 64}) == []
    assert c.held["a"][1] == 2


# -- backlogs, stalls and restores in a trial -----------------------------------------------------

def _backlog(arrivals: int, completed: int, good: int, queued_before: int, queued: int) -> Window:
    """A one-second window of a 4 ms model ('a') with a queue that ran from ``queued_before``
    to ``queued``."""
    return Window(seconds=1.0, arrivals=arrivals, completed=completed, refused=0, p99_ms=900.0,
                  queue_wait_p99_ms=800.0, compute_ms=4.0, mean_batch=1.0, instances=1, good=good,
                  queued=queued, queued_before=queued_before)


def test_a_growth_that_works_off_a_backlog_is_judged_by_the_other_models() -> None:
    # 400/s at a 4 ms model: one instance serves 250/s, its queue grows, and almost nothing
    # meets the SLO. Grown to two, it serves 500/s: the backlog queued before the move drains
    # at 100/s, every request of it completed late, so its share within the SLO falls to 0
    # for as long as the backlog lasts. That was undone (and growth tabu for tabu_s), leaving
    # the model to refuse what two instances would serve.
    c = controller(capacity=4, judge=3)
    specs = {"a": spec("a", 1, max_queue=1024), "b": spec("b", 1)}
    before = [{"a": _backlog(400, 250, 6, 150 * i, 150 * (i + 1)), "b": win()} for i in range(3)]
    grown = [m for m in c.decide(before[-1], specs, 10.0) if m.model == "a"] or \
        [m for m in c.decide(before[-1], specs, 11.0) if m.model == "a"]
    assert [m.change for m in grown] == ["instances 1 -> 2"]
    c.trial(grown, specs, before)
    draining = [{"a": _backlog(400, 500, 0, 450 - 100 * i, 350 - 100 * i), "b": win()} for i in range(3)]
    assert c.verdict(draining[0], 12.0) is None and c.verdict(draining[1], 13.0) is None
    assert c.verdict(draining[2], 14.0) == [], "kept: 'b' served as before, 'a' works off its backlog"
    assert c.stats()["tabu"] == {}
    # The same, but 'b' served less after the move (the growth took its CPU): undone, and
    # the reason says what was judged.
    c.trial(grown, specs, before)
    starved = {"b": Window(1.0, 100, 60, 40, 30.0, 0.0, 5.0, 1.0, 1)}
    for i in range(2):
        assert c.verdict({**draining[i], **starved}, 15.0 + i) is None
    undo = c.verdict({**draining[2], **starved}, 17.0)
    assert undo is not None and [(m.model, m.change) for m in undo] == [("a", "undone: instances 1 -> 2")]
    assert ("served 60.0% of arrivals within SLO after it against 100.0% before (leaving out 'a' while it worked "
            "off a backlog)") in undo[0].reason
    # Its backlog gone after the first window, the move then hurt it (none within its SLO):
    # those windows judge it, and it is undone. (Left out of the whole trial, it was kept.)
    c.trial(grown, specs, [{"a": _backlog(400, 400, 360, 55, 55), "b": win()}] * 3)  # 90% within the SLO
    cleared = [{"a": _backlog(400, 500, 0, 150, 1), "b": win()},
               {"a": _backlog(400, 399, 0, 1, 1), "b": win()}, {"a": _backlog(400, 400, 0, 1, 1), "b": win()}]
    assert cleared[0]["a"].backlogged and not cleared[1]["a"].backlogged
    assert c.verdict(cleared[0], 24.0) is None and c.verdict(cleared[1], 25.0) is None
    undo = c.verdict(cleared[2], 26.0)
    assert undo is not None and [m.change for m in undo] == ["undone: instances 1 -> 2"], undo
    # A trial opened with no windows before it (Controller.trial is public) keeps its move.
    c.trial(grown, specs, [])
    assert c.verdict(draining[0], 30.0) is None and c.verdict(draining[1], 31.0) is None
    assert c.verdict(draining[2], 32.0) == []
    # A model whose queue grew over the trial drained nothing: all models are judged together.
    c.trial(grown, specs, before)
    growing = {"a": _backlog(400, 300, 0, 450, 550), "b": win()}
    for i in range(2):
        assert c.verdict(growing, 20.0 + i) is None
    assert c.verdict(growing, 22.0) is not None and c.verdict(growing, 23.0) == []  # undone, then no trial


def test_a_model_whose_requests_wait_while_none_completes_is_at_risk_and_never_a_donor() -> None:
    # 2.5 s calls against a 100 ms SLO: in a one-second window none completes, so its p99
    # (of completed requests) reads 0 and it read as idle, giving an instance away while
    # its queue held requests certain to miss.
    c = Controller(None, {"a": 100.0, "b": 20.0}, capacity=3, confirm=1, dwell_s=0.0)
    stalled = Window(seconds=1.0, arrivals=6, completed=0, refused=0, p99_ms=0.0, queue_wait_p99_ms=0.0,
                     compute_ms=0.0, mean_batch=1.0, instances=2, queued=43, queued_before=37,
                     oldest_call_ms=900.0)
    assert stalled.stuck and not stalled.draining
    specs = {"a": spec("a", 2, max_queue=1000), "b": spec("b", 1)}
    moves = c.decide({"a": stalled, "b": win(p99=30.0, busy=0.95)}, specs, 0.0)
    assert all(m.model != "a" for m in moves), moves
    assert (c.stats()["at_risk_streak"]["a"], c.stats()["idle_streak"]["a"]) == (1, 0)
    # ... but not where a window is short against the SLO: 3 s calls, a 10 s SLO, 1 s windows.
    c = Controller(None, {"a": 10_000.0, "b": 20.0}, capacity=3, confirm=1, dwell_s=0.0)
    slow = dataclasses.replace(stalled, oldest_call_ms=900.0)
    busy_b = win(p99=30.0, busy=0.95)
    assert all(m.model != "a" for m in c.decide({"a": slow, "b": busy_b}, {"a": spec("a", 2), "b": spec("b")}, 0.0))
    assert c.stats()["at_risk_streak"]["a"] == 0 and c.stats()["idle_streak"]["a"] == 0  # nor a donor
    # ... until such windows in a row last the SLO's risk share (8 s of it): a stall judged
    # one window at a time was never at risk.
    for k in range(1, 9):
        c.decide({"a": slow, "b": busy_b}, {"a": spec("a", 2), "b": spec("b")}, float(k))
    assert c.stats()["at_risk_streak"]["a"] == 1
    c = Controller(None, {"a": 100.0}, capacity=3, confirm=1, dwell_s=0.0)
    got = c.decide({"a": stalled}, {"a": spec("a", 2)}, 0.0)
    assert [m.change for m in got] == ["instances 2 -> 3"]
    assert "stalled: 43 queued, none completed in 1.0 s" in got[0].reason and "a call running 900 ms" in got[0].reason
    # A call already past the SLO's risk share is at risk too, with nothing queued.
    c = Controller(None, {"a": 100.0}, capacity=3, confirm=1, dwell_s=0.0)
    long_call = dataclasses.replace(win(p99=5.0, busy=0.1, instances=2), oldest_call_ms=250.0)
    got = c.decide({"a": long_call}, {"a": spec("a", 2)}, 0.0)
    assert [m.change for m in got] == ["instances 2 -> 3"]
    # ... and neither a queue longer than one request per instance nor a call over half the
    # SLO reads idle, where the same window without them does.
    for busy_enough in ({"queued": 3}, {"oldest_call_ms": 60.0}):
        c = Controller(None, {"a": 100.0, "b": 20.0}, capacity=3, confirm=1, dwell_s=0.0)
        quiet = dataclasses.replace(win(p99=5.0, busy=0.05, instances=2), **busy_enough)
        moves = c.decide({"a": quiet, "b": win(p99=30.0, busy=0.95)}, specs, 0.0)
        assert all(m.model != "a" for m in moves), (busy_enough, moves)
    c = Controller(None, {"a": 100.0, "b": 20.0}, capacity=3, confirm=1, dwell_s=0.0)
    moves = c.decide({"a": win(p99=5.0, busy=0.05, instances=2), "b": win(p99=30.0, busy=0.95)}, specs, 0.0)
    assert [(m.model, m.change) for m in moves] == [("a", "instances 2 -> 1"), ("b", "instances 1 -> 2")]


def test_an_idle_models_restored_admission_is_not_undone_with_the_move_it_rode_along_with() -> None:
    c = controller(capacity=3, confirm=1, dwell_s=0.0, judge=1)
    specs = {"a": spec("a", 1, max_queue=4), "b": spec("b", 1, max_queue=64)}
    c._full_queue["a"] = 64  # the controller had lowered it
    moves = c.decide({"a": win(p99=1.0, busy=0.05), "b": win(p99=45.0, busy=0.95)}, specs, 10.0)
    assert [(m.model, m.change) for m in moves] == [("a", "max_queue 4 -> 64"), ("b", "instances 1 -> 2")]
    c.trial(moves, specs, [{"a": win(), "b": win()}])
    undo = c.verdict({"a": win(), "b": Window(1.0, 100, 50, 50, 90.0, 0.0, 5.0, 1.0, 1)}, 11.0)
    assert undo is not None and [(m.model, m.change) for m in undo] == [("b", "undone: instances 1 -> 2")]
    assert c.stats()["tabu"] == {"b grow": 41.0}


def test_a_swap_the_runtime_refuses_moves_nothing_and_holds_the_receivers_swaps(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a real runtime, "a" turns requests away with every instance busy and its pool
    # neighbours "m" and "n" each run two one-thread instances on 0.3 CPUs: "m" gives one to "a".
    # The runtime refuses the swap ("a"'s third instance fails to start): nothing moves, the
    # failure is reported, and neither donor gives "a" an instance while the swap is held.
    def factory(ctx: ap.InstanceContext) -> Any:
        if ctx.instance >= 2:
            raise RuntimeError("no third instance here")
        return lambda x: x

    hot = win(p99=60.0, busy=1.1, refused=50, batch=2.0, instances=2)
    light = win(p99=10.0, busy=0.6, instances=2)
    # The windows, the models' CPU time and the pool's busy time are set (the load is not:
    # decide()'s tests cover the readings); the moves go through step() to the runtime.
    monkeypatch.setattr(Window, "between", classmethod(lambda cls, before, after, seconds, slo_ms=None,
                                                       percentile=99.0: hot if slo_ms == 75.0 else light))
    now = [0.0]
    with ap.Runtime() as rt:
        rt.add_model("a", factory=factory, instances=2, batching=ap.Batching(8, 1.0))
        rt.add_model("m", model=lambda x: x, instances=2)
        rt.add_model("n", model=lambda x: x, instances=2)
        rt.start()
        c = Controller(rt, {"a": 75.0, "m": 50.0, "n": 50.0}, capacity=2, confirm=1, dwell_s=0.0, judge=1,
                       clock=lambda: now[0])
        monkeypatch.setattr(c, "_cpu_s", lambda: ({"a": 1.1 * now[0], "m": 0.3 * now[0], "n": 0.3 * now[0]}, None))
        monkeypatch.setattr(c, "_pool_busy_s", lambda: (frozenset({0, 1}), 2.0 * now[0]))  # no idle CPU
        assert c.step() == []
        # An earlier verdict's hold on "a"'s growth, judged under today's load (a hold on more
        # instances does not hold a swap: the swap below is still tried).
        c._tabu[("a", "grow")], c._tabu_load[("a", "grow")] = 20.0, [{"a": hot, "m": light, "n": light}]
        now[0] = 1.0
        assert c.step() == []
        assert c.windows["m"].pool_cpu_s == pytest.approx(0.3) and c.idle_cpus == pytest.approx(0.0)
        assert len(c.errors) == 1, c.errors
        assert "m: instances 2 -> 1; a: instances 2 -> 3: " in c.errors[0], c.errors
        assert "no third instance here" in c.errors[0]
        assert c.moves == [] and rt.spec("a").instances == 2 and rt.spec("m").instances == 2
        assert c._tabu[("a", "swap")] == c._tabu[("m", "shrink")] == c._tabu[("a", "grow")] == 1.0 + c.tabu_s
        assert c._gave == {}  # nothing was given: nothing to take back
        # The refusal held "a"'s growth again, and a refusal's hold is not about the load: a
        # load that moves (four times "a"'s arrivals) lifts none of them.
        c.history.append((1.5, {"a": win(rate=400.0), "m": light, "n": light}))
        assert c.lift_stale() == [] and c._tabu[("a", "grow")] == 1.0 + c.tabu_s
        c.history.pop()
        now[0] = 2.0
        later = c.step()
        assert all(m.model not in ("m", "n") for m in later), later  # "n" could give, and does not
        assert all("taken from" not in m.reason for m in later), later
        assert [rt.call(n, 5) for n in ("a", "m", "n")] == [5, 5, 5]
        # Past the hold the swap is tried again (and refused again): it was held, not given up.
        now[0] = 3.0 + c.tabu_s
        c._trial = None  # whatever "a" got in the last window is not what this checks
        c.step()
        assert len(c.errors) == 2 and "a: instances 2 -> 3" in c.errors[1], c.errors
