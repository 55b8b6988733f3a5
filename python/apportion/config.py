"""Config files: models, their quotas, SLOs and load, and the runtime, in one TOML file.

The same format is what ``apportion plan|run|bench`` read and what ``ap.tune`` writes::

    [runtime]
    cpus = "0-7"                        # optional: the CPUs the runtime may use
    shared_pool = "scheduled"           # optional: "os" (default) or "scheduled" (weights, classes)
    pool_reserve = { "1" = 1 }          # optional, scheduled pool: units reserved for class >= 1
    reserve_nice = 10                   # optional: nice of the classes below a reservation

    [workload]
    rate = 600.0                        # optional: total requests/s, split by each load.share

    [models.ranker]
    factory = "mypkg.models:build_ranker"   # module:function, called as factory(ctx) per instance
    inputs = "mypkg.models:ranker_input"    # optional: zero-argument callable, one request's input
    cores = 2                           # quota fields (see apportion.Quota)
    isolation = "exclusive"
    instances = 1
    threads = 2
    max_queue = 256
    timeout_ms = 50
    batching = { max_size = 8, max_delay_ms = 2.0 }
    slo = { latency_ms = 20, percentile = 99 }
    load = { rate = 300 }               # or concurrency = 4, or share = 0.5 of [workload] rate
    cost = { alpha_ms = 0.4, beta_ms = 0.9, serial = 0.8, batchable = true }  # optional: the
                                        # tuner's cost model (apportion.tune.CostModel), written
                                        # into its plan; the online controller asks it

Every error is a :class:`ConfigError` whose message names the file, the key
(``models.ranker.threads``) and what is allowed. ``Config.load(path)`` validates everything
that can be checked without the machine; ``config.runtime()`` places the models on it.
"""

from __future__ import annotations

import json
import math
import os
import pkgutil
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from ._private.checks import real
from .errors import ApportionError, PlacementError, QuotaError, raised_on_import
from .load.spec import MAX_CONCURRENCY
from .placement import Quota
from .spec import TABLE_FIELDS, ModelSpec, import_path
from .topology import parse_cpulist

if TYPE_CHECKING:
    from .load import ModelLoad
    from .runtime import Runtime
    from .tune.cost import CostModel

__all__ = ["Config", "ConfigError", "DoesNotFit", "ModelConfig", "QUOTA_KEYS", "StartFailed", "resolve"]

QUOTA_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Quota) if f.init and f.name != "name")
OTHER_KEYS: tuple[str, ...] = ("inputs", "slo", "load", "signature", "cost")
COST_KEYS: tuple[str, ...] = ("alpha_ms", "beta_ms", "serial", "batchable")
SIGNATURE_KEYS: tuple[str, ...] = ("inputs", "outputs", "tensor")
MODEL_KEYS: tuple[str, ...] = TABLE_FIELDS + OTHER_KEYS
TOP_KEYS: tuple[str, ...] = ("runtime", "workload", "models")
RUNTIME_KEYS: tuple[str, ...] = ("cpus", "shared_pool", "pool_reserve", "reserve_nice")
_TOO_DEEP = "not a config this reader takes: values nested too deep"
MAX_CONFIG_BYTES = 16 << 20
"""The largest config file read (a config of thousands of models is a few hundred KB)."""
WORKLOAD_KEYS: tuple[str, ...] = ("rate",)
SLO_KEYS: tuple[str, ...] = ("latency_ms", "percentile", "timeout_ms")
LOAD_KEYS: tuple[str, ...] = ("concurrency", "rate", "share", "arrivals", "priority")


_MAX_CPU_ID = 1 << 16


def model_key(name: str) -> str:
    """The key of model ``name``'s table as TOML writes it: ``models.mlp``, or with the name
    quoted where it is not a bare key (``models."".name``, ``models."a b"``)."""
    bare = bool(name) and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
    return f"models.{name}" if bare else f"models.{json.dumps(name)}"


