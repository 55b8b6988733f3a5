"""Dynamic batching: formation, max_delay, preferred sizes, deadlines, stack/split, failures,
and exactly-once completion under priorities, batching, cancels, deadlines and a close."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest

import apportion as ap

HOUR_MS = 3_600_000.0


class ListModel:
    """A batching model over plain lists: records each call's inputs, returns x * 10 each."""

    def __init__(self, per_call_s: float = 0.0) -> None:
        self.calls: list[list[object]] = []
        self.per_call_s = per_call_s

    def __call__(self, xs: list[object]) -> list[object]:
        assert isinstance(xs, list)
        self.calls.append(list(xs))
        if self.per_call_s:
            time.sleep(self.per_call_s)
        return [x * 10 for x in xs]  # type: ignore[operator]

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.calls]


# -- the quota ----------------------------------------------------------------------------------


def test_batching_is_a_validated_frozen_quota() -> None:
    b = ap.Batching(max_size=8, max_delay_ms=2, preferred_sizes=[4, 2, 4])
    assert (b.max_size, b.max_delay_ms, b.preferred_sizes) == (8, 2.0, (2, 4))
    with pytest.raises(AttributeError):
        b.max_size = 3  # type: ignore[misc]
    for kwargs, field in [
        (dict(max_size=0, max_delay_ms=1), "max_size"),
        (dict(max_size=True, max_delay_ms=1), "max_size"),
        (dict(max_size=4, max_delay_ms=-1), "max_delay_ms"),
        (dict(max_size=4, max_delay_ms=float("nan")), "max_delay_ms"),
        (dict(max_size=4, max_delay_ms=10 ** 400), "max_delay_ms"),  # an int beyond every float
        (dict(max_size=4, max_delay_ms=1.0001e9), "max_delay_ms"),  # beyond the engine's longest wait
        (dict(max_size=4, max_delay_ms=1, preferred_sizes=[5]), "preferred_sizes"),
        (dict(max_size=4, max_delay_ms=1, preferred_sizes=[]), "preferred_sizes"),
        (dict(max_size=4, max_delay_ms=1, preferred_sizes="2"), "preferred_sizes"),
        (dict(max_size=4, max_delay_ms=1, single_unbatched=1), "single_unbatched"),
        (dict(max_size=4, max_delay_ms=1, single_unbatched="yes"), "single_unbatched"),
    ]:
        with pytest.raises(ap.QuotaError, match=f"field 'batching.{field}': must be") as e:
            ap.Batching(**kwargs)  # type: ignore[arg-type]
        assert e.value.field == f"batching.{field}"  # dotted, as GPU's fields are (was "max_size")


def test_add_model_names_the_model_and_field(rt: ap.Runtime) -> None:
    with pytest.raises(ap.QuotaError, match=r"model 'm', field 'batching': must be an apportion.Batching"):
        rt.add_model("m", model=lambda xs: xs, batching=16)  # type: ignore[arg-type]
    bad = ap.Batching(4, 1.0)
    object.__setattr__(bad, "max_size", 0)  # bypassing the dataclass: add_model checks again
    with pytest.raises(ap.QuotaError, match=r"model 'm', field 'batching.max_size': must be"):
        rt.add_model("m", model=lambda xs: xs, batching=bad)
    assert rt.models == []


# -- formation ----------------------------------------------------------------------------------


def test_batches_are_formed_up_to_max_size_and_split_back(rt: ap.Runtime) -> None:
    model = ListModel()
    rt.add_model("m", model=model, batching=ap.Batching(max_size=4, max_delay_ms=5))
    futs = rt.submit_many("m", range(10))  # queued before start: the worker finds all ten
    rt.start()
    assert [f.result(10) for f in futs] == [i * 10 for i in range(10)]
    assert model.sizes == [4, 4, 2]
    assert model.calls[0] == [0, 1, 2, 3]
    s = rt.stats()["m"]
    assert (s.completed, s.batches, s.max_batch_size) == (10, 3, 4)
    assert s.mean_batch_size == pytest.approx(10 / 3)
    assert s.end_to_end.count == 10 and s.compute.count == 10 and s.queue_wait.count == 10


def test_batches_take_the_highest_priority_first(rt: ap.Runtime) -> None:
    model = ListModel()
    rt.add_model("m", model=model, priority_levels=3, batching=ap.Batching(max_size=3, max_delay_ms=1))
    futs = [rt.submit("m", i, priority=2 - i % 3) for i in range(9)]
    rt.start()
    for f in futs:
        f.result(10)
    assert model.calls == [[2, 5, 8], [1, 4, 7], [0, 3, 6]]


