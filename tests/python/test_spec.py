"""ap.ModelSpec: one validated record per model, built by add_model, read from and written to
config files, and sent to a process instance's worker."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apportion as ap
from apportion import gpu as gpu_mod
from apportion import runtime as runtime_mod
from apportion.config import Config, ConfigError, ModelConfig
from apportion.spec import TABLE_FIELDS, ModelSpec


def echo(ctx: Any) -> Any:
    return lambda x: x


# (keyword arguments, the field the error names, a piece of its reason)
INVALID: list[tuple[dict[str, Any], str, str]] = [
    (dict(instances=0), "instances", ">= 1"),
    (dict(instances=2000), "instances", "[1, 1024]"),
    (dict(instances=1.5), "instances", "integer"),
    (dict(threads=0), "threads", "integer in [1,"),
    (dict(cores="x-y"), "cores", "not a CPU list"),
    (dict(cores=True), "cores", "give an integer count"),
    (dict(isolation="none"), "isolation", '"exclusive", "shared" or "process"'),
    (dict(isolation="exclusive"), "cores", "needs cores"),
    (dict(numa=-1), "numa", "node id"),
    (dict(smt=1), "smt", "True or False"),
    (dict(memory_policy="interleave"), "memory_policy", '"bind", "prefer" or "none"'),
    (dict(oversubscribe="yes"), "oversubscribe", "True or False"),
    (dict(max_queue=0), "max_queue", "[1, 2**30]"),
    (dict(max_queue=True), "max_queue", "[1, 2**30]"),
    (dict(timeout_ms=0), "timeout_ms", "positive, finite"),
    (dict(timeout_ms=float("inf")), "timeout_ms", "positive, finite"),
    (dict(timeout_ms=10 ** 400), "timeout_ms", "positive, finite"),  # beyond every float
    (dict(timeout_ms=-10 ** 400), "timeout_ms", "positive, finite"),
    (dict(priority_levels=257), "priority_levels", "[1, 256]"),
    (dict(on_timeout="drop"), "on_timeout", '"reject" or "delay"'),
    (dict(admission="wait"), "admission", '"queue" or "deadline"'),
    (dict(admission="deadline", priority_levels=2), "admission", "priority_levels=1"),
    (dict(batching={"max_size": 2}), "batching", "apportion.Batching"),
    (dict(spin_us=-1), "spin_us", "[0, 1e6]"),
    (dict(spin_us="50"), "spin_us", "[0, 1e6]"),
    (dict(spin_us=10 ** 400), "spin_us", "[0, 1e6]"),
    (dict(gpu={"device": 0}), "gpu", "apportion.GPU"),
    (dict(weight=0), "weight", "positive, finite"),
    (dict(weight=10 ** 400), "weight", "positive, finite"),
    (dict(priority_class=5000), "priority_class", "[-1000, 1000]"),
    (dict(burst=-1), "burst", "True, False or a count"),
    (dict(burst=True), "burst", "for exclusive models"),
    (dict(isolation="exclusive", cores=1, weight=2.0), "weight", "applies to the shared pool"),
    (dict(watchdog_s=1.0), "watchdog_s", 'needs isolation="process"'),
    (dict(start_timeout_s=1.0), "start_timeout_s", 'isolation="process" only'),
    (dict(isolation="process", factory="m.x:f", watchdog_s=0), "watchdog_s", "positive, finite"),
    (dict(isolation="process", factory="m.x:f", start_timeout_s=10 ** 400), "start_timeout_s", "positive, finite"),
    (dict(isolation="process", factory="m.x:f", burst=2, cores=1), "burst", "threads of this process"),
    # The burst workers never served a batching model (they wait for single-request workers).
    (dict(isolation="exclusive", cores=1, burst=1, batching=ap.Batching(4, 1.0)), "burst",
     "not available with batching"),
    (dict(isolation="process", model=len), "model", "builds the model in the worker process"),
    (dict(factory="not a path"), "factory", "not an import path"),
    (dict(factory=3), "factory", "callable or a 'module:function' path"),
    (dict(model=3), "model", "must be callable"),
    (dict(factory=echo, model=len), "factory", "not both"),
]


@pytest.mark.parametrize("kwargs,field,reason", INVALID, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(INVALID)])
def test_every_invalid_field_names_model_and_field(kwargs: dict[str, Any], field: str, reason: str,
                                                   rt: ap.Runtime) -> None:
    with pytest.raises(ap.QuotaError) as err:
        ModelSpec("m", **kwargs)
    assert (err.value.model, err.value.field) == ("m", field)
    assert reason in err.value.reason
    assert str(err.value).startswith(f"model 'm', field {field!r}: ")
    # add_model builds the same spec: the same error, and nothing registered.
    with pytest.raises(ap.QuotaError) as again:
        rt.add_model("m", **({"factory": echo} | kwargs) if "model" not in kwargs else kwargs)
    assert (again.value.model, again.value.field) == ("m", field)
    assert rt.models == []


def test_nested_fields_are_dotted() -> None:
    with pytest.raises(ap.QuotaError) as err:
        ModelSpec.from_table("m", {"batching": {"max_size": 0}})
    assert (err.value.model, err.value.field) == ("m", "batching.max_size")
    with pytest.raises(ap.QuotaError) as err:
        ModelSpec.from_table("m", {"gpu": {"streams": 0}})
    assert err.value.field == "gpu.streams"
    with pytest.raises(ap.QuotaError) as err:
        ModelSpec.from_table("m", {"gpu": {"colour": "red"}})
    assert err.value.field == "gpu.colour" and "unknown key" in err.value.reason
    with pytest.raises(ap.QuotaError) as err:
        ModelSpec.from_table("m", {"batching": {"max_delay_ms": 1}})
    assert err.value.field == "batching.max_size" and err.value.reason == "missing"
    with pytest.raises(ap.QuotaError) as err:
        ModelSpec.from_table("m", {"colour": "red"})
    assert err.value.field == "colour" and "spin_us" in err.value.reason


def test_the_name_is_checked_first() -> None:
    with pytest.raises(ap.QuotaError) as err:
        ModelSpec("", factory=echo)
    assert (err.value.model, err.value.field) == (None, "name")


def test_a_name_with_a_lone_surrogate_is_a_quota_error() -> None:
    # Was pybind's "incompatible constructor arguments" TypeError from the native Quota.
    for make in (lambda: ModelSpec("bad\ud800", factory=echo), lambda: ap.Runtime().add_model("bad\ud800", model=echo),
                 lambda: ap.plan({"a\udc00": {}})):
        with pytest.raises(ap.QuotaError, match=r"field 'name': give a name of Unicode characters, got .*surrogate") as e:
            make()
        assert e.value.field == "name"


def test_a_spec_is_frozen_and_normalised() -> None:
    s = ModelSpec("m", factory=echo, cores=[3, 1, 3], isolation="exclusive", timeout_ms=5, spin_us=0,
                  weight=None, gpu=None)
    assert s.cores == (1, 3) and s.timeout_ms == 5.0 and isinstance(s.spin_us, float)
    assert s.quota.cpus == (1, 3) and s.quota.isolation == "exclusive"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.instances = 2  # type: ignore[misc]
    assert ModelSpec("p", factory="a.b:c", isolation="process", cores=2).quota.isolation == "exclusive"
    assert ModelSpec("p", factory="a.b:c", isolation="process").quota.isolation == "shared"
    assert ModelSpec("b", factory=echo, isolation="exclusive", cores=2, instances=3, burst=True).burst_instances == 3


def test_quota_errors_keep_model_and_field_across_pickling() -> None:
    e = ap.QuotaError("give 1", model="m", field="x")
    back = pickle.loads(pickle.dumps(e))
    assert (type(back), str(back), back.model, back.field, back.reason) == (
        ap.QuotaError, "model 'm', field 'x': give 1", "m", "x", "give 1")


def test_add_takes_a_spec_and_add_model_builds_the_same(rt: ap.Runtime) -> None:
    spec = ModelSpec("a", factory=echo, instances=2, max_queue=8, timeout_ms=100.0)
    rt.add(spec)
    rt.add_model("b", factory=echo, instances=2, max_queue=8, timeout_ms=100.0)
    assert rt._models["a"].spec == spec
    assert rt._models["b"].spec == dataclasses.replace(spec, name="b")
    rt.start()
    assert rt.submit("a", 3).result(5) == 3 and rt.stats()["a"].max_queue == 8
    with pytest.raises(ap.QuotaError, match="give an apportion.ModelSpec"):
        rt.add({"name": "c"})  # type: ignore[arg-type]
    with pytest.raises(ap.QuotaError) as err:
        rt.add(ModelSpec("c"))
    assert (err.value.model, err.value.field) == ("c", "factory")


def test_runtime_dependent_checks_name_the_field(rt: ap.Runtime) -> None:
    # The spec is valid; this runtime's shared pool is not scheduled.
    with pytest.raises(ap.QuotaError) as err:
        rt.add_model("m", factory=echo, weight=2.0)
    assert (err.value.model, err.value.field) == ("m", "weight")
    assert "shared_pool='scheduled'" in err.value.reason


def test_remove_model_drops_its_gpu_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    # A described H200 stands in for the device: the bookkeeping, not the driver, is tested.
    monkeypatch.setattr(runtime_mod, "gpu_available", lambda: True)
    monkeypatch.setattr(runtime_mod, "plan_gpus", lambda quotas: gpu_mod.plan_gpus(quotas, devices="h200"))
    rt = ap.Runtime()
    try:
        rt.add_model("g", factory=echo, gpu=ap.GPU(device=0, sm_share=0.75))
        rt.add_model("cpu", factory=echo)
        assert list(rt.plan().gpu.models) == ["g"]
        # A second model wanting 75% of the SMs does not fit beside the first...
        with pytest.raises(ap.PlacementError):
            rt.add_model("h", factory=echo, gpu=ap.GPU(device=0, sm_share=0.75))
        rt.remove_model("g")
        assert rt.plan().gpu is None
        # ...and does once the first is gone: its quota no longer counts.
        rt.add_model("h", factory=echo, gpu=ap.GPU(device=0, sm_share=0.75))
        assert list(rt.plan().gpu.models) == ["h"]
    finally:
        rt.close(drain=False)


# -- config files ----------------------------------------------------------------------------------

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
_floats = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def specs(draw: st.DrawFn) -> ModelSpec:
    name = draw(_names)
    isolation = draw(st.sampled_from(["shared", "exclusive", "process"]))
    kw: dict[str, Any] = {"factory": draw(st.sampled_from(["pkg.mod:build", "apportion.demo:build_mlp"]))}
    instances = draw(st.integers(1, 4))
    kw["instances"] = instances
    if isolation == "exclusive" or (isolation == "process" and draw(st.booleans())):
        kw["cores"] = draw(st.one_of(st.integers(instances, 64),
                                     st.lists(st.integers(0, 127), min_size=instances, max_size=8, unique=True),
                                     st.just("0-3,8")))
        if isinstance(kw["cores"], str):
            kw["instances"] = 1
    kw["isolation"] = isolation
    kw["numa"] = draw(st.sampled_from(["auto", 0, 1]))
    kw["memory_policy"] = draw(st.sampled_from(["bind", "prefer", "none"]))
    kw["max_queue"] = draw(st.integers(1, 1 << 20))
    kw["timeout_ms"] = draw(st.one_of(st.none(), _floats))
    kw["priority_levels"] = draw(st.integers(1, 8))
    kw["on_timeout"] = draw(st.sampled_from(["reject", "delay"]))
    if kw["priority_levels"] == 1:
        kw["admission"] = draw(st.sampled_from(["queue", "deadline"]))
    if draw(st.booleans()):
        size = draw(st.integers(1, 64))
        prefs = draw(st.one_of(st.none(), st.lists(st.integers(1, size), min_size=1, max_size=3)))
        kw["batching"] = ap.Batching(max_size=size, max_delay_ms=draw(st.floats(0, 100)), preferred_sizes=prefs)
    kw["spin_us"] = draw(st.floats(0, 1e6))
    if isolation == "process":
        kw["watchdog_s"] = draw(st.one_of(st.none(), _floats))
        kw["start_timeout_s"] = draw(st.one_of(st.none(), _floats))
    elif draw(st.booleans()):
        kw["gpu"] = ap.GPU(device=draw(st.integers(0, 3)), streams=draw(st.integers(1, 4)),
                           priority=draw(st.sampled_from(["high", "normal", "low"])),
                           sm_share=draw(st.one_of(st.none(), st.floats(0.01, 1.0))),
                           memory=draw(st.one_of(st.none(), st.sampled_from(["4GiB", "512MB", 12345]))))
    if isolation == "shared":
        kw["weight"] = draw(st.one_of(st.none(), _floats))
        kw["priority_class"] = draw(st.one_of(st.none(), st.integers(-1000, 1000)))
    elif isolation == "exclusive" and (kw.get("batching") is None or kw["batching"].max_size == 1):
        kw["burst"] = draw(st.one_of(st.booleans(), st.integers(0, 4)))  # not with batching
    return ModelSpec(name, **kw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(specs(), min_size=1, max_size=4, unique_by=lambda s: s.name))
def test_specs_round_trip_through_toml(models: list[ModelSpec]) -> None:
    cfg = Config(models={m.name: ModelConfig(m) for m in models})
    back = Config.loads(cfg.to_toml())
    assert [m.spec for m in back.models.values()] == models
    assert Config.loads(back.to_toml()) == back


def test_every_table_field_is_a_spec_field() -> None:
    init = [f.name for f in dataclasses.fields(ModelSpec) if f.init]
    assert list(TABLE_FIELDS) == [f for f in init if f not in ("name", "model")]


@pytest.mark.parametrize("field,value,reason", [
    ("spin_us", -1, "[0, 1e6]"),
    ("weight", 0, "positive, finite"),
    ("watchdog_s", 2, 'needs isolation="process"'),
    ("gpu", "{ streams = 0 }", "streams=0"),
    ("burst", "true", "for exclusive models"),
])
def test_config_errors_come_from_the_spec(field: str, value: Any, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        Config.loads(f"[models.m]\nfactory = \"a.b:c\"\n{field} = {value}\n", "c.toml")
    key = "models.m.gpu.streams" if field == "gpu" else f"models.m.{field}"
    assert err.value.key == key
    assert reason in str(err.value) and str(err.value).startswith(f"c.toml: {key}: ")


def test_async_models_and_factories_are_refused_naming_the_field() -> None:
    # An async def model was accepted: each call "completed" with a coroutine object that was
    # never awaited (a RuntimeWarning later), counted as a result.
    async def amodel(x: Any) -> Any:
        return x

    class AsyncCall:
        async def __call__(self, x: Any) -> Any:
            return x

    async def afactory(ctx: Any) -> Any:
        return lambda x: x

    for model in (amodel, AsyncCall()):
        with pytest.raises(ap.QuotaError, match="model 'a', field 'model': is an async function: the runtime calls "
                                                "a model in its worker thread and would not await"):
            ap.ModelSpec("a", model=model)
    for factory in (afactory, AsyncCall()):  # an object whose __call__ is async too
        with pytest.raises(ap.QuotaError, match="model 'a', field 'factory': is an async function; give a plain one"):
            ap.ModelSpec("a", factory=factory)
    # A factory that returns one fails the model's start, naming it.
    rt = ap.Runtime()
    try:
        with pytest.raises(TypeError, match="model 'a': the factory gives an async function: the runtime calls"):
            rt.add_model("a", factory=lambda ctx: amodel)
            rt.start()
    finally:
        rt.close()


def test_numpy_integers_are_taken_by_every_count_and_stored_as_ints() -> None:
    # max_queue, priority_levels and the batching sizes took np.int64; instances, threads,
    # cores and numa refused it ("got np.int64(2); give an integer >= 1").
    np = pytest.importorskip("numpy")
    s = ap.ModelSpec("m", model=abs, instances=np.int64(2), threads=np.int32(1), cores=np.int64(2),
                     isolation="exclusive", numa=np.int8(0), max_queue=np.int64(8))
    plain = ap.ModelSpec("m", model=abs, instances=2, threads=1, cores=2, isolation="exclusive", numa=0,
                         max_queue=8)
    assert s == plain and s.quota == plain.quota
    assert all(type(v) is int for v in (s.instances, s.threads, s.cores, s.numa, s.max_queue, s.quota.cores))
    listed = ap.ModelSpec("m", model=abs, cores=[np.int64(1), np.int64(0)], isolation="exclusive")
    assert listed.cores == (0, 1) and all(type(c) is int for c in listed.cores)
    # burst and priority_class too: np.int64 there made to_table() unwritable as TOML
    tomli_w = pytest.importorskip("tomli_w")
    b = ap.ModelSpec("m", factory="m:f", burst=np.int64(2), isolation="exclusive", cores=2)
    c = ap.ModelSpec("m", factory="m:f", priority_class=np.int16(3))
    assert type(b.burst) is int and type(c.priority_class) is int
    assert "burst = 2" in tomli_w.dumps(b.to_table()) and "priority_class = 3" in tomli_w.dumps(c.to_table())
    with pytest.raises(ap.QuotaError, match="give an integer >= 1") as err:
        ap.ModelSpec("m", model=abs, instances=np.int64(0))
    assert err.value.field == "instances"
    with pytest.raises(ap.QuotaError) as err:
        ap.ModelSpec("m", model=abs, threads=np.float64(1.0))
    assert err.value.field == "threads"