class ConfigError(ApportionError, ValueError):
    """A config file that cannot be used. ``str()`` names the file, the key and what is allowed."""

    def __init__(self, path: str, key: str | None, message: str) -> None:
        self.path = path
        self.key = key
        super().__init__(f"{path}: {key}: {message}" if key else f"{path}: {message}")


class DoesNotFit(ConfigError):
    """A valid config whose models do not fit the machine together (a PlacementError)."""


class StartFailed(ConfigError):
    """A valid config whose model failed to start: its factory or warm-up raised (the message
    has the error and the model; ``__cause__`` is the error itself)."""


def _runtime_reason(err: QuotaError) -> str:
    # The config key names the runtime: the reason's own "Runtime: " would say it twice.
    return err.reason.removeprefix("Runtime: ")


def _without_prefix(err: Exception) -> str:
    # Quota errors start with "model 'x', field 'y': "; the config key already says that.
    text = str(err)
    model, fld = getattr(err, "model", None), getattr(err, "field", None)
    prefix = f"model {model!r}, field {fld!r}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def resolve(ref: str, *, where: str = "<config>", key: str = "factory") -> Callable[..., Any]:
    """Imports ``"package.module:attribute"`` and returns the attribute (a callable)."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(where, key, f"{ref!r} is not an import path; give 'package.module:function'")
    try:
        obj = pkgutil.resolve_name(ref)
    except ImportError as e:
        raise ConfigError(where, key, f"cannot import module {module!r}: {e}") from None
    except AttributeError:
        raise ConfigError(where, key, f"module {module!r} has no attribute {attr!r}") from None
    except ValueError as e:
        if str(e).startswith("invalid format"):  # pkgutil's own word for a malformed path
            raise ConfigError(where, key, f"{ref!r} is not an import path ({e}); give 'package.module:function'") from None
        raise ConfigError(where, key, f"importing module {module!r} raised ValueError: {e}") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the module's own code raised while it was imported
        raise ConfigError(where, key, f"importing module {module!r} raised {raised_on_import(e)}") from None
    if not callable(obj):
        raise ConfigError(where, key, f"{ref!r} is {type(obj).__name__}, not callable")
    return obj  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ModelConfig:
    """One ``[models.<name>]`` table, validated: the model's :class:`~apportion.ModelSpec`, and
    what the load generator and the tuner need besides (``inputs``, ``slo``, ``load``)."""

    spec: ModelSpec
    inputs: str | Callable[[], Any] | None = None
    """An import path ``"module:function"`` (or, built in code, the callable): one request's input."""
    slo: Mapping[str, float] | None = None
    """``latency_ms`` and ``percentile`` (default 99), optionally ``timeout_ms``."""
    load: Mapping[str, Any] | None = None
    """``concurrency``, ``rate`` or ``share``; optionally ``arrivals``, ``priority``."""
    signature: Mapping[str, Any] | None = None
    """What ``apportion serve`` serves the model as: ``inputs`` and ``outputs`` (lists of
    ``{name, datatype, shape}``) and ``tensor`` ("numpy" or "torch"); checked in full by
    :func:`apportion.serve.signatures`."""
    cost: CostModel | None = None
    """The model's cost model (:class:`apportion.tune.CostModel`): what one call of a batch
    costs on some threads. The tuner writes the one it fitted into its plan; ``apportion run``
    and ``serve`` with ``--adapt`` give it to the online controller (``Controller(costs=...)``)."""

    @property
    def name(self) -> str:
        return self.spec.name

    def resolved_factory(self, where: str = "<config>") -> Callable[..., Any]:
        factory = self.spec.factory
        if factory is None:
            raise ConfigError(where, f"{model_key(self.name)}.factory",
                              "missing; give 'package.module:function' (called as factory(ctx))")
        if callable(factory):
            return factory
        return resolve(factory, where=where, key=f"{model_key(self.name)}.factory")

    def resolved_inputs(self, where: str = "<config>") -> Callable[[], Any] | None:
        if self.inputs is None or callable(self.inputs):
            return self.inputs
        return resolve(self.inputs, where=where, key=f"{model_key(self.name)}.inputs")

    def add_to(self, rt: Runtime, where: str = "<config>", *, build: bool = True) -> None:
        """Registers this model on ``rt`` (``build=False``: a factory that is never called,
        for planning only). A process model's factory stays a path (its worker imports it)."""
        if self.spec.model is not None:  # a callable given in code (ModelSpec(model=...))
            rt.add(self.spec if build else replace(self.spec, model=None, factory=_never_called))
            return
        if not build:
            factory: Any = _never_called
        elif self.spec.process and isinstance(self.spec.factory, str):
            factory = self.spec.factory
        else:
            factory = self.resolved_factory(where)
        rt.add(replace(self.spec, factory=factory))

    def unwritable(self) -> str | None:
        """The key of this model whose callable a config file cannot name (no import path), or
        None: the factory, the model itself (``ModelSpec(model=...)``), inputs or warm-up."""
        spec = self.spec
        if spec.model is not None and spec.factory is None:
            return "model"
        for key, v in (("factory", spec.factory), ("warmup", spec.warmup), ("inputs", self.inputs)):
            if callable(v) and import_path(v) is None:
                return key
        return None

    def to_table(self) -> dict[str, Any]:
        t = self.spec.to_table()
        ref = self.inputs if isinstance(self.inputs, str) or self.inputs is None else import_path(self.inputs)
        if ref:
            t["inputs"] = ref
        if self.slo:
            t["slo"] = dict(self.slo)
        if self.load:
            t["load"] = dict(self.load)
        if self.signature:
            t["signature"] = {k: v for k, v in self.signature.items()}
        if self.cost is not None:
            c = self.cost
            t["cost"] = {"alpha_ms": c.alpha_ms, "beta_ms": c.beta_ms, "serial": c.serial, "batchable": c.batchable}
        return t