def test_a_lone_request_is_served_after_max_delay(rt: ap.Runtime) -> None:
    model = ListModel()
    rt.add_model("m", model=model, batching=ap.Batching(max_size=8, max_delay_ms=50))
    rt.start()
    t0 = time.monotonic()
    assert rt.submit("m", 1).result(10) == 10  # not never
    assert time.monotonic() - t0 >= 0.05  # it waited for company first
    assert model.sizes == [1]


def test_requests_arriving_within_max_delay_join_the_batch(rt: ap.Runtime) -> None:
    model = ListModel()
    rt.add_model("m", model=model, batching=ap.Batching(max_size=8, max_delay_ms=HOUR_MS))
    rt.start()
    futs = [rt.submit("m", i) for i in range(8)]  # a full batch goes at once, delay or not
    assert [f.result(10) for f in futs] == [i * 10 for i in range(8)]
    assert model.sizes == [8]


def test_closed_loop_clients_all_in_the_batch_are_served_without_waiting(rt: ap.Runtime) -> None:
    # Four closed-loop clients: once all four requests are in the batch nothing more can come
    # until it is answered, and the worker learns it. A call takes 20 ms, so one more request
    # would save ~15 ms, far longer than the gaps between the four submissions: measured by
    # those, every round waited its 50 ms of max_delay. A batch of one or three is as often a
    # round's first requests (the rest follow at once) as its stragglers (nothing follows):
    # measured by the average of those, the worker split rounds 1 + 3 (or 3 + 1, 2 + 2) for
    # good, one call more per round (15-20 calls for 10 rounds, in 7 runs of 12). Each batch size
    # waits once while nothing is known about it; after the learning rounds a round takes one
    # call, and no request waits max_delay, but for stalls of the machine (a stalled client
    # splits its round, a stalled worker holds it).
    delay_ms, learning, rounds, clients = 50.0, 5, 10, 4
    model = ListModel(per_call_s=0.02)
    rt.add_model("m", model=model, batching=ap.Batching(max_size=16, max_delay_ms=delay_ms))
    rt.start()

    def held() -> int:
        wait = rt.stats()["m"].queue_wait.histogram
        assert wait is not None
        return sum(c for c, upper in zip(wait.counts, wait.upper_bounds) if upper > 0.8 * delay_ms * 1e6)

    rounds_started, held_while_learning, calls_while_learning = 0, -1, -1

    def next_round() -> None:  # the barrier's action: every client is between two requests
        nonlocal rounds_started, held_while_learning, calls_while_learning
        if rounds_started == learning:
            held_while_learning, calls_while_learning = held(), len(model.calls)
        rounds_started += 1

    go = threading.Barrier(clients, action=next_round)

    def client(i: int) -> None:
        for _ in range(learning + rounds):
            go.wait(10)  # answered together, they resubmit together
            assert rt.call("m", i, timeout_ms=10_000) == i * 10

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert rounds_started == learning + rounds and held_while_learning >= 0
    measured = held() - held_while_learning
    assert measured <= 2 * clients, f"{measured} of {rounds * clients} requests waited for max_delay"
    assert sum(model.sizes) == (learning + rounds) * clients
    calls = len(model.calls) - calls_while_learning
    assert calls <= rounds + rounds // 2, f"{rounds} rounds took {calls} calls: {model.sizes[-calls:]}"


def test_preferred_size_dispatches_without_waiting(rt: ap.Runtime) -> None:
    model = ListModel()
    rt.add_model("m", model=model,
                 batching=ap.Batching(max_size=8, max_delay_ms=HOUR_MS, preferred_sizes=(2, 5)))
    futs = rt.submit_many("m", [1, 2])
    rt.start()
    # With an hour of max_delay only the preferred size lets this batch go.
    assert [f.result(10) for f in futs] == [10, 20]
    futs = rt.submit_many("m", range(5))
    assert [f.result(10) for f in futs] == [i * 10 for i in range(5)]
    assert model.sizes == [2, 5]


def test_batching_of_one_still_passes_lists(rt: ap.Runtime) -> None:
    model = ListModel()
    rt.add_model("m", model=model, batching=ap.Batching(max_size=1, max_delay_ms=0))
    rt.start()
    assert [f.result(10) for f in rt.submit_many("m", [1, 2])] == [10, 20]
    assert model.calls == [[1], [2]]


# -- deadlines ----------------------------------------------------------------------------------


def test_request_that_no_batch_can_serve_in_time_is_expired_early(rt: ap.Runtime) -> None:
    model = ListModel(per_call_s=0.1)  # every call takes >= 100 ms
    rt.add_model("m", model=model, batching=ap.Batching(max_size=4, max_delay_ms=0))
    rt.start()
    assert rt.submit("m", 1).result(10) == 10  # the worker learns what a call costs
    hopeless = rt.submit("m", 2, timeout_ms=50)
    with pytest.raises(ap.DeadlineExceeded, match=r"model 'm': deadline of [\d.]+ ms could not be met"):
        hopeless.result(10)
    assert model.calls == [[1]]
    # With room to spare the same request runs.
    assert rt.submit("m", 3, timeout_ms=10_000).result(10) == 30
    s = rt.stats()["m"]
    assert (s.expired, s.completed) == (1, 2)


