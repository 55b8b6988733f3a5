"""Allocation: divide a machine's cores between models by marginal gain (pure)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import QuotaError
from .cost import Need, Shape

__all__ = ["OBJECTIVES", "Allocation", "Objective", "allocate", "objective_value"]

Objective = Literal["goodput", "min_fraction"]
OBJECTIVES: tuple[str, ...] = ("goodput", "min_fraction")


def _score(needs: Sequence[Need], given: Mapping[str, int], step: float, objective: str) -> tuple[float, float]:
    served = {n.name: n.served(given[n.name] * step)[0] for n in needs}
    total = sum(served.values())
    if objective == "goodput":
        return (total, 0.0)
    fracs = []
    for n in needs:
        shape = n.served(max(given[n.name], 1) * step)[1]
        w = n.wanted(shape) if shape is not None else (n.demand or 0.0)
        fracs.append(served[n.name] / w if w > 0 else 1.0)
    return (min(fracs), total)


def _polish(needs: Sequence[Need], given: dict[str, int], step: float, objective: str,
            rounds: int = 200) -> None:
    """Local search after the greedy pass: move k slices from one model to another while that
    improves the objective (the greedy pass can stop short where a model's curve is not
    concave, e.g. a cheaper shape that only fits at a larger share)."""
    current = _score(needs, given, step, objective)
    for _ in range(rounds):
        improved = False
        for a, b in itertools.permutations([n.name for n in needs], 2):
            for k in range(1, given[a] + 1):
                given[a] -= k
                given[b] += k
                score = _score(needs, given, step, objective)
                if score > tuple(c + 1e-9 for c in current):
                    current, improved = score, True
                    break
                given[a] += k
                given[b] -= k
            if improved:
                break
        if not improved:
            return


@dataclass(frozen=True)
class Allocation:
    """One model's share: ``cores`` (fractional: a share of a pool), the shape, and the
    requests/s predicted within its SLO against what it wants."""

    name: str
    cores: float
    shape: Shape | None
    served: float
    wanted: float

    @property
    def fraction(self) -> float:
        return self.served / self.wanted if self.wanted > 0 else 1.0


def objective_value(values: Mapping[str, tuple[float, float]], objective: str) -> float:
    """values: model -> (served, wanted)."""
    if objective == "goodput":
        return sum(v[0] for v in values.values())
    return min((v[0] / v[1] if v[1] > 0 else 1.0) for v in values.values())


def allocate(needs: Sequence[Need], cores: float, objective: Objective = "goodput",
             step: float | None = None) -> dict[str, Allocation]:
    """Divides ``cores`` between ``needs`` by marginal gain, in slices of ``step`` cores
    (default: a quarter core up to 8 cores, else one core).

    Each round gives the model with the best gain per core the next ``k`` slices (k >= 1 looks
    past plateaus, e.g. a model that needs two threads to meet its SLO gains nothing from the
    first core alone). ``goodput`` maximises the total requests/s within SLOs; ``min_fraction``
    raises the worst-served model first. Cores no model can use are spread as headroom.
    """
    if objective not in OBJECTIVES:
        raise QuotaError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if step is None:
        step = 0.25 if cores <= 8 else 1.0
    units = int(round(cores / step))
    given = {n.name: 0 for n in needs}
    by = {n.name: n for n in needs}

    def value(name: str, u: int) -> float:
        return by[name].served(u * step)[0]

    def wanted(name: str, u: int) -> float:
        shape = by[name].served(max(u, 1) * step)[1]
        return by[name].wanted(shape) if shape is not None else (by[name].demand or 0.0)

    left = units
    while left > 0:
        best: tuple[float, float, str, int] | None = None
        for n in needs:
            u = given[n.name]
            now = value(n.name, u)
            frac = now / max(wanted(n.name, u), 1e-9)
            for k in range(1, left + 1):
                gain = value(n.name, u + k) - now
                if gain <= 1e-9:
                    continue
                if objective == "goodput":
                    key = (gain / k, -frac)
                else:
                    # Water-filling: the worst-served model, by the fewest slices that help it.
                    key = (-frac, -k)
                if best is None or key > (best[0], best[1]):
                    best = (key[0], key[1], n.name, k)
                if objective != "goodput":
                    break
        if best is None:
            break
        given[best[2]] += best[3]
        left -= best[3]
    _polish(needs, given, step, objective)
    left = units - sum(given.values())
    # Headroom: the rest goes, a slice at a time, to whoever runs closest to its capacity.
    while left > 0 and needs:
        def load(n: Need) -> float:
            s, shape = n.served(given[n.name] * step)
            if shape is None:
                return 0.0
            cap = given[n.name] * step * 1000.0 / n.cost.core_ms(shape.threads, shape.batch)
            return s / cap if cap else 0.0
        target = max(needs, key=load)
        given[target.name] += 1
        left -= 1
    out = {}
    for n in needs:
        a = given[n.name] * step
        served, shape = n.served(a)
        if shape is None and a > 0:
            shapes = n.shapes(max(a, 1.0))
            shape = shapes[0] if shapes else Shape(1, 1)
        out[n.name] = Allocation(n.name, a, shape, served, n.wanted(shape) if shape else (n.demand or 0.0))
    return out