def _never_called(ctx: Any) -> Any:  # pragma: no cover - planning never builds instances
    raise AssertionError("this runtime is only planned, never started")


@dataclass(frozen=True)
class Config:
    """A validated config file: the runtime's CPUs, the workload and the models, in file order."""

    models: dict[str, ModelConfig]
    cpus: str | tuple[int, ...] | None = None
    rate: float | None = None
    """``[workload] rate``: total requests/s that ``load.share`` values divide."""
    path: str = "<config>"
    shared_pool: str = "os"
    """``[runtime] shared_pool``: "os" or "scheduled" (see :class:`apportion.Runtime`); the
    tuner's plans with priority classes need "scheduled"."""
    pool_reserve: dict[int, int] | None = None
    """``[runtime] pool_reserve``: ``{priority_class: units}`` (TOML keys are strings: ``{ "1" = 1 }``),
    see :class:`apportion.Runtime`."""
    reserve_nice: int = 10
    """``[runtime] reserve_nice``: see :class:`apportion.Runtime`."""

    # -- reading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Reads and validates a TOML file; raises ConfigError naming the file and the key."""
        where = str(path)
        try:
            # Only a regular file of a config's size: /dev/zero was read until memory ran out,
            # and a FIFO without a writer blocked the command for good.
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise ConfigError(where, None, f"cannot read it: {kind}")
            with open(path, "rb") as fh:
                data = fh.read(MAX_CONFIG_BYTES + 1)
            if len(data) > MAX_CONFIG_BYTES:
                raise ConfigError(where, None, f"cannot read it: larger than {MAX_CONFIG_BYTES >> 20} MiB, "
                                  "which no config is")
            # A byte order mark (some editors write one) is not TOML: read past it.
            doc = tomllib.loads(data.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
        except OSError as e:
            raise ConfigError(where, None, f"cannot read it: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(where, None, f"not valid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(where, None, _TOO_DEEP) from None
        except UnicodeDecodeError as e:
            raise ConfigError(where, None, f"not UTF-8 text (TOML files are UTF-8): byte {e.object[e.start]:#04x} "
                              f"at offset {e.start}") from None
        return cls.from_dict(doc, where)

    @classmethod
    def loads(cls, text: str, path: str = "<string>") -> Config:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(path, None, f"not valid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(path, None, _TOO_DEEP) from None
        return cls.from_dict(doc, path)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: str = "<config>") -> Config:
        unknown = [k for k in doc if k not in TOP_KEYS]
        if unknown:
            raise ConfigError(path, unknown[0], "unknown top-level key; allowed: [models.<name>] tables, "
                              "[runtime] (cpus, shared_pool, pool_reserve, reserve_nice), [workload] (rate)")
        runtime = _table(path, "runtime", doc.get("runtime", {}), RUNTIME_KEYS)
        cpus = runtime.get("cpus")
        if cpus is not None:
            ok = isinstance(cpus, str) or (isinstance(cpus, list) and cpus and
                                           all(_is_int(c) and c >= 0 for c in cpus))
            if ok and isinstance(cpus, str):
                try:
                    listed = parse_cpulist(cpus)
                    ok = bool(listed) and all(c < _MAX_CPU_ID for c in listed)  # "" names no CPU
                except ValueError:
                    ok = False
            elif ok:
                ok = all(c < _MAX_CPU_ID for c in cpus)
            if not ok:
                raise ConfigError(path, "runtime.cpus", f"got {cpus!r}; give a CPU list like \"0-3,8\" "
                                  f"or a list of CPU ids in [0, {_MAX_CPU_ID})")
            cpus = cpus if isinstance(cpus, str) else tuple(cpus)
        shared_pool = runtime.get("shared_pool", "os")
        if shared_pool not in ("os", "scheduled"):
            raise ConfigError(path, "runtime.shared_pool", f"got {shared_pool!r}; give \"os\" or \"scheduled\"")
        pool_reserve = runtime.get("pool_reserve")
        if pool_reserve is not None:
            if not isinstance(pool_reserve, dict) or not pool_reserve:
                raise ConfigError(path, "runtime.pool_reserve", f"got {pool_reserve!r}; give a table of "
                                  "priority class = units, e.g. { \"1\" = 1 }")
            parsed: dict[int, int] = {}
            spelled: dict[int, str] = {}
            for k, v in pool_reserve.items():
                # Plain ASCII digits only: int() also takes "1_0" and other scripts' digits.
                if re.fullmatch(r"[+-]?[0-9]+", k) is None:
                    raise ConfigError(path, "runtime.pool_reserve", f"key {k!r} is not a priority class "
                                      "(an integer, like \"1\" or \"-2\")")
                cls_ = int(k)
                if cls_ in parsed:
                    raise ConfigError(path, "runtime.pool_reserve", f"keys {spelled[cls_]!r} and {k!r} both name "
                                      f"priority class {cls_}; give each class once")
                parsed[cls_], spelled[cls_] = v, k
            pool_reserve = parsed
        reserve_nice = runtime.get("reserve_nice", 10)  # checked with pool_reserve, below
        workload = _table(path, "workload", doc.get("workload", {}), WORKLOAD_KEYS)
        rate = workload.get("rate")
        if rate is not None:
            rate = _positive(path, "workload.rate", rate, "requests per second")
        models = doc.get("models")
        if not isinstance(models, dict) or not models:
            raise ConfigError(path, "models", "no models; add a table per model, e.g. [models.ranker] "
                              "with cores = 1")
        out = {name: _model(path, name, table) for name, table in models.items()}
        for m in out.values():
            if m.load and "share" in m.load and rate is None:
                raise ConfigError(path, f"{model_key(m.name)}.load.share",
                                  "a share needs a total: add [workload] rate = <requests per second>")
        shares = {n: float(m.load["share"]) for n, m in out.items() if m.load and "share" in m.load}
        if sum(shares.values()) > 1 + 1e-9:
            # They divide [workload] rate: more than all of it is a typo, not a load.
            raise ConfigError(path, "models.*.load.share", f"the models' shares add up to {sum(shares.values()):g} "
                              f"({', '.join(f'{n} {v:g}' for n, v in shares.items())}); they divide [workload] "
                              "rate, so they may add up to 1 at most")
        cfg = cls(models=out, cpus=cpus, rate=rate, path=path, shared_pool=shared_pool,
                  pool_reserve=pool_reserve, reserve_nice=reserve_nice)
        if pool_reserve is not None or "reserve_nice" in runtime:
            from .runtime import _check_reserve

            try:
                _check_reserve(pool_reserve, reserve_nice, shared_pool == "scheduled")
            except QuotaError as e:
                raise ConfigError(path, f"runtime.{e.field}", _runtime_reason(e)) from None
            if pool_reserve is None:
                raise ConfigError(path, "runtime.reserve_nice", "applies only with pool_reserve (it is the nice of "
                                  "the classes below a reservation); add pool_reserve, or leave reserve_nice out")
            # A reservation serves the models of its class and above, and lowers the OS priority
            # of every class below: one that no model can use only does the latter (a class
            # typed wrong, or a model's priority_class left out).
            classes = {m.name: m.spec.priority_class or 0 for m in out.values()}
            for cls_ in sorted(pool_reserve):
                if not any(c >= cls_ for c in classes.values()):
                    have = ", ".join(f"{n} {c}" for n, c in classes.items())
                    raise ConfigError(path, "runtime.pool_reserve",
                                      f"no model has priority_class {cls_} or above (the models' classes: "
                                      f"{have}); the reservation would serve none and only lower the "
                                      "others' OS priority")
        return cfg

    # -- using --------------------------------------------------------------------------------
    def quotas(self) -> list[Quota]:
        return [m.spec.quota for m in self.models.values()]

    def runtime(self, *, topology_root: str = "/", build: bool = True, start: bool = False) -> Runtime:
        """A Runtime with every model added (placed on this machine, or on the sysfs tree under
        ``topology_root``). ``build=False`` registers factories that are never called (planning
        only; the runtime must not be started). Raises ConfigError (DoesNotFit for models that
        are valid but do not fit together)."""
        from .runtime import Runtime

        try:
            rt = Runtime(cpus=self.cpus, topology_root=topology_root, shared_pool=self.shared_pool,
                         pool_reserve=self.pool_reserve, reserve_nice=self.reserve_nice)
        except QuotaError as e:
            raise ConfigError(self.path, f"runtime.{e.field}" if e.field else "runtime.cpus",
                              _runtime_reason(e)) from None
        try:
            _ = rt.topology  # `cpus` read against this machine (or the tree under topology_root)
        except ValueError as e:  # a CPU it does not have
            rt.close(drain=False)
            raise ConfigError(self.path, "runtime.cpus", str(e)) from None
        try:
            for m in self.models.values():
                try:
                    m.add_to(rt, self.path, build=build)
                except (QuotaError, PlacementError) as e:
                    # Adding one model re-plans all: the error may be another model's.
                    key = self._key_of(e, m.name)
                    if isinstance(e, PlacementError):
                        raise DoesNotFit(self.path, key,
                                         f"the models do not fit this machine: {_without_prefix(e)}") from None
                    raise ConfigError(self.path, key, _without_prefix(e)) from None
            if start:
                try:
                    rt.start()
                except QuotaError as e:  # e.g. a worker process that cannot import its factory
                    key = self._key_of(e)
                    if key is None:
                        raise
                    raise ConfigError(self.path, key, _without_prefix(e)) from e
                except ApportionError:
                    raise
                except Exception as e:  # the user's factory or warm-up: its error, and whose it is
                    warmed = self.models.get(getattr(e, "apportion_warmup_sample_of", None))  # type: ignore[arg-type]
                    if warmed is not None and warmed.inputs is not None and warmed.spec.warmup == warmed.inputs:
                        # A plan warms a model with its load's inputs (the tuner's do): their key.
                        raise StartFailed(self.path, f"{model_key(warmed.name)}.inputs",
                                          f"model {warmed.name!r}: its inputs (the warm-up's samples) raised "
                                          f"{type(e).__name__}: {e}") from e
                    notes = " ".join(getattr(e, "__notes__", ()))
                    raise StartFailed(self.path, "models", f"a model failed to start: {type(e).__name__}: "
                                      f"{e}" + (f" {notes}" if notes else "")) from e
        except BaseException:
            rt.close(drain=False)
            raise
        return rt

    def _key_of(self, e: Exception, fallback: str | None = None) -> str | None:
        """The config key an error's ``.model`` and ``.field`` name (``models.<m>.<field>``);
        when it names no model of this config, that of model ``fallback``, else None."""
        whose = getattr(e, "model", None)
        if not (isinstance(whose, str) and whose in self.models):
            whose = fallback
        if whose is None:
            return None
        fld = getattr(e, "field", None)
        return f"{model_key(whose)}.{fld}" if fld else model_key(whose)

    def model_loads(self, *, inputs: bool = True) -> list[ModelLoad]:
        """The ``load`` of every model that has one, as :class:`apportion.load.ModelLoad`
        (``share`` turned into a rate of ``[workload] rate``), with each model's SLO."""
        from .load import LoadError, model_load

        out = []
        for m in self.models.values():
            if not m.load:
                continue
            settings = {k: v for k, v in m.load.items() if k != "share"}
            if "share" in m.load:
                assert self.rate is not None
                settings["rate"] = self.rate * float(m.load["share"])
            settings.update(m.slo or {})
            try:
                out.append(model_load(m.name, settings, inputs=m.resolved_inputs(self.path) if inputs else None))
            except LoadError as e:
                raise ConfigError(self.path, f"{model_key(m.name)}.load", str(e)) from None
        return out

    def demand(self) -> dict[str, float | None]:
        """Requests/s each model is offered (None: a closed loop, whose demand is what it gets)."""
        out: dict[str, float | None] = {}
        for m in self.models.values():
            if not m.load:
                continue
            if "rate" in m.load:
                out[m.name] = float(m.load["rate"])
            elif "share" in m.load and self.rate is not None:
                out[m.name] = self.rate * float(m.load["share"])
            else:
                out[m.name] = None
        return out

    def replace_models(self, **changes: ModelConfig) -> Config:
        return replace(self, models={**self.models, **changes})

    # -- writing ------------------------------------------------------------------------------
    def to_toml(self, header: str = "") -> str:
        """The config as TOML that :meth:`load` reads back into an equal config (any model name,
        floats exactly); ``header`` becomes comment lines at the top."""
        doc: dict[str, Any] = {}
        runtime: dict[str, Any] = {}
        if self.cpus is not None:
            runtime["cpus"] = self.cpus if isinstance(self.cpus, str) else list(self.cpus)
        if self.shared_pool != "os":
            runtime["shared_pool"] = self.shared_pool
        if self.pool_reserve:
            runtime["pool_reserve"] = {str(k): v for k, v in sorted(self.pool_reserve.items())}
        if self.reserve_nice != 10 and self.pool_reserve:  # it does nothing without a reservation
            runtime["reserve_nice"] = self.reserve_nice
        if runtime:
            doc["runtime"] = runtime
        if self.rate is not None:
            doc["workload"] = {"rate": self.rate}
        doc["models"] = {m.name: m.to_table() for m in self.models.values()}
        for m in self.models.values():
            unnamed = m.unwritable()
            if unnamed is not None:
                raise ConfigError(self.path, f"{model_key(m.name)}.{unnamed}",
                                  "is a callable built in code with no import path (a lambda, a local function "
                                  "or one in __main__), which TOML cannot hold; the config cannot be written: "
                                  "give 'package.module:function' (or define it at a module's top level)")
        for name, table in doc["models"].items():
            for key, value in table.items():
                bad = _not_toml(value)
                if bad is not None:
                    hint = (' (give warm-up samples as a "module:function" path that returns them)'
                            if key == "warmup" else "")
                    what = "this writer does not write" if bad.startswith("value nested") else "TOML cannot hold"
                    raise ConfigError(self.path, f"{model_key(name)}.{key}",
                                      f"holds a {bad}, which {what}; the config cannot be written{hint}")
        comments = _comment(header)
        return comments + ("\n" if comments else "") + tomli_w.dumps(doc)

    def save(self, path: str | Path, header: str = "") -> Path:
        p = Path(path)
        p.write_text(self.to_toml(header))
        return p


# -- validation helpers ---------------------------------------------------------------------------

MAX_WRITE_DEPTH = 100
"""Arrays and tables nested deeper than this are not written (the TOML writer recurses)."""


def _not_toml(v: object) -> str | None:
    """What in ``v`` TOML cannot hold, as a phrase ("a set", "a value nested ..."; None when it
    all can)."""
    stack = [(v, 0)]
    while stack:
        x, depth = stack.pop()
        if depth > MAX_WRITE_DEPTH:
            return f"value nested deeper than {MAX_WRITE_DEPTH} arrays or tables"
        if isinstance(x, (list, tuple)):
            stack.extend((item, depth + 1) for item in x)
        elif isinstance(x, Mapping):
            for k, item in x.items():
                if not isinstance(k, str):
                    return f"{type(k).__module__}.{type(k).__qualname__} key".removeprefix("builtins.")
                stack.append((item, depth + 1))
        elif not isinstance(x, (str, int, float, bool)):
            return f"{type(x).__module__}.{type(x).__qualname__}".removeprefix("builtins.")
    return None


def _comment(text: str) -> str:
    """``text`` as TOML comment lines: control characters (which a comment may not hold; tab
    may) written as escapes."""
    def line(s: str) -> str:
        return "".join(c if c == "\t" or (c >= " " and c != "\x7f") else c.encode("unicode_escape").decode()
                       for c in s)

    return "".join(f"# {line(x)}".rstrip() + "\n" for x in text.splitlines())


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(path: str, key: str, v: object, what: str) -> float:
    f = real(v)
    if f is None or not (math.isfinite(f) and f > 0):
        raise ConfigError(path, key, f"got {v!r}; give a positive number ({what})")
    return f


def _table(path: str, key: str, value: object, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, key, f"must be a table with keys {', '.join(allowed)}, got {type(value).__name__}")
    for k in value:
        if k not in allowed:
            raise ConfigError(path, f"{key}.{k}", f"unknown key; allowed: {', '.join(allowed)}")
    return value


def _model(path: str, name: str, table: object) -> ModelConfig:
    key = model_key(name)
    if not isinstance(table, dict):
        raise ConfigError(path, key, f"must be a table of model fields ({', '.join(TABLE_FIELDS)}) and "
                          f"{', '.join(OTHER_KEYS)}, got {type(table).__name__}")
    for k in table:
        if k not in MODEL_KEYS:
            raise ConfigError(path, f"{key}.{k}", f"unknown key; allowed: {', '.join(MODEL_KEYS)}")
    try:
        spec = ModelSpec.from_table(name, {k: v for k, v in table.items() if k in TABLE_FIELDS})
    except QuotaError as e:
        raise ConfigError(path, f"{key}.{e.field}" if e.field else key, e.reason) from None
    v = table.get("inputs")
    if v is not None and (not isinstance(v, str) or v.count(":") != 1 or v.startswith(":") or v.endswith(":")):
        raise ConfigError(path, f"{key}.inputs", f"got {v!r}; give an import path 'package.module:function'")
    slo = None
    if "slo" in table:
        s = _table(path, f"{key}.slo", table["slo"], SLO_KEYS)
        if "latency_ms" not in s:
            raise ConfigError(path, f"{key}.slo.latency_ms", "missing; give the latency objective in ms")
        slo = {"latency_ms": _positive(path, f"{key}.slo.latency_ms", s["latency_ms"], "milliseconds")}
        p = s.get("percentile", 99.0)
        pf = real(p)
        if pf is None or not 0 < pf <= 100:
            raise ConfigError(path, f"{key}.slo.percentile", f"got {p!r}; give a number in (0, 100]")
        slo["percentile"] = pf
        if "timeout_ms" in s:
            slo["timeout_ms"] = _positive(path, f"{key}.slo.timeout_ms", s["timeout_ms"], "milliseconds")
    load = None
    if "load" in table:
        ld = dict(_table(path, f"{key}.load", table["load"], LOAD_KEYS))
        kinds = [k for k in ("concurrency", "rate", "share") if k in ld]
        if len(kinds) != 1:
            raise ConfigError(path, f"{key}.load", f"give exactly one of concurrency (closed loop), rate "
                              f"(requests/s) or share (of [workload] rate), got {kinds or 'none'}")
        if "concurrency" in ld and (not _is_int(ld["concurrency"]) or not 1 <= ld["concurrency"] <= MAX_CONCURRENCY):
            raise ConfigError(path, f"{key}.load.concurrency", f"got {ld['concurrency']!r}; give an integer in "
                              f"1..{MAX_CONCURRENCY}")
        if "rate" in ld:
            ld["rate"] = _positive(path, f"{key}.load.rate", ld["rate"], "requests per second")
        if "share" in ld:
            sh = ld["share"]
            shf = real(sh)
            if shf is None or not 0 < shf <= 1:
                raise ConfigError(path, f"{key}.load.share", f"got {sh!r}; give a fraction in (0, 1]")
            ld["share"] = shf
        if "arrivals" in ld and ld["arrivals"] not in ("poisson", "constant"):
            raise ConfigError(path, f"{key}.load.arrivals", f"got {ld['arrivals']!r}; give \"poisson\" or \"constant\"")
        if "priority" in ld:
            levels = table.get("priority_levels", 1)  # checked with the model's other keys
            levels = levels if _is_int(levels) and levels >= 1 else 1
            if not _is_int(ld["priority"]) or not 0 <= ld["priority"] < levels:
                raise ConfigError(path, f"{key}.load.priority", f"got {ld['priority']!r}; give an integer in "
                                  f"[0, {levels}) (the model's priority_levels is {levels}; 0 is the highest)")
        load = ld
    signature = None
    if "signature" in table:
        sig = _table(path, f"{key}.signature", table["signature"], SIGNATURE_KEYS)
        for side in ("inputs", "outputs"):
            tensors = sig.get(side)
            if not isinstance(tensors, list) or not tensors:
                raise ConfigError(path, f"{key}.signature.{side}", "give a list of tensors, e.g. "
                                  '[{ name = "x", datatype = "FP32", shape = [-1, 16] }]')
            for i, t in enumerate(tensors):
                _table(path, f"{key}.signature.{side}[{i}]", t, ("name", "datatype", "shape"))
        signature = sig
    cost = _cost(path, f"{key}.cost", table["cost"]) if "cost" in table else None
    return ModelConfig(spec, inputs=v, slo=slo, load=load, signature=signature, cost=cost)


def _cost(path: str, key: str, value: object) -> CostModel:
    """A ``cost`` table: ``alpha_ms`` and ``beta_ms`` (ms, >= 0, not both 0), ``serial`` (in
    [0, 1], default 1) and ``batchable`` (default true)."""
    from .tune.cost import CostModel  # (at call time: the tune package imports this module)

    t = _table(path, key, value, COST_KEYS)
    nums: dict[str, float] = {"serial": 1.0}
    # (key, least, most, what it is where it is required: None where it has a default)
    for k, least, most, what in (("alpha_ms", 0.0, math.inf, "fixed part of a call"),
                                 ("beta_ms", 0.0, math.inf, "part per request of a call"),
                                 ("serial", 0.0, 1.0, None)):
        if k not in t:
            if what is None:
                continue
            raise ConfigError(path, f"{key}.{k}", f"missing; give the cost model's {what} in ms (a tuner's plan "
                              "writes it)")
        v = real(t[k])
        if v is None or not (least <= v <= most) or not math.isfinite(v):
            raise ConfigError(path, f"{key}.{k}", f"got {t[k]!r}; give a number in [{least:g}, {most:g}]"
                              if math.isfinite(most) else f"got {t[k]!r}; give a finite number >= {least:g}")
        nums[k] = v
    batchable = t.get("batchable", True)
    if not isinstance(batchable, bool):
        raise ConfigError(path, f"{key}.batchable", f"got {batchable!r}; give true or false")
    try:
        return CostModel(nums["alpha_ms"], nums["beta_ms"], nums["serial"], batchable)
    except QuotaError as e:
        raise ConfigError(path, key, str(e).removeprefix("CostModel: ")) from None