def test_request_is_not_put_into_a_batch_that_would_finish_too_late(rt: ap.Runtime) -> None:
    def model(xs):
        time.sleep(0.2 * len(xs))  # a call costs >= 200 ms per request
        calls.append(list(xs))
        return xs

    calls: list[list[int]] = []
    rt.add_model("m", model=model, batching=ap.Batching(max_size=8, max_delay_ms=0))
    rt.start()
    assert rt.submit("m", 0).result(10) == 0  # the worker learns: >= 200 ms for one
    # 500 ms each: the worker estimates three at >= 600 ms, so they never share a call (a
    # deadline-blind batcher would put all three in one call that finishes too late for all).
    # The first has 300 ms to spare, for a stretched learning call or a late dispatch.
    futs = rt.submit_many("m", [1, 2, 3], timeout_ms=500)
    outcomes = []
    for f in futs:
        exc = f.exception(10)
        assert exc is None or isinstance(exc, ap.DeadlineExceeded), exc
        outcomes.append(exc is None)
    assert outcomes[0], "the first fits in a call of its own"
    assert max(len(c) for c in calls) < 3
    ran = [x for c in calls for x in c]
    assert sorted(ran) == sorted(set(ran))  # nothing ran twice
    s = rt.stats()["m"]
    assert s.completed + s.expired == 4 and s.in_flight == 0


def test_delay_policy_runs_hopeless_requests_last(rt: ap.Runtime) -> None:
    model = ListModel(per_call_s=0.05)
    rt.add_model("m", model=model, on_timeout="delay", batching=ap.Batching(max_size=4, max_delay_ms=0))
    rt.start()
    rt.submit("m", 0).result(10)
    assert rt.submit("m", 1, timeout_ms=10).result(10) == 10  # delayed, then run
    s = rt.stats()["m"]
    assert (s.delayed, s.expired, s.completed) == (1, 0, 2)


# -- arrays: stack and split --------------------------------------------------------------------


def test_numpy_inputs_are_stacked_and_split_along_dim0(rt: ap.Runtime) -> None:
    shapes = []

    def model(x):
        shapes.append(x.shape)
        return x.sum(axis=1, keepdims=True) * 2

    rt.add_model("m", model=model, batching=ap.Batching(max_size=3, max_delay_ms=5))
    futs = rt.submit_many("m", [np.full(4, i, dtype=np.float32) for i in range(5)])
    rt.start()
    out = [f.result(10) for f in futs]
    assert shapes == [(3, 4), (2, 4)]
    for i, y in enumerate(out):
        assert isinstance(y, np.ndarray) and y.shape == (1,) and y[0] == 8 * i


