"""One model's settings, validated once: :class:`ModelSpec`.

``Runtime.add_model(name, ...)`` builds one from its keyword arguments, ``Runtime.add_model(spec)``
takes one as it is, a config file's ``[models.<name>]`` table is read into one
(:meth:`ModelSpec.from_table`) and written from one (:meth:`ModelSpec.to_table`), the tuner's
candidates are specs with other quotas (``dataclasses.replace``), and a process instance's
worker process reads its model's spec. An invalid field raises :class:`~apportion.QuotaError`
with ``.model`` and ``.field`` set, from the constructor.

What the spec cannot know is checked where the model is added: whether the models fit the
machine together, whether a GPU is usable, whether the runtime's shared pool is scheduled.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ._private.checks import ASYNC_MODEL, is_async_callable, real
from .batching import Batching
from .errors import QuotaError
from .gpu import GPU
from .placement import Quota, check_encodable_name

__all__ = ["ModelSpec", "TABLE_FIELDS"]

MAX_INSTANCES = 1024
MAX_QUEUE = 1 << 30
MAX_PRIORITY_LEVELS = 256
MAX_SPIN_US = 1e6
DEFAULT_MAX_QUEUE = 1024

Isolation = Literal["exclusive", "shared", "process"]


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_import_path(ref: str) -> bool:
    """Whether ``ref`` has the shape "package.module:attribute" (identifiers only)."""
    module, sep, attr = ref.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".") + attr.split("."))


@dataclass(frozen=True)
class ModelSpec:
    """Everything a model can be given, validated in the constructor (see the module
    documentation). ``Runtime.add_model`` documents each field; they are the same names.

    Normalised on construction: ``cores`` given as a sequence becomes a sorted tuple of
    distinct ids, numbers in milliseconds, microseconds or seconds become floats, ``weight`` a
    float, and ``gpu.memory`` bytes.
    """

    name: str
    factory: Callable[..., Any] | str | None = None
    """Called as ``factory(ctx)`` once per instance, or a "module:function" path."""
    model: Any = None
    """One callable served by every instance (instead of ``factory``)."""
    instances: int = 1
    threads: int | None = None
    cores: int | str | Sequence[int] | None = None
    isolation: Isolation = "shared"
    numa: int | Literal["auto"] = "auto"
    smt: bool = False
    memory_policy: Literal["bind", "prefer", "none"] = "bind"
    oversubscribe: bool = False
    max_queue: int = DEFAULT_MAX_QUEUE
    timeout_ms: float | None = None
    priority_levels: int = 1
    on_timeout: Literal["reject", "delay"] = "reject"
    admission: Literal["queue", "deadline"] = "queue"
    batching: Batching | None = None
    spin_us: float = 50.0
    gpu: GPU | None = None
    weight: float | None = None
    priority_class: int | None = None
    burst: bool | int = False
    watchdog_s: float | None = None
    start_timeout_s: float | None = None
    warmup: Sequence[Any] | Callable[[], Any] | str | None = None
    """Sample inputs every instance runs before the model takes requests (see Runtime.add_model):
    a sequence of inputs, a zero-argument callable returning one, or its "module:function"."""
    quota: Quota = field(init=False, repr=False, compare=False)
    """The CPU side, as the planner takes it (a process model is planned as "exclusive" when
    it has cores, else as "shared")."""

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name:
            raise QuotaError(f"give a non-empty string, got {name!r}", field="name")
        check_encodable_name(name)

        def bad(fld: str, reason: str) -> QuotaError:
            return QuotaError(reason, model=name, field=fld)

        def put(fld: str, value: object) -> None:
            object.__setattr__(self, fld, value)

        if self.isolation not in ("exclusive", "shared", "process"):
            raise bad("isolation", f'got {self.isolation!r}; give "exclusive", "shared" or "process"')
        process = self.isolation == "process"
        if self.factory is not None and self.model is not None:
            raise bad("factory", "give factory= or model=, not both")
        if isinstance(self.factory, str):
            if not is_import_path(self.factory):
                raise bad("factory", f"{self.factory!r} is not an import path; give 'package.module:function'")
        elif self.factory is not None and not callable(self.factory):
            raise bad("factory", f"must be callable or a 'module:function' path, got {type(self.factory).__name__}")
        if self.model is not None and not callable(self.model):
            raise bad("model", f"must be callable, got {type(self.model).__name__}")
        if self.model is not None and is_async_callable(self.model):
            raise bad("model", f"is an async function: {ASYNC_MODEL}")
        if callable(self.factory) and is_async_callable(self.factory):
            raise bad("factory", "is an async function; give a plain one (called once per instance, in its worker "
                      "thread)")
        if process and self.model is not None:
            raise bad("model", 'isolation="process" builds the model in the worker process; give '
                      'factory="module:function" instead of model=')
        if process and self.gpu is not None:
            raise bad("gpu", 'GPU quotas are not available with isolation="process" yet; use "exclusive" '
                      'or "shared"')

        # The CPU side: validated (and normalised) by the planner's own type.
        cores = self.cores
        if isinstance(cores, Sequence) and not isinstance(cores, (str, bytes, bytearray)):
            cores = tuple(cores)
        planned = ("exclusive" if cores is not None else "shared") if process else self.isolation
        quota = Quota(name=name, cores=cores, instances=self.instances, threads=self.threads,
                      isolation=planned, numa=self.numa, smt=self.smt,  # type: ignore[arg-type]
                      memory_policy=self.memory_policy, oversubscribe=self.oversubscribe)
        if self.instances > MAX_INSTANCES:
            raise bad("instances", f"got {self.instances}; give an integer in [1, {MAX_INSTANCES}]")
        if quota.cpus is not None and not isinstance(cores, str):
            cores = quota.cpus
        elif cores is not None and not isinstance(cores, str):
            cores = quota.cores  # a count, as an int
        put("cores", cores)
        for fld in ("instances", "threads", "numa"):  # as the quota holds them (numpy's integers as ints)
            put(fld, getattr(quota, fld))
        put("quota", quota)

        if not _is_int(self.max_queue) or not 1 <= self.max_queue <= MAX_QUEUE:
            raise bad("max_queue", f"got {self.max_queue!r}; give an integer in [1, 2**30]")
        put("max_queue", int(self.max_queue))
        t = self.timeout_ms
        if t is not None:
            tf = real(t)
            if tf is None or not (math.isfinite(tf) and tf > 0):
                raise bad("timeout_ms", f"got {t!r}; give a positive, finite number of milliseconds or None")
            put("timeout_ms", tf)
        if not _is_int(self.priority_levels) or not 1 <= self.priority_levels <= MAX_PRIORITY_LEVELS:
            raise bad("priority_levels", f"got {self.priority_levels!r}; give an integer in "
                      f"[1, {MAX_PRIORITY_LEVELS}]")
        put("priority_levels", int(self.priority_levels))
        if self.on_timeout not in ("reject", "delay"):
            raise bad("on_timeout", f'got {self.on_timeout!r}; give "reject" or "delay"')
        if self.admission not in ("queue", "deadline"):
            raise bad("admission", f'got {self.admission!r}; give "queue" or "deadline"')
        if self.admission == "deadline" and self.priority_levels != 1:
            raise bad("admission", f'"deadline" judges a request by every request queued ahead of it, '
                      f'which priority lanes let it skip; give priority_levels=1 (got {self.priority_levels})')
        if self.batching is not None:
            if not isinstance(self.batching, Batching):
                raise bad("batching", f"must be an apportion.Batching or None, got {self.batching!r}")
            self.batching._validated(name)
        s = self.spin_us
        sf = real(s)
        if sf is None or not 0 <= sf <= MAX_SPIN_US:
            raise bad("spin_us", f"got {s!r}; give a number of microseconds in [0, 1e6]")
        put("spin_us", sf)
        if self.gpu is not None:
            if not isinstance(self.gpu, GPU):
                raise bad("gpu", f"must be apportion.GPU(...), got {self.gpu!r}")
            self.gpu.validate(name)

        # Sharing the pool.
        pooled = planned == "shared"
        if self.weight is not None:
            w = self.weight
            wf = real(w)
            if wf is None or not 0 < wf < math.inf:
                raise bad("weight", f"got {w!r}; give a positive, finite number")
            put("weight", wf)
        if self.priority_class is not None and (not _is_int(self.priority_class)
                                                or not -1000 <= self.priority_class <= 1000):
            raise bad("priority_class", f"got {self.priority_class!r}; give an integer in [-1000, 1000]")
        if self.priority_class is not None:
            put("priority_class", int(self.priority_class))  # numpy's integers as ints (TOML takes no other)
        b = self.burst
        if not isinstance(b, bool) and not (_is_int(b) and 0 <= b <= MAX_INSTANCES):
            raise bad("burst", f"got {b!r}; give True, False or a count of burst instances in "
                      f"[0, {MAX_INSTANCES}]")
        if not isinstance(b, bool):
            put("burst", int(b))
        if self.burst_instances:
            if process:
                raise bad("burst", 'burst instances are threads of this process; they are not available '
                          'with isolation="process"')
            if self.isolation != "exclusive":
                raise bad("burst", f"burst is for exclusive models (a shared model already runs on the "
                          f"shared pool); got isolation={self.isolation!r}")
            if self.batching is not None and self.batching.max_size > 1:
                # A burst worker joins when every own worker is busy, which only workers serving
                # one request per call report: with batching the burst instances never served.
                raise bad("burst", "burst instances serve one request per call; they are not available with "
                          "batching (max_size > 1)")
            pooled = True
        for fld in ("weight", "priority_class"):
            if getattr(self, fld) is not None and not pooled:
                raise bad(fld, "applies to the shared pool; give isolation='shared', or burst=True on an "
                          "exclusive model")

        warm = self.warmup
        if isinstance(warm, str):
            if not is_import_path(warm):
                raise bad("warmup", f"{warm!r} is not an import path; give 'package.module:function' (a "
                          "zero-argument callable returning one sample input)")
        elif isinstance(warm, (list, tuple)):
            if not warm:
                raise bad("warmup", "give at least one sample input, or None for no warm-up")
            put("warmup", tuple(warm))
        elif warm is not None and not callable(warm):
            raise bad("warmup", f"give sample inputs (a list), a zero-argument callable or its "
                      f"'module:function' path, got {type(warm).__name__}")

        # Bounds of a worker process.
        for fld, why in (("watchdog_s", 'a watchdog needs isolation="process" (a thread cannot be killed)'),
                         ("start_timeout_s", 'it bounds a worker process\'s start: give it with '
                          'isolation="process" only')):
            v = getattr(self, fld)
            if v is None:
                continue
            if not process:
                raise bad(fld, f"{why}; got {fld}={v!r} with isolation={self.isolation!r}")
            vf = real(v)
            if vf is None or not 0 < vf < math.inf:
                raise bad(fld, f"give a positive, finite number of seconds or None, got {v!r}")
            put(fld, vf)

    # -- derived ------------------------------------------------------------------------------
    @property
    def process(self) -> bool:
        return self.isolation == "process"

    @property
    def burst_instances(self) -> int:
        """How many burst instances ``burst`` asks for (True: as many as ``instances``)."""
        if isinstance(self.burst, bool):
            return self.instances if self.burst else 0
        return int(self.burst)

    # -- tables (config files, the worker process) ---------------------------------------------
    def to_table(self) -> dict[str, Any]:
        """The fields that differ from their defaults, as TOML/JSON values (``name`` and
        ``model`` are not part of a table; a callable ``factory`` is written as its import path
        when it has one, and left out otherwise)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("name", "model", "quota"):
                continue
            v = getattr(self, f.name)
            if v == f.default:
                continue
            if f.name in ("factory", "warmup") and callable(v):
                v = import_path(v)
                if v is None:
                    continue
            elif f.name in ("cores", "warmup") and isinstance(v, tuple):
                v = list(v)
            elif f.name == "batching":
                v = {"max_size": v.max_size, "max_delay_ms": v.max_delay_ms,
                     **({"preferred_sizes": list(v.preferred_sizes)} if v.preferred_sizes else {}),
                     **({"single_unbatched": v.single_unbatched} if v.single_unbatched is not None else {})}
            elif f.name == "gpu":
                v = {g.name: getattr(v, g.name) for g in fields(v)
                     if getattr(v, g.name) != g.default}
            out[f.name] = v
        return out

    @classmethod
    def from_table(cls, name: str, table: Mapping[str, Any]) -> ModelSpec:
        """The spec of a ``[models.<name>]`` table (the keys of :data:`TABLE_FIELDS`; ``batching``
        and ``gpu`` as sub-tables). Raises QuotaError naming the field, dotted for sub-tables."""
        kw: dict[str, Any] = {}
        for k, v in table.items():
            if k not in TABLE_FIELDS:
                raise QuotaError(f"unknown key; allowed: {', '.join(TABLE_FIELDS)}", model=name, field=k)
            if k == "cores" and isinstance(v, list):
                v = tuple(v)
            elif k == "batching":
                v = _sub(name, k, v, Batching, required=("max_size",))
            elif k == "gpu":
                v = _sub(name, k, v, GPU, required=())
            kw[k] = v
        return cls(name=name, **kw)


def _sub(model: str, key: str, value: object, cls: type, required: tuple[str, ...]) -> Any:
    allowed = [f.name for f in fields(cls)]
    if not isinstance(value, Mapping):
        raise QuotaError(f"must be a table with keys {', '.join(allowed)}, got {type(value).__name__}",
                         model=model, field=key)
    for k in value:
        if k not in allowed:
            raise QuotaError(f"unknown key; allowed: {', '.join(allowed)}", model=model, field=f"{key}.{k}")
    for k in required:
        if k not in value:
            raise QuotaError("missing", model=model, field=f"{key}.{k}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    if cls is Batching and "max_delay_ms" not in kw:
        kw["max_delay_ms"] = 0.0
    try:
        return cls(**kw)
    except QuotaError as e:
        fld = e.field.removeprefix(f"{key}.") if e.field else None
        raise QuotaError(e.reason, model=model, field=f"{key}.{fld}" if fld else key) from None


def import_path(fn: Any) -> str | None:
    """``"module:qualname"`` for a module-level callable, else None (a lambda, a local)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    return f"{module}:{qualname}"


TABLE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(ModelSpec) if f.init and f.name not in ("name", "model"))
"""The keys of a model's table in a config file: every field but ``name`` and ``model``."""
