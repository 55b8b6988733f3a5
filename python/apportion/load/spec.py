"""What a load is: per-model load descriptions (:class:`ModelLoad`, :class:`SLO`), their
forms in config tables and on command lines, and the run settings' checks. Pure: no runtime,
no threads, no clock."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .._private.checks import finite_number, real
from ..errors import ApportionError, ModelNotFound

__all__ = ["SLO", "SPEC_KEYS", "Arrivals", "LoadError", "ModelLoad", "model_load", "parse_spec",
           "validate_settings"]

Arrivals = Literal["poisson", "constant"]


class LoadError(ApportionError, ValueError):
    """An invalid load description or setting. The message names the model (where there is
    one), the field and what would be valid."""


_MAX_S = 1e9  # the longest time a load setting may name, in seconds (31 years)


def _positive_number(owner: str, fname: str, value: object, *, allow_none: bool = False,
                     maximum: float | None = None) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoadError(f"{owner}: {fname} must be a positive number, got {value!r}")
    if not (finite_number(value) and value > 0):
        raise LoadError(f"{owner}: {fname} must be a positive, finite number, got {value!r}")
    if maximum is not None and value > maximum:
        raise LoadError(f"{owner}: {fname} must be at most {maximum:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class SLO:
    """A model's service-level objective.

    ``latency_ms``: the end-to-end latency a request must meet to count towards goodput; the
    model meets its SLO when the ``percentile`` of end-to-end latency is within it (e.g.
    ``SLO(latency_ms=20, percentile=99)`` is "p99 <= 20 ms").
    ``timeout_ms``: passed to every ``submit`` as the request's deadline (a request that has
    not started by then expires without running). With no ``latency_ms``, goodput counts
    completions within ``timeout_ms``.
    """

    latency_ms: float | None = None
    percentile: float = 99.0
    timeout_ms: float | None = None

    def validate(self, model: str) -> None:
        owner = f"model {model!r}"
        _positive_number(owner, "slo.latency_ms", self.latency_ms, allow_none=True, maximum=_MAX_S * 1e3)
        _positive_number(owner, "slo.timeout_ms", self.timeout_ms, allow_none=True, maximum=_MAX_S * 1e3)
        p = self.percentile
        if not isinstance(p, (int, float)) or (pf := real(p)) is None or not 0 < pf <= 100:
            raise LoadError(f"{owner}: slo.percentile must be in (0, 100], got {p!r}")
        if self.latency_ms is None and self.timeout_ms is None:
            raise LoadError(f"{owner}: slo needs latency_ms and/or timeout_ms (both are None)")

    @property
    def good_ms(self) -> float | None:
        """The end-to-end latency a completion must meet to count as good."""
        return self.latency_ms if self.latency_ms is not None else self.timeout_ms


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """The load put on one model: exactly one of ``concurrency`` (closed loop) or ``rate``
    (open loop, requests per second).

    ``inputs``: what each request carries. A zero-argument callable is called once per
    request (in the model's driver thread; raising StopIteration ends the load); a sequence
    (list, tuple) is cycled through; any other iterable is consumed once, and when it runs
    dry the model's load stops (the report says so). None sends ``None``.
    ``arrivals``: for an open loop, ``"poisson"`` (exponential gaps, like independent clients)
    or ``"constant"`` (evenly spaced).
    ``priority``: passed to ``submit``.
    """

    model: str
    concurrency: int | None = None
    rate: float | None = None
    inputs: Callable[[], Any] | Iterable[Any] | None = None
    slo: SLO | None = None
    arrivals: Arrivals = "poisson"
    priority: int | None = None

    @property
    def mode(self) -> Literal["closed", "open"]:
        return "closed" if self.concurrency is not None else "open"

    def describe(self) -> str:
        """Short label: ``closed x4`` or ``open 200/s``."""
        if self.concurrency is not None:
            return f"closed x{self.concurrency}"
        return f"open {self.rate:g}/s" + ("" if self.arrivals == "poisson" else f" {self.arrivals}")

    def validate(self, models: Sequence[str]) -> None:
        """Raises ModelNotFound or LoadError (naming the model and the field)."""
        if not isinstance(self.model, str):
            raise LoadError(f"ModelLoad: model must be a model name (str), got {self.model!r}")
        owner = f"model {self.model!r}"
        if self.model not in models:
            raise ModelNotFound(
                f"{owner}: field 'model': no such model in the runtime (registered: {list(models)})",
                model=self.model)
        if (self.concurrency is None) == (self.rate is None):
            raise LoadError(
                f"{owner}: give exactly one of concurrency (closed loop) or rate (open loop), "
                f"got concurrency={self.concurrency!r}, rate={self.rate!r}"
            )
        if self.concurrency is not None:
            c = self.concurrency
            if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= MAX_CONCURRENCY:
                raise LoadError(f"{owner}: concurrency must be an integer in 1..{MAX_CONCURRENCY}, got {c!r}")
        else:
            _positive_number(owner, "rate (requests per second)", self.rate)
        if self.arrivals not in ("poisson", "constant"):
            raise LoadError(f"{owner}: arrivals must be 'poisson' or 'constant', got {self.arrivals!r}")
        if self.slo is not None:
            if not isinstance(self.slo, SLO):
                raise LoadError(f"{owner}: slo must be apportion.load.SLO(...) or None, got {self.slo!r}")
            self.slo.validate(self.model)
        if self.priority is not None and (isinstance(self.priority, bool) or not isinstance(self.priority, int)
                                          or self.priority < 0):
            raise LoadError(f"{owner}: priority must be an integer >= 0 (0 the highest level) or None, "
                            f"got {self.priority!r}")
        if self.inputs is not None and not callable(self.inputs) and not isinstance(self.inputs, Iterable):
            raise LoadError(
                f"{owner}: inputs must be a zero-argument callable, an iterable or None, "
                f"got {type(self.inputs).__name__}"
            )


MAX_CONCURRENCY = 1 << 16
"""The most clients a closed loop runs (each is a task or an outstanding request)."""


# Flat keys of a load as a config table or a command line gives them, with their types.
SPEC_KEYS: dict[str, type] = {
    "concurrency": int,
    "rate": float,
    "arrivals": str,
    "priority": int,
    "latency_ms": float,
    "percentile": float,
    "timeout_ms": float,
}


def model_load(model: str, settings: Mapping[str, Any], *, inputs: Any = None) -> ModelLoad:
    """A :class:`ModelLoad` from flat keys (a TOML table, parsed command-line options):
    ``concurrency`` or ``rate``, ``arrivals``, ``priority``, and the SLO's ``latency_ms``,
    ``percentile``, ``timeout_ms``. String values are converted (``"4"`` -> 4). Raises
    LoadError naming the model, the key and what is allowed; the result is validated against
    the runtime by :func:`run`.
    """
    values: dict[str, Any] = {}
    for key, raw in settings.items():
        kind = SPEC_KEYS.get(key)
        if kind is None:
            raise LoadError(f"model {model!r}: unknown key {key!r}; allowed: {', '.join(SPEC_KEYS)}")
        if isinstance(raw, str) and kind is not str:
            try:
                raw = kind(raw)
            except ValueError:
                raise LoadError(
                    f"model {model!r}: {key} must be {'an integer' if kind is int else 'a number'}, "
                    f"got {raw!r}"
                ) from None
        elif kind is float and isinstance(raw, int) and not isinstance(raw, bool):
            raw = float(raw)
        values[key] = raw
    slo_keys = {k: values.pop(k) for k in ("latency_ms", "percentile", "timeout_ms") if k in values}
    slo = SLO(**slo_keys) if slo_keys else None
    if slo is not None:
        slo.validate(model)
    return ModelLoad(model, inputs=inputs, slo=slo, **values)


def parse_spec(text: str) -> ModelLoad:
    """A :class:`ModelLoad` from ``NAME:key=value,...`` as a command line gives it, e.g.
    ``ranker:concurrency=4,latency_ms=20`` or ``echo:rate=500,timeout_ms=50`` (keys as in
    :func:`model_load`). The name ends at the last ``:`` (no setting holds one), so a model
    named ``a:b`` is ``a:b:rate=5``. A key given twice is an error."""
    name, sep, rest = text.rpartition(":")
    name = name.strip()
    if not name or not sep or not rest.strip():
        raise LoadError(
            f"load spec {text!r}: expected NAME:key=value[,key=value...], "
            "e.g. 'ranker:concurrency=4' or 'echo:rate=500,latency_ms=20'"
        )
    settings: dict[str, str] = {}
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise LoadError(f"model {name!r}: load spec part {part!r} is not key=value")
        if key.strip() in settings:
            raise LoadError(f"model {name!r}: load spec key {key.strip()!r} is given twice")
        settings[key.strip()] = value.strip()
    return model_load(name, settings)


MIN_WINDOW_S = 0.001
"""The shortest measurement window :func:`apportion.load.run` takes."""


def validate_settings(warmup_s: object, window_s: object, stable_windows: object,
                       tolerance: object, max_s: object, drain_timeout_s: object) -> None:
    def number(fname: str, v: object, minimum: float, inclusive: bool) -> float:
        if not finite_number(v) or (v < minimum if inclusive else v <= minimum) or v > _MAX_S:
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise LoadError(f"load.run: {fname} must be a finite number {bound} and at most {_MAX_S:g}, got {v!r}")
        return float(v)

    w = number("warmup_s", warmup_s, 0.0, True)
    win = number("window_s", window_s, 0.0, False)
    if win < MIN_WINDOW_S:
        raise LoadError(f"load.run: window_s must be at least {MIN_WINDOW_S:g} s (a window's figures need "
                        f"requests in it), got {window_s!r}")
    number("tolerance", tolerance, 0.0, False)
    m = number("max_s", max_s, 0.0, False)
    number("drain_timeout_s", drain_timeout_s, 0.0, True)
    if isinstance(stable_windows, bool) or not isinstance(stable_windows, int) or stable_windows < 1:
        raise LoadError(f"load.run: stable_windows must be an integer >= 1, got {stable_windows!r}")
    needed = w + stable_windows * win
    if m < needed - 1e-9:
        raise LoadError(
            f"load.run: max_s={m:g} leaves no room for warmup_s + stable_windows * window_s "
            f"= {needed:g} s; raise max_s to at least {needed:g}"
        )