def served_linear(rt: ap.Runtime, n: int, batching: ap.Batching) -> tuple[Any, list[tuple[int, ...]]]:
    """A torch Linear(3, 2) served as model "m" with ``batching``: ``n`` random inputs submitted
    together before the start. Checks that each request got its own row's result; returns the
    module and the input shapes of its calls."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    shapes: list[tuple[int, ...]] = []
    lin.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    xs = [torch.randn(3) for _ in range(n)]
    with torch.no_grad():
        expected = [lin(x) for x in xs]
    shapes.clear()
    rt.add_model("m", model=lin, threads=1, batching=batching)
    futs = rt.submit_many("m", xs)
    rt.start()
    for y, e in zip([f.result(10) for f in futs], expected):
        assert y.shape == (2,)
        torch.testing.assert_close(y, e)
    return lin, shapes


def test_torch_module_sees_a_stacked_batch_and_each_request_its_row(rt: ap.Runtime) -> None:
    _, shapes = served_linear(rt, 6, ap.Batching(max_size=4, max_delay_ms=5))
    assert shapes == [(4, 3), (2, 3)]
    # A lone request keeps its batch dim here by default: the module has a forward hook (the
    # one that records these shapes), which may read the shape.
    rt.call("m", pytest.importorskip("torch").randn(3))
    assert shapes[-1] == (1, 3)


def test_with_single_unbatched_a_batch_of_one_is_the_input_as_it_is(rt: ap.Runtime) -> None:
    # A lone request paid for a one-row matrix product and the stacking, where the model could
    # serve its vector as it is (what a call without batching costs).
    rt.add_model("lists", model=lambda x: ("as is", x),
                 batching=ap.Batching(max_size=4, max_delay_ms=5, single_unbatched=True))
    lin, shapes = served_linear(rt, 5, ap.Batching(max_size=4, max_delay_ms=5, single_unbatched=True))
    assert shapes == [(4, 3), (3,)], "a batch of four stacked, the fifth alone as it is"
    x = pytest.importorskip("torch").randn(3)
    assert rt.call("m", x).shape == (2,) and shapes[-1] == (3,)
    assert rt.call("lists", 7) == ("as is", 7), "any input: the model's own result, not a list's element"
    # From a config table, and back.
    for word in (True, False):
        spec = ap.ModelSpec.from_table("t", {"factory": "x:y", "batching": {"max_size": 4, "single_unbatched": word}})
        assert spec.batching == ap.Batching(4, 0.0, single_unbatched=word)
        assert spec.to_table()["batching"] == {"max_size": 4, "max_delay_ms": 0.0, "single_unbatched": word}
    spec = ap.ModelSpec.from_table("t", {"factory": "x:y", "batching": {"max_size": 4}})
    assert spec.batching is not None and spec.batching.single_unbatched is None
    assert spec.to_table()["batching"] == {"max_size": 4, "max_delay_ms": 0.0}, "the default is not written"


def recorded(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[int, ...]]:
    """The input shapes of every call of ``torch.nn.functional.<name>`` from now on (the layers'
    own forward calls it: no hook on the module, which would make it not row-wise)."""
    torch = pytest.importorskip("torch")
    real_fn = getattr(torch.nn.functional, name)
    shapes: list[tuple[int, ...]] = []

    def record(x: Any, *args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(x.shape))
        return real_fn(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, name, record)
    return shapes


def test_a_row_wise_torch_sequential_serves_a_batch_of_one_unbatched_by_default(
        rt: ap.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    # A lone request to a batching torch MLP paid for a one-row matrix product and the stacking
    # (~2-5% of the MLP call at one client): its layers give a row the result they give
    # the batch's row 0, so the default serves it as it is.
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    xs = [torch.randn(3) for _ in range(5)]
    with torch.no_grad():
        expected = [net(x[None])[0] for x in xs]
    shapes = recorded(monkeypatch, "linear")
    rt.add_model("m", model=net, threads=1, batching=ap.Batching(max_size=4, max_delay_ms=5))
    rt.add_model("batched", model=net, threads=1, batching=ap.Batching(max_size=4, max_delay_ms=5,
                                                                          single_unbatched=False))
    futs = rt.submit_many("m", xs)
    rt.start()
    for f, e in zip(futs, expected, strict=True):
        torch.testing.assert_close(f.result(10), e)
    assert shapes == [(4, 3), (4, 4), (3,), (4,)], "a batch of four stacked, the fifth as it is"
    shapes.clear()
    torch.testing.assert_close(rt.call("m", xs[0]), expected[0])
    assert shapes == [(3,), (4,)]
    shapes.clear()
    torch.testing.assert_close(rt.call("batched", xs[0]), expected[0])
    assert shapes == [(1, 3), (1, 4)], "single_unbatched=False: every call gets a batch"
    shapes.clear()
    # A numpy array is not a tensor the rule knows: the stacked path, as ever (torch refuses it).
    with pytest.raises(TypeError):
        rt.call("m", np.zeros(3, dtype=np.float32))
    assert shapes == [(1, 3)]


def test_a_zero_dim_tensor_keeps_its_batch_dim(rt: ap.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    # A scalar has no row to serve alone: it is served as the batch (1,), as without the rule.
    torch = pytest.importorskip("torch")
    shapes = recorded(monkeypatch, "relu")
    rt.add_model("m", model=torch.nn.Sequential(torch.nn.ReLU()), batching=ap.Batching(max_size=4, max_delay_ms=5))
    rt.start()
    assert rt.call("m", torch.tensor(-2.0)).item() == 0.0 and shapes == [(1,)]
    assert rt.call("m", torch.tensor([-2.0, 3.0])).tolist() == [0.0, 3.0] and shapes[-1] == (2,)


def test_only_modules_that_treat_each_row_alone_are_served_unbatched() -> None:
    torch = pytest.importorskip("torch")
    from apportion.adapters.torch import TorchModel, rows_alone
    from apportion.batching import serves_rows_alone
    nn = torch.nn

    class MySequential(nn.Sequential):
        pass

    assert rows_alone(nn.Linear(3, 2)) and rows_alone(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Dropout()))
    assert rows_alone(nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Identity())))
    for module, why in [
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "BatchNorm1d reads a (C,) input as one channel each"),
        (nn.Sequential(nn.Conv1d(1, 1, 1)), "a convolution's unbatched input has other dims"),
        (nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=0)), "dim 0 is the batch in one and a feature in the other"),
        (MySequential(nn.Linear(3, 4)), "a subclass may override forward"),
        (nn.Sequential(nn.Flatten()), "Flatten keeps dim 0"),
    ]:
        assert not rows_alone(module), why
    hooked = nn.Sequential(nn.Linear(3, 4))
    handle = hooked[0].register_forward_pre_hook(lambda mod, args: None)
    assert not rows_alone(hooked), "a hook may read the shape"
    handle.remove()
    assert rows_alone(hooked)
    handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        assert not rows_alone(hooked), "a global hook may read the shape"
    finally:
        handle.remove()
    ctx = ap.InstanceContext(model="m", instance=0, instances=1)
    assert serves_rows_alone(TorchModel(hooked, ctx))
    assert not serves_rows_alone(TorchModel(nn.Sequential(nn.BatchNorm1d(3)), ctx))
    assert not serves_rows_alone(hooked), "a module not served through the torch adapter"


def test_every_row_layer_gives_a_row_what_it_gives_the_batch_of_one() -> None:
    # The rule's list is a claim about each layer: checked for each, on a vector and a matrix
    # input, in float32 and float64 (a layer added to the list that broke it would fail here).
    torch = pytest.importorskip("torch")
    from apportion.adapters.torch import _ROW_LAYERS

    for layer in sorted(_ROW_LAYERS, key=lambda c: c.__name__):
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)
            m = (layer(5, 4) if layer is torch.nn.Linear else layer()).to(dtype).eval()
            for shape in ((5,), (3, 5)):
                x = torch.randn(shape, dtype=dtype)
                with torch.inference_mode():
                    alone, batched = m(x), m(x[None])[0]
                assert alone.shape == batched.shape, layer
                torch.testing.assert_close(alone, batched, msg=lambda e, layer=layer: f"{layer.__name__}: {e}")


def test_a_module_whose_forward_is_set_on_the_instance_or_a_tensor_off_the_cpu_keeps_its_batch_dim() -> None:
    torch = pytest.importorskip("torch")
    from apportion.adapters.torch import rows_alone
    from apportion.batching import _a_row

    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    assert rows_alone(net)
    net[0].forward = lambda x: x.sum(0)  # a forward of the instance's own: not the class's
    assert not rows_alone(net)
    assert _a_row(torch.zeros(3)) and not _a_row(torch.zeros(())), "a CPU vector, not a scalar"
    assert not _a_row(torch.zeros(3, device="meta")), "off the CPU, a row's product may round otherwise"
    assert not _a_row(torch.zeros(3).to_sparse()) and not _a_row(torch.nn.Parameter(torch.zeros(3)))


def test_arrays_of_different_shapes_in_one_batch_are_served_one_call_per_shape(rt: ap.Runtime) -> None:
    # They were stacked together: every request of the batch failed with numpy's "all input
    # arrays must have the same shape" (naming no model), the well-formed ones included.
    shapes = []

    def model(x):
        shapes.append((x.shape, x.dtype))
        return x.sum(axis=1, keepdims=True)

    rt.add_model("m", model=model, batching=ap.Batching(max_size=8, max_delay_ms=5))
    xs = [np.ones(3, np.float32), np.ones(4, np.float32), np.ones(3, np.float32), np.ones(3, np.float64),
          np.ones(4, np.float32)]
    futs = rt.submit_many("m", xs)
    rt.start()
    assert [float(f.result(10)[0]) for f in futs] == [3.0, 4.0, 3.0, 3.0, 4.0]  # in request order
    assert shapes == [((2, 3), np.float32), ((2, 4), np.float32), ((1, 3), np.float64)]


def test_tensors_of_different_shapes_in_one_batch_are_served_one_call_per_shape(rt: ap.Runtime) -> None:
    torch = pytest.importorskip("torch")
    seen = []

    def model(x):
        seen.append(tuple(x.shape))
        return x.sum(dim=1, keepdim=True)

    rt.add_model("m", model=model, batching=ap.Batching(max_size=8, max_delay_ms=5))
    futs = rt.submit_many("m", [torch.ones(2), torch.ones(5), torch.ones(2)])
    rt.start()
    assert [float(f.result(10)[0]) for f in futs] == [2.0, 5.0, 2.0]
    assert seen == [(2, 2), (1, 5)]


class _Tagged(np.ndarray):
    """An array subclass stacking does not know (as numpy.matrix, which it turned 2-D)."""


def test_masked_arrays_keep_their_masks_and_other_array_types_are_called_one_by_one(rt: ap.Runtime) -> None:
    # np.stack dropped the masks (a request's result depended on whether it ran alone); an
    # array subclass it does not know comes out of it as another type; a masked array among
    # plain ones is a kind of its own.
    seen = []

    def model(x):
        seen.append((type(x).__name__, x.shape))
        return x

    rt.add_model("m", model=model, batching=ap.Batching(max_size=8, max_delay_ms=5))
    masked = np.ma.array([1, 2], mask=[False, True])
    plain = np.array([5, 6])
    tagged = [np.array([1, 2]).view(_Tagged), np.array([3, 4]).view(_Tagged)]
    futs = rt.submit_many("m", [masked, plain, masked, *tagged])
    rt.start()
    out = [f.result(10) for f in futs]
    assert [list(np.ma.getmaskarray(o)) for o in out[:3]] == [[False, True], [False, False], [False, True]]
    assert [o.tolist() for o in out[:3]] == [[1, None], [5, 6], [1, None]]
    assert [type(o) for o in out[3:]] == [_Tagged, _Tagged] and out[3].tolist() == [1, 2]
    assert out[4].tolist() == [3, 4]
    assert seen == [("MaskedArray", (2, 2)), ("ndarray", (1, 2)), ("_Tagged", (1, 2)), ("_Tagged", (1, 2))]


def test_tensors_on_different_devices_or_layouts_are_served_one_call_each_kind(rt: ap.Runtime) -> None:
    # A CPU and a "meta" tensor (or a dense and a sparse one) were stacked together: every
    # request of the batch failed, though each succeeded alone.
    torch = pytest.importorskip("torch")
    seen = []

    def model(x):
        seen.append((x.device.type, str(x.layout), tuple(x.shape)))
        return x * 2

    rt.add_model("m", model=model, batching=ap.Batching(max_size=8, max_delay_ms=5))
    futs = rt.submit_many("m", [torch.ones(3), torch.ones(3, device="meta"), torch.ones(3),
                                torch.ones(3).to_sparse(), torch.ones(3).to_sparse()])
    rt.start()
    out = [f.result(10) for f in futs]
    assert [o.device.type for o in out] == ["cpu", "meta", "cpu", "cpu", "cpu"]
    assert out[0].tolist() == [2.0, 2.0, 2.0] and out[3].to_dense().tolist() == [2.0, 2.0, 2.0]
    assert seen == [("cpu", "torch.strided", (2, 3)), ("meta", "torch.strided", (1, 3)),
                    ("cpu", "torch.sparse_coo", (1, 3)), ("cpu", "torch.sparse_coo", (1, 3))]


def test_mixed_inputs_are_passed_as_a_list(rt: ap.Runtime) -> None:
    seen = []

    def model(xs):
        seen.append(type(xs))
        return [type(x).__name__ for x in xs]

    rt.add_model("m", model=model, batching=ap.Batching(max_size=4, max_delay_ms=5))
    futs = rt.submit_many("m", [np.zeros(2), 1, "s"])
    rt.start()
    assert [f.result(10) for f in futs] == ["ndarray", "int", "str"]
    assert seen == [list]


def test_stacked_result_with_wrong_rows_fails_each_request(rt: ap.Runtime) -> None:
    rt.add_model("m", model=lambda x: x.sum(), batching=ap.Batching(max_size=4, max_delay_ms=5))
    futs = rt.submit_many("m", [np.ones(2)] * 3)
    rt.start()
    for f in futs:
        with pytest.raises(ap.ApportionError, match=r"model 'm': a batch of 3 stacked inputs returned"):
            f.result(10)


def test_a_stacked_model_may_return_a_list_of_one_result_per_input(rt: ap.Runtime) -> None:
    # A list of rows was refused as "list with shape ()".
    rt.add_model("m", model=lambda x: [float(row.sum()) for row in x],
                 batching=ap.Batching(max_size=4, max_delay_ms=5))
    futs = rt.submit_many("m", [np.full(2, i) for i in range(3)])
    rt.add_model("short", model=lambda x: [0.0], batching=ap.Batching(max_size=4, max_delay_ms=5))
    shorts = rt.submit_many("short", [np.ones(2)] * 3)
    rt.start()
    assert [f.result(10) for f in futs] == [0.0, 2.0, 4.0]
    for f in shorts:
        with pytest.raises(ap.ApportionError, match=r"model 'short': a batch of 3 stacked inputs returned a "
                                                    r"list of 1 results; return one per input"):
            f.result(10)


# -- failures -----------------------------------------------------------------------------------


def test_failing_batch_fails_each_request_with_the_models_exception(rt: ap.Runtime) -> None:
    def model(xs):
        raise KeyError("bad batch")

    rt.add_model("m", model=model, batching=ap.Batching(max_size=4, max_delay_ms=5))
    futs = rt.submit_many("m", range(3))
    rt.start()
    excs = [f.exception(10) for f in futs]
    assert all(isinstance(e, KeyError) and e.args == ("bad batch",) for e in excs)
    assert excs[0] is excs[1] is excs[2]  # one call, one exception, shared by its requests
    with pytest.raises(KeyError, match="bad batch"):
        futs[0].result()
    s = rt.stats()["m"]
    assert (s.failed, s.batches) == (3, 1)
    # A note says the exception was one call's, shared by the batch (a request that was fine
    # got a batch-mate's error without a word).
    assert excs[0].__notes__ == ["raised by one call of model 'm' serving a batch of 3 requests, each of which "
                                 "fails with it"]


def test_the_batch_note_is_this_calls_own_when_a_model_raises_one_exception_object_again(rt: ap.Runtime) -> None:
    error = ValueError("always this one")

    def model(xs):
        raise error

    rt.add_model("m", model=model, batching=ap.Batching(max_size=4, max_delay_ms=5))
    rt.start()
    for n in (3, 2):
        futs = rt.submit_many("m", range(n))
        assert all(f.exception(10) is error for f in futs)
        assert [str(x) for x in error.__notes__] == [
            f"raised by one call of model 'm' serving a batch of {n} requests, each of which fails with it"]
    assert rt.submit("m", 1).exception(10) is error and error.__notes__ == [], "a batch of one shares nothing"
    # Nor does one called unbatched (single_unbatched).
    rt.add_model("s", model=lambda x: (_ for _ in ()).throw(error),
                 batching=ap.Batching(max_size=4, max_delay_ms=5, single_unbatched=True))
    assert all(f.exception(10) is error for f in rt.submit_many("s", range(2))) and len(error.__notes__) == 1
    assert rt.submit("s", 1).exception(10) is error and error.__notes__ == []


def test_wrong_number_of_results_fails_each_request(rt: ap.Runtime) -> None:
    rt.add_model("m", model=lambda xs: xs[:-1], batching=ap.Batching(max_size=4, max_delay_ms=5))
    futs = rt.submit_many("m", range(3))
    rt.start()
    for f in futs:
        with pytest.raises(ap.ApportionError,
                           match="model 'm': a batch of 3 requests returned 2 results"):
            f.result(10)
    assert rt.stats()["m"].failed == 3


def test_result_that_is_not_a_list_fails_each_request(rt: ap.Runtime) -> None:
    rt.add_model("m", model=lambda xs: None, batching=ap.Batching(max_size=4, max_delay_ms=5))
    futs = rt.submit_many("m", range(2))
    rt.start()
    for f in futs:
        with pytest.raises(ap.ApportionError, match="must return an ordered sequence .* it returned NoneType"):
            f.result(10)


def test_cancel_while_the_batch_forms_completes_once(rt: ap.Runtime) -> None:
    model = ListModel()
    rt.add_model("m", model=model, batching=ap.Batching(max_size=8, max_delay_ms=1000))
    rt.start()
    a, b = rt.submit_many("m", [1, 2])
    time.sleep(0.02)  # both wait in the forming batch (for up to 1 s), still cancellable
    assert b.cancel()
    assert a.result(10) == 10
    assert b.cancelled()
    assert model.calls == [[1]]


# -- exactly once -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "drain"), [(1, True), (2, False)])
def test_every_request_completes_exactly_once_with_priorities_and_batching(seed: int, drain: bool) -> None:
    total, close_after = 60_000, 40_000
    models = {
        "batch": dict(instances=2, priority_levels=3, batching=ap.Batching(8, 0.2, preferred_sizes=(4,))),
        "batch_delay": dict(instances=1, priority_levels=2, on_timeout="delay",
                            batching=ap.Batching(16, 0.5)),
        "plain_delay": dict(instances=2, priority_levels=4, on_timeout="delay"),
    }

    def batch_fn(xs):
        if any(x % 101 == 0 for x in xs):
            raise ValueError(xs)
        if any(x % 997 == 0 for x in xs):
            time.sleep(0.001)
        return list(xs)

    def plain_fn(x):
        if x % 101 == 0:
            raise ValueError(x)
        return x

    rt = ap.Runtime()
    for name, kw in models.items():
        rt.add_model(name, model=plain_fn if name.startswith("plain") else batch_fn,
                     max_queue=2048, **kw)  # type: ignore[arg-type]
    rt.start()

    completions = bytearray(total)
    futures: dict[int, ap.Future] = {}
    submitted, rejected = Counter(), Counter()
    lock, id_lock = threading.Lock(), threading.Lock()
    half = threading.Event()
    next_id = iter(range(total))

    def on_done(i: int):
        def cb(_f):
            completions[i] += 1
        return cb

    def submitter(tid: int) -> None:
        r = random.Random(seed * 100 + tid)
        while True:
            with id_lock:
                ids = [i for _, i in zip(range(r.choice((1, 1, 8, 32))), next_id)]
            if not ids:
                return
            if ids[-1] >= close_after:
                half.set()
            name = r.choice(tuple(models))
            prio = r.randrange(models[name].get("priority_levels", 1))  # type: ignore[arg-type]
            timeout = 0.2 if r.random() < 0.1 else None
            try:
                if len(ids) == 1:
                    futs = [rt.submit(name, ids[0], timeout_ms=timeout, priority=prio)]
                else:
                    futs = rt.submit_many(name, ids, timeout_ms=timeout, priority=prio)
            except (ap.QueueFull, ap.RuntimeClosed) as e:
                with lock:
                    rejected[name] += len(ids)
                    submitted[name] += len(ids)
                if isinstance(e, ap.RuntimeClosed):
                    return
                time.sleep(0.0005)
                continue
            for i, f in zip(ids, futs):
                f.add_done_callback(on_done(i))
                if r.random() < 0.05:
                    f.cancel()
            with lock:
                futures.update(zip(ids, futs))
                submitted[name] += len(ids)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    assert half.wait(120)
    rt.close(drain=drain)
    for t in threads:
        t.join(120)
        assert not t.is_alive()

    outcomes = {n: Counter() for n in models}
    for i, f in futures.items():
        assert f.done(), f"request {i} never completed"
        assert completions[i] == 1, f"request {i} completed {completions[i]} times"
        if f.cancelled():
            kind = "cancelled"
        else:
            exc = f.exception(0)
            kind = ("completed" if exc is None else
                    "expired" if isinstance(exc, ap.DeadlineExceeded) else
                    "failed" if isinstance(exc, ValueError) else repr(exc))
        outcomes[f.model][kind] += 1

    stats = rt.stats()
    for name in models:
        s, o = stats[name], outcomes[name]
        assert set(o) <= {"completed", "failed", "expired", "cancelled"}, o
        assert s.in_flight == 0 and s.queued == 0
        assert (s.submitted, s.rejected) == (submitted[name], rejected[name])
        assert (s.completed, s.failed, s.expired, s.cancelled) == (
            o["completed"], o["failed"], o["expired"], o["cancelled"]), (name, s, o)
        if models[name].get("on_timeout") == "delay":
            assert s.expired == 0
        assert s.end_to_end.count == s.completed + s.failed
    assert len(futures) + sum(rejected.values()) == sum(submitted.values())
    assert stats["batch"].max_batch_size > 1


def test_a_few_slow_first_calls_do_not_stop_a_batching_model_for_good() -> None:
    # A cold model: its first two calls take 150 ms, later ones ~1 ms, and every request has
    # 60 ms. By the first calls' measure each following request is hopeless and would expire
    # unrun, and no call would ever correct that measure: the model served nothing more for
    # the rest of its life (seen serving a tuned plan after other load, `apportion run`).
    calls = 0

    def cold(xs: list[object]) -> list[object]:
        nonlocal calls
        calls += 1
        time.sleep(0.15 if calls <= 2 else 0.001)
        return xs

    rt = ap.Runtime()
    rt.add_model("cold", model=cold, batching=ap.Batching(max_size=4, max_delay_ms=1), timeout_ms=60)
    rt.start()
    try:
        futures = []
        start = time.monotonic()
        while time.monotonic() - start < 1.5 and len(futures) < 400:
            futures.append(rt.submit("cold", len(futures)))
            time.sleep(0.005)
        outcomes = []
        for f in futures:
            try:
                f.result(timeout=30)
                outcomes.append("ok")
            except ap.DeadlineExceeded:
                outcomes.append("expired")
        late = outcomes[len(outcomes) * 3 // 4:]  # well after the slow calls
        assert late.count("ok") > len(late) // 2, Counter(late)
        s = rt.stats()["cold"]
        assert s.completed + s.expired == s.submitted == len(futures)
    finally:
        rt.close()


def test_a_fresh_model_does_not_hold_a_batch_until_a_requests_deadline(rt: ap.Runtime) -> None:
    # No call measured yet: nothing says how long before its deadline a batch must go. It
    # waited up to the deadline itself, then the call raced the deadline timer (the request
    # expired, or ran after its deadline). It now goes at once.
    calls: list[tuple[float, list[int]]] = []

    def model(xs: list[int]) -> list[int]:
        calls.append((time.perf_counter(), list(xs)))
        return [x * 10 for x in xs]

    rt.add_model("b", model=model, batching=ap.Batching(8, 2000.0))
    rt.start()
    early = [rt.submit("b", i) for i in range(3)]  # no deadline: they would wait up to 2 s
    time.sleep(0.01)
    sent = time.perf_counter()
    tight = rt.submit("b", 3, timeout_ms=1000)
    assert tight.result(10) == 30
    assert [f.result(10) for f in early] == [0, 10, 20]
    # At once (~1 ms), not at the deadline (1 s): half a second to spare for a stalled worker.
    assert calls[0][1] == [0, 1, 2, 3] and calls[0][0] - sent < 0.5, calls
    assert rt.stats()["b"].expired == 0
