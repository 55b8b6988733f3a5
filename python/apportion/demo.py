"""``apportion demo``: three torch models on this machine, unmanaged vs equal split vs tuned.

The models are built in code with random weights (nothing is downloaded): an MLP, a small
convolutional net and a small transformer encoder, each a few milliseconds per call on one
thread. Each request is one sample without a batch dimension (MLP: 8x512 rows, conv net: one
3x64x64 image, encoder: one 48x128 sequence); the models accept any leading dims, so the
runtime's batching can stack requests.

The workload is open loop (Poisson arrivals), split between the models by fixed shares
(mlp 35%, conv 20%, encoder 45%), with a p99 latency objective per model (mlp 50 ms, conv
75 ms, encoder 40 ms); every request carries that objective as its deadline. The total rate
is ``load`` (default 1.0) times what this machine's cores would serve if each request ran on
one thread by itself with no serving overhead, measured at start-up (so the demo loads any
machine the same way; capped at 3000 requests/s, which the Python load generator sustains).
1.0 is a full server: served one request at a time, the per-request overhead (the Python
load generator and the runtime share the same cores) leaves too little for the demand, so only a
configuration that uses the cores better (fewer threads fighting, batching) serves all of it.
At 0.8 an equal split sometimes serves everything and no configuration can do better
(bench/RESULTS.md records both).

Three ways to serve the same models under the same load, queue bound and deadlines (each
model's timeout is its SLO, with ``admission="deadline"``: a request that would wait past it
behind the queue is refused at once, in every mode):

- **unmanaged**: what frameworks do by default: every model floats on every core with torch's
  default thread count (one intra-op thread per CPU), one instance, no batching;
- **equal split**: the cores divided equally (whole exclusive cores each when there are at
  least as many cores as models, else one thread per model on a shared pool);
- **tuned**: the plan :func:`apportion.tune` finds within the time budget.

Then the mix shifts (conv 20% -> 85%, mlp 35% -> 5%, encoder 45% -> 10%; the same total
rate), and two more rows compare, after the shift:

- **shift: static**: the tuned plan, left as it was;
- **shift: controller**: the tuned plan serving the old mix with an :class:`apportion.Controller`
  beside it; midway the mix shifts and the controller moves instances, batching and admission
  between the models (each move is printed with its reason, and how long after the shift the
  last one came; the controller knows the tuner's cost models, so it makes no batching move
  that saves a model little); each model's queue is ``MAX_QUEUE`` deep, so the controller may raise an
  admission bound the plan sized for the old mix;
- **shift: retuned** (with ``--retune``): a plan tuned from scratch for the new mix.

Both after-shift rows are measured the same way: ``adapt_s`` seconds of the new mix first (the
controller's time to adapt; a warm-up for the static plan), then the measured windows. With
``--retune`` they are measured in three rounds (``--rounds``), each round every row in turn, and
each row shows its round with the median goodput (the line under the table gives every round's):
one measurement of a layout moved by 26-45% between repetitions on a 2-CPU VM
(bench/RESULTS.md), more than the 10% by which the controller is compared with the retuned
plan. The adaptation figures (the last move, the longest miss) are the worst over the rounds.
``--shift MODEL=SHARE,...`` picks another mix (the same total rate).

The default shift moves the traffic to conv, the model whose batching gains least (a batch of
eight costs it ~0.95 ms a request against ~1.1 ms alone): no batch size lets the static plan's
conv instance serve 4.25 times its traffic, so the plan falls short (it served 54-75% of the
new demand in the quiet runs of bench/RESULTS.md, 48-62% beside a busy loop, over four kinds
of tuned plan). A smaller shift (``--shift mlp=0.1,conv=0.7,encoder=0.2``, the default before)
a plan with every model on the shared pool absorbs in good part: the static plan served 81-87%
of the new demand there, and the controller 1.06-1.18x that, against 67-72% and 1.39-1.45x
where the plan gave encoder a core of its own (bench/RESULTS.md). A shift to mlp (``--shift
mlp=0.7,conv=0.2,encoder=0.1``) the tuned plan absorbs at the default load (batching lets one
mlp instance serve most of the rate), so the controller has little to add there; at ``--load
1.6`` it has more (bench/RESULTS.md,
"After the shift at 1.6x the one-thread load").
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from . import _table
from ._private.argtypes import above_zero, at_least, in_range, seconds
from . import load as ld
from .config import Config, ConfigError, ModelConfig
from .controller import Controller, Move
from .errors import ApportionError
from .spec import ModelSpec
from .tune import Choice, CostModel, Measured, Settings, apply, measure_config, tune

__all__ = ["build_conv", "build_encoder", "build_mlp", "conv_input", "demo_config", "encoder_input",
           "median_round", "mlp_input", "run_demo"]

SHARES = {"mlp": 0.35, "conv": 0.20, "encoder": 0.45}
SHIFTED_SHARES = {"mlp": 0.05, "conv": 0.85, "encoder": 0.10}
SLO_MS = {"mlp": 50.0, "conv": 75.0, "encoder": 40.0}
MAX_QUEUE = 64
MAX_TOTAL_RATE = 3000.0
MODE_SETTINGS = Settings(warmup_s=1.0, window_s=1.0, stable_windows=3, max_s=6.0)
"""How the demo measures each mode, by default (``--window-s`` changes the window)."""
SWITCH_INTERVAL_S = 0.0005
"""The interpreter's switch interval while the demo runs (see :func:`run_demo`)."""


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ApportionError(f"the demo's models are torch models and torch cannot be imported ({e}): "
                             "pip install 'apportion[demo]'") from None
    return torch


def _leading(inner: Any, tail: int) -> Any:
    """Wraps a module so it accepts any number of leading dims (flattened into one batch dim)."""
    torch = _torch()
    module: Any = torch.nn.Module  # torch is imported here, at run time: a base class of type Any

    class Leading(module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            lead = x.shape[: x.dim() - tail]
            y = self.inner(x.reshape(-1, *x.shape[x.dim() - tail:]))
            return y.reshape(*lead, *y.shape[1:])

    return Leading()


def build_mlp(ctx: Any = None) -> Any:
    """512 -> 1536 -> 1536 -> 256 with ReLUs (random weights)."""
    nn = _torch().nn
    _torch().manual_seed(1)
    return _leading(nn.Sequential(nn.Linear(512, 1536), nn.ReLU(), nn.Linear(1536, 1536), nn.ReLU(),
                                  nn.Linear(1536, 256)), 1)


def build_conv(ctx: Any = None) -> Any:
    """Two 3x3 convolutions, pooling and a linear head, on 3x64x64 images."""
    nn = _torch().nn
    _torch().manual_seed(2)
    return _leading(nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(64, 10)), 3)


def build_encoder(ctx: Any = None) -> Any:
    """Two transformer encoder layers (d_model 128, 4 heads, ffn 512) on 48-token sequences."""
    nn = _torch().nn
    _torch().manual_seed(3)
    layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
    return _leading(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), 2)


_INPUTS: dict[str, Any] = {}


def _cached(name: str, shape: tuple[int, ...]) -> Any:
    # One fixed input per model: the load generator calls this per request, and a fresh
    # random tensor each time would cost the generator more than the request's bookkeeping.
    x = _INPUTS.get(name)
    if x is None:
        torch = _torch()
        x = _INPUTS[name] = torch.randn(*shape, generator=torch.Generator().manual_seed(len(name)))
    return x


def mlp_input() -> Any:
    return _cached("mlp", (8, 512))


def conv_input() -> Any:
    return _cached("conv", (3, 64, 64))


def encoder_input() -> Any:
    return _cached("encoder", (48, 128))


_MODELS = {"mlp": (build_mlp, mlp_input), "conv": (build_conv, conv_input),
           "encoder": (build_encoder, encoder_input)}


def single_thread_ms(repeat_s: float = 0.3, rounds: int = 5) -> dict[str, float]:
    """Each model's time per request on one thread, unbatched (measured in a fresh thread so
    this process's torch settings are untouched): ``rounds`` rounds of ``repeat_s / rounds``
    seconds per model, the models interleaved, and per model the fastest round's mean. A
    neighbour's burst (or a previous process still exiting) slows some rounds, never speeds
    one up: the fastest round is the model's own cost, which sizes the workload the same way
    from run to run."""
    out: dict[str, float] = {}

    def work() -> None:
        torch = _torch()
        torch.get_num_threads()
        torch.set_num_threads(1)
        built = {name: (build().eval(), make()) for name, (build, make) in _MODELS.items()}
        with torch.inference_mode():
            for m, x in built.values():
                for _ in range(3):
                    m(x)
            for _ in range(rounds):
                for name, (m, x) in built.items():
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < repeat_s / rounds:
                        m(x)
                        n += 1
                    ms = (time.perf_counter() - t0) / n * 1000.0
                    out[name] = min(out.get(name, ms), ms)

    failed: list[BaseException] = []

    def calibrate() -> None:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            failed.append(e)

    t = threading.Thread(target=calibrate, name="apportion-demo-calibrate")
    t.start()
    t.join()
    if failed:
        raise failed[0]
    return out


def one_thread_capacity(per_request_ms: dict[str, float], cpus: int | None = None) -> float:
    """Requests/s the demo's mix takes on ``cpus`` (default: this process's) at one thread per
    request, from each model's one-thread time: what ``--load`` multiplies."""
    n_cpus = cpus or len(os.sched_getaffinity(0))
    return n_cpus * 1000.0 / sum(SHARES[n] * per_request_ms[n] for n in SHARES)


def offered(load: float, rate: float, per_request_ms: dict[str, float], cpus: int | None = None) -> str:
    """What the demo's total ``rate`` is, against the one-thread capacity: ``load`` times it, or,
    where the rate was capped at MAX_TOTAL_RATE, the multiple that the cap leaves."""
    if rate < MAX_TOTAL_RATE:
        return f"{load:g}x the one-thread capacity"
    return (f"{rate / one_thread_capacity(per_request_ms, cpus):.2f}x the one-thread capacity: --load {load:g}, "
            f"capped at the load generator's {MAX_TOTAL_RATE:g} req/s")


def demo_config(load: float = 1.0, *, per_request_ms: dict[str, float] | None = None,
                cpus: int | None = None) -> Config:
    """The demo's models and workload as a Config (``load`` x the machine's one-thread
    capacity, see the module documentation)."""
    ms = per_request_ms if per_request_ms is not None else single_thread_ms()
    capacity = one_thread_capacity(ms, cpus)
    rate = round(min(load * capacity, MAX_TOTAL_RATE), 1)
    if rate <= 0:
        raise ConfigError("<command line>", "--load", f"{load:g} x the machine's one-thread capacity "
                          f"({capacity:.0f} requests/s) is {load * capacity:.2g} requests/s, below the 0.1 the "
                          "demo offers at least; give a larger load")
    models = {}
    for name, (build, make) in _MODELS.items():
        models[name] = ModelConfig(
            ModelSpec(name, factory=f"apportion.demo:{build.__name__}", max_queue=MAX_QUEUE,
                      timeout_ms=SLO_MS[name], admission="deadline"),
            inputs=f"apportion.demo:{make.__name__}",
            slo={"latency_ms": SLO_MS[name], "percentile": 99.0}, load={"share": SHARES[name]})
    return Config(models=models, rate=rate, path="<apportion demo>")


def baselines(cfg: Config, n_cores: int) -> dict[str, dict[str, Choice]]:
    names = list(cfg.models)
    unmanaged = {n: Choice("shared", None, 1, n_cores, None) for n in names}
    if n_cores >= len(names):
        each = n_cores // len(names)
        equal = {n: Choice("exclusive", each, 1, each, None) for n in names}
    else:
        equal = {n: Choice("shared", None, 1, max(1, n_cores // len(names)), None) for n in names}
    return {"unmanaged": unmanaged, "equal split": equal}


def parse_shares(text: str) -> dict[str, float]:
    """``--shift``'s value: ``mlp=0.85,conv=0.1,encoder=0.05``, every demo model once, each share
    a finite number >= 0, together 1 (the total rate stays as it was). Anything else is a usage
    error naming what is wrong (argparse names the option)."""
    shares: dict[str, float] = {}
    for item in text.split(","):
        name, eq, value = item.strip().partition("=")
        name = name.strip()
        if not eq:
            raise argparse.ArgumentTypeError(f"expected MODEL=SHARE, got {item.strip()!r} (in {text!r})")
        if name not in SHARES:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of the demo's models "
                                             f"({', '.join(SHARES)})")
        if name in shares:
            raise argparse.ArgumentTypeError(f"{name!r} is given twice")
        try:
            share = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a share such as 0.25, got {value.strip()!r}") from None
        if not math.isfinite(share) or share < 0:
            raise argparse.ArgumentTypeError(f"{name}: a share is a finite number >= 0, got {value.strip()!r}")
        shares[name] = share
    missing = [n for n in SHARES if n not in shares]
    if missing:
        raise argparse.ArgumentTypeError(f"every model needs a share; missing: {', '.join(missing)}")
    total = sum(shares.values())
    if abs(total - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"the shares add up to {total:g}, not 1 (the shift keeps the total rate)")
    return {n: shares[n] for n in SHARES}


def shifted(cfg: Config, shares: dict[str, float] | None = None) -> Config:
    """``cfg`` with each model's share of the total rate replaced (default: the demo's shift)."""
    shares = shares or SHIFTED_SHARES
    return replace(cfg, models={n: replace(m, load={**(m.load or {}), "share": shares[n]})
                                for n, m in cfg.models.items()})


@dataclass(frozen=True)
class Adapted:
    """The controller's run across the shift."""

    results: dict[str, Measured]
    """Per model, measured after the shift (after ``adapt_s``)."""
    moves: list[Move]
    shift_at_s: float
    """When the mix shifted, on the controller's clock (``Move.at_s``)."""
    longest_miss: tuple[float, str | None] = (0.0, None)
    """The longest run of controller windows after the shift in which a model's p99 exceeded
    its SLO (seconds) and the model that missed longest in it (None: no window missed)."""
    held: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Per model the controller held at risk without a move after the shift (see
    :attr:`Controller.held`): in how many windows, and the last reason."""

    def describe(self) -> list[str]:
        """A line per move (when, which model, what, why), then one per model held at risk
        without a move after the shift."""
        lines = []
        for m in self.moves:
            when = "after" if m.at_s >= self.shift_at_s else "before"
            lines.append(f"{abs(m.at_s - self.shift_at_s):5.1f} s {when} the shift: {m.model}: {m.change} ({m.reason})")
        for n, (count, why) in self.held.items():
            lines.append(f"held after the shift: {n} most at risk without a move in {count} window(s); last: {why}")
        return lines

    @property
    def adapted_s(self) -> float | None:
        """Seconds from the shift to the controller's last move (None: it moved nothing after it)."""
        after = [m.at_s for m in self.moves if m.at_s >= self.shift_at_s]
        return max(after) - self.shift_at_s if after else None


def _measured(report: ld.LoadReport, demand: dict[str, float | None]) -> dict[str, Measured]:
    return {name: Measured(throughput=r.throughput, goodput=r.goodput,
                           p99_ms=r.latency.p99_ms if r.latency else None,
                           slo_met=r.slo_met if r.slo_met is not None else (False if r.slo and r.slo.latency_ms else None),
                           wanted=demand.get(name), expired=r.expired, rejected=r.rejected)
            for name, r in report.items()}


def median_round(totals: Sequence[float]) -> int:
    """The index of the median of the rounds' total goodputs; of an even count, the lower of the
    middle two (rounds of equal totals are ordered earliest first)."""
    if not totals:
        raise ValueError("median_round: no rounds")
    return sorted(range(len(totals)), key=lambda i: (totals[i], i))[(len(totals) - 1) // 2]


def after_shift_settings(settings: Settings, adapt_s: float | None = None) -> Settings:
    """How both after-shift rows are measured: ``adapt_s`` (default 6 of ``settings``'
    windows) of the new mix first (the controller's time to adapt; a warm-up for the static
    plan), then ``settings``' windows."""
    w = settings.window_s
    adapt = adapt_s if adapt_s is not None else 6 * w
    return Settings(warmup_s=adapt, window_s=w, stable_windows=settings.stable_windows,
                    max_s=adapt + 2 * settings.stable_windows * w)


def measure_shift(cfg: Config, new_mix: Config, choices: Mapping[str, Choice], after: Settings,
                  costs: Mapping[str, CostModel] | None, before_s: float | None = None) -> Adapted:
    """The controller across the shift as the demo measures it: the plan ``choices`` serves
    ``cfg``'s load with a :class:`Controller` beside it (windows of half ``after``'s) for
    ``before_s`` (default 4 windows), then ``new_mix``'s, measured with ``after`` (see
    :func:`after_shift_settings`); see :func:`measure_adaptive`."""
    w = after.window_s
    return measure_adaptive(apply(cfg, choices), apply(new_mix, choices),
                            before_s=before_s if before_s is not None else 4 * w, settings=after,
                            control_window_s=max(0.1, w / 2), costs=costs)


def measure_adaptive(before: Config, after: Config, *, before_s: float, settings: Settings,
                     control_window_s: float, costs: Mapping[str, CostModel] | None = None) -> Adapted:
    """Serves ``before`` (a plan and its load) with a controller beside it for ``before_s``
    seconds, then shifts to ``after``'s load (same models and specs) and measures it with
    ``settings`` while the controller goes on. Each model's queue is made ``MAX_QUEUE`` deep
    (or its plan's bound, if deeper) and starts at the plan's bound: room for the controller
    to raise a bound the plan sized for the old mix. ``costs``: the models' cost models (the
    tuner's), which the controller asks before a batching move."""
    deep = replace(before, models={n: replace(m, spec=replace(m.spec, max_queue=max(m.spec.max_queue, MAX_QUEUE)))
                                   for n, m in before.models.items()})
    rt = deep.runtime()
    try:
        rt.apply(before)  # before start: the plan's bounds, nothing else changes
        rt.start()
    except BaseException:
        rt.close(drain=False)
        raise
    moves: list[Move] = []
    try:
        slos = {n: m.slo["latency_ms"] for n, m in before.models.items() if m.slo}
        # The demo's torch models take a stacked batch: the controller may switch batching on.
        # The plan's priority classes, if any, are the tuner's: the controller may move them.
        ctl = Controller(rt, slos, window_s=control_window_s, dwell_s=4 * control_window_s, log=moves.append,
                         batchable=True, costs=costs, classes=True)
        with ctl:
            half = max(before_s / 2, 0.05)
            ld.run(rt, before.model_loads(), warmup_s=half, window_s=half, stable_windows=1, tolerance=1.0,
                   max_s=before_s, seed=0)
            shift_at = ctl.elapsed_s()
            before_held = {n: count for n, (_, count, _) in ctl.held.items()}
            report = settings.run(rt, after.model_loads(), seed=1)
    finally:
        rt.close(drain=False)
    held = {n: (count - before_held.get(n, 0), why) for n, (at_s, count, why) in ctl.held.items()
            if at_s >= shift_at}
    return Adapted(_measured(report, after.demand()), moves, shift_at, ctl.longest_miss(shift_at), held)


@dataclass
class DemoResult:
    config: Config
    results: dict[str, dict[str, Measured]]
    tuned_plan: Config
    per_request_ms: dict[str, float]
    elapsed_s: float
    demands: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """Per mode whose load differs from ``config``'s (the shifted mix): what each model was offered."""
    adapted: Adapted | None = None
    rounds: dict[str, list[float]] = field(default_factory=dict)
    """Per after-shift mode measured in several rounds: each round's total goodput, in order (the
    mode's row in ``results`` is the round with the median)."""
    adapted_rounds: list[Adapted] = field(default_factory=list)
    """Every round's controller run (``adapted`` is the median round's): the table gives the
    latest last move and the longest miss over all of them."""

    def goodput(self, mode: str) -> float:
        return sum(m.goodput for m in self.results[mode].values())

    def table(self) -> str:
        # p99 of the completed requests; "met" also counts the expired ones as misses (an
        # admitted request that never ran), as the tuner does.
        head = ["mode", "model", "demand/s", "req/s", "good/s", "p99 ms", "expired", "SLO", "met"]
        rows = []
        for mode, res in self.results.items():
            demand = self.demands.get(mode) or self.config.demand()
            for n, m in res.items():
                slo = self.config.models[n].slo or {}
                rows.append([mode, n, f"{demand.get(n) or 0:.0f}", f"{m.throughput:.0f}", f"{m.goodput:.0f}",
                             "-" if m.p99_ms is None else f"{m.p99_ms:.1f}", str(m.expired),
                             f"p{slo.get('percentile', 99):g}<={slo.get('latency_ms', 0):g}ms",
                             "yes" if m.slo_met else "NO"])
            rows.append([mode, "TOTAL", f"{sum(v or 0 for v in demand.values()):.0f}",
                         f"{sum(m.throughput for m in res.values()):.0f}", f"{self.goodput(mode):.0f}", "",
                         str(sum(m.expired for m in res.values())), "",
                         "all" if all(m.slo_met for m in res.values()) else "no"])
        lines = _table.text(head, rows, left=2)
        base = self.goodput("unmanaged"), self.goodput("equal split")
        tuned = self.goodput("tuned")
        ratios = [f"{tuned / b:.2f}x {name}" if b > 0 else f"inf x {name}"
                  for b, name in zip(base, ("unmanaged", "equal split"))]
        lines.append(f"tuned goodput: {', '.join(ratios)}")
        if "shift: static" in self.results and "shift: controller" in self.results:
            static, ctl = self.goodput("shift: static"), self.goodput("shift: controller")
            line = f"after the shift: controller {ctl / static:.2f}x static" if static > 0 else \
                "after the shift: static served nothing within SLO"
            if "shift: retuned" in self.results and self.goodput("shift: retuned") > 0:
                line += f", {ctl / self.goodput('shift: retuned'):.0%} of a plan retuned for the new mix"
            runs = self.adapted_rounds or ([self.adapted] if self.adapted is not None else [])
            if runs:
                over = f" (the latest over {len(runs)} rounds)" if len(runs) > 1 else ""
                took_all = [a.adapted_s for a in runs if a.adapted_s is not None]
                line += (f"; last move {max(took_all):.1f} s after the shift{over}" if took_all
                         else "; no move after the shift")
                misses = [a.longest_miss for a in runs if a.longest_miss[1] is not None]
                if misses:
                    miss_s, who = max(misses, key=lambda m: m[0])
                    line += f"; longest SLO miss after it {miss_s:.1f} s ({who})" + over.replace("latest", "longest")
                else:
                    line += "; no SLO miss in any window after it"
            lines.append(line)
            repeated = {m: v for m, v in self.rounds.items() if len(v) > 1}
            if repeated:
                lines.append("  each after-shift row is the median of its rounds (goodput, in order): " + "; ".join(
                    f"{m.removeprefix('shift: ')} " + "/".join(f"{g:.0f}" for g in v) for m, v in repeated.items()))
            # What share of the new demand each after-shift mode served within SLO: how much any
            # move could still win (a static plan that already serves 90% leaves ~1.1x at most).
            shares = []
            for mode in ("shift: static", "shift: controller", "shift: retuned"):
                new_demand = sum(v or 0 for v in (self.demands.get(mode) or {}).values())
                if mode in self.results and new_demand > 0:
                    shares.append(f"{mode.removeprefix('shift: ')} {self.goodput(mode) / new_demand:.0%}")
            if shares:
                lines.append(f"  of the new demand served within SLO: {', '.join(shares)}")
        return "\n".join(lines)


def run_demo(*, load: float = 1.0, budget_s: float = 60.0, out_dir: str | Path = "apportion-demo",
             settings: Settings | None = None, stream: TextIO | None = None,
             progress: bool | TextIO = True, switch_interval_s: float = SWITCH_INTERVAL_S, shift: bool = True,
             adapt_s: float | None = None, before_s: float | None = None, retune: bool = False,
             shift_shares: dict[str, float] | None = None, rounds: int | None = None) -> DemoResult:
    """Calibrates, tunes, measures the three modes, then (``shift``) the static tuned plan
    against the controller after the mix shifts to ``shift_shares`` (default
    :data:`SHIFTED_SHARES`; see :func:`parse_shares`) (and, with ``retune``, a plan tuned for the new
    mix), prints the table, writes the plot, the tuned plan and the tuner's report into
    ``out_dir``. ``adapt_s`` (default 6 windows) is the time after the shift before measuring,
    ``before_s`` (default 4 windows) how long the controller serves the old mix first.
    ``rounds`` (default 3 with ``retune``, else 1): the after-shift rows are measured that many
    times, in turn, and each shows its round with the median goodput."""
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise ValueError(f"run_demo: rounds must be an integer >= 1, got {rounds!r}")
    out = stream or sys.stdout
    t0 = time.monotonic()
    # The load generator's driver threads run Python between submissions; a worker that needs
    # the GIL to call its model would otherwise wait up to the 5 ms switch interval for them
    # (see README, "Threads and the GIL"). Every mode runs with the same setting.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval_s)
    try:
        return _run_demo(load, budget_s, Path(out_dir), settings, out, progress, t0, shift, adapt_s, before_s,
                         retune, shift_shares or SHIFTED_SHARES, rounds if rounds is not None else 3 if retune else 1)
    finally:
        sys.setswitchinterval(previous)


def _run_demo(load: float, budget_s: float, out_path: Path, settings: Settings | None, out: TextIO,
              progress: bool | TextIO, t0: float, shift: bool = True, adapt_s: float | None = None,
              before_s: float | None = None, retune: bool = False,
              shift_shares: dict[str, float] = SHIFTED_SHARES, rounds: int = 1) -> DemoResult:
    settings = settings or MODE_SETTINGS
    ms = single_thread_ms()
    cfg = demo_config(load, per_request_ms=ms)
    probe = cfg.runtime(build=False)
    try:
        n_cores = len(probe.topology.usable_cores)
    finally:
        probe.close(drain=False)
    demand = cfg.demand()
    print(f"apportion demo: {n_cores} cores; one request on one thread takes "
          + ", ".join(f"{n} {v:.2f} ms" for n, v in ms.items()), file=out)
    assert cfg.rate is not None
    print(f"workload: Poisson, {cfg.rate:g} req/s in total ({offered(load, cfg.rate, ms)}): "
          + ", ".join(f"{n} {demand[n]:.0f}/s p99<={SLO_MS[n]:g}ms" for n in cfg.models), file=out)
    result = tune(cfg, budget_s=budget_s, progress=progress, out_dir=out_path / "tune")
    modes = {**baselines(cfg, n_cores), "tuned": result.winner.choices}
    results: dict[str, dict[str, Measured]] = {}
    for mode, choices in modes.items():
        if progress:
            s = sys.stderr if progress is True else progress
            s.write(f"measuring {mode}...\n")
            s.flush()
        results[mode] = measure_config(apply(cfg, choices), settings)
    demands: dict[str, dict[str, float | None]] = {}
    adapted = None
    rounds_goodput: dict[str, list[float]] = {}  # (after the shift only)
    controller_runs: list[Adapted] = []
    if shift:
        after_settings = after_shift_settings(settings, adapt_s)
        new_mix = shifted(cfg, shift_shares)
        tuned = modes["tuned"]

        def say(what: str) -> None:
            if progress:
                s = sys.stderr if progress is True else progress
                s.write(what + "\n")
                s.flush()

        # One measurement of a layout moves by a quarter or more between repetitions on a small
        # VM (bench/RESULTS.md): with rounds > 1 the rows are measured in turn, each round all
        # of them, and each shows its median round.
        runs: dict[str, list[dict[str, Measured]]] = {"shift: static": [], "shift: controller": []}
        again = None
        if retune:  # before the rounds: each round measures every row under the same conditions
            say("tuning for the new mix...")
            again = tune(new_mix, budget_s=budget_s, progress=progress, out_dir=out_path / "tune-shifted")
            runs["shift: retuned"] = []
        for i in range(rounds):
            of = f" (round {i + 1} of {rounds})" if rounds > 1 else ""
            say(f"measuring the tuned plan after the mix shifts (static){of}...")
            runs["shift: static"].append(measure_config(apply(new_mix, tuned), after_settings))
            say(f"measuring the controller across the shift{of}...")
            controller_runs.append(measure_shift(cfg, new_mix, tuned, after_settings, result.costs, before_s))
            runs["shift: controller"].append(controller_runs[-1].results)
            if again is not None:
                say(f"measuring the retuned plan{of}...")
                runs["shift: retuned"].append(measure_config(apply(new_mix, again.winner.choices), after_settings))
        for mode, got in runs.items():
            totals = [sum(m.goodput for m in r.values()) for r in got]
            k = median_round(totals)
            results[mode] = got[k]
            demands[mode] = new_mix.demand()
            rounds_goodput[mode] = totals
            if mode == "shift: controller":
                adapted = controller_runs[k]
    demo = DemoResult(cfg, results, result.config, ms, time.monotonic() - t0, demands, adapted,
                      rounds_goodput if rounds > 1 else {}, controller_runs if rounds > 1 else [])
    print(demo.table(), file=out)
    if adapted is not None:
        print(f"  mix shift: " + ", ".join(f"{n} {SHARES[n]:.0%} -> {shift_shares[n]:.0%}" for n in SHARES)
              + f"; controller moves ({len(adapted.moves)}"
              + (f", in the median round of {len(controller_runs)}" if len(controller_runs) > 1 else "") + "):",
              file=out)
        for line in adapted.describe():
            print(f"    {line}", file=out)
    for mode, choices in modes.items():
        print(f"  {mode}: " + "; ".join(f"{n}: {c.describe()}" for n, c in choices.items()), file=out)
    print(f"tuner: {result.summary()}", file=out)
    from .tune.plot import plot_bars

    plot = plot_bars(out_path / "demo.png", results, cfg, title=f"apportion demo: {cfg.rate:g} req/s on {n_cores} cores")
    print(f"plot: {plot}; tuned plan: {out_path / 'tune' / 'plan.toml'}; tuner report: "
          f"{out_path / 'tune' / 'report.md'} ({demo.elapsed_s:.0f} s)", file=out)
    return demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", type=above_zero(float), default=1.0,
                   help="offered load as a multiple of the cores' one-thread capacity (default 1.0)")
    p.add_argument("--budget-s", type=seconds, default=60.0, help="tuner time budget in seconds (default 60)")
    p.add_argument("--window-s", type=at_least(ld.MIN_WINDOW_S), default=1.0,
                   help=f"measurement window for the three modes, seconds ({ld.MIN_WINDOW_S:g} at least; default 1; "
                   "3 windows each)")
    p.add_argument("--out", default="apportion-demo", metavar="DIR",
                   help="where the plot, the tuned plan and the tuner's report go (default ./apportion-demo)")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--no-shift", action="store_true",
                       help="skip the fourth phase (the mix shifts: static tuned plan vs the controller)")
    which.add_argument("--shift", type=parse_shares, default=None, metavar="MODEL=SHARE,...",
                       help="the mix after the shift, each model's share of the same total rate, e.g. "
                       "mlp=0.85,conv=0.1,encoder=0.05 (default: "
                       + ",".join(f"{n}={v:g}" for n, v in SHIFTED_SHARES.items()) + ")")
    p.add_argument("--adapt-s", type=seconds, default=None, metavar="S",
                   help="after the shift, seconds of the new mix before measuring (default 6 windows)")
    p.add_argument("--retune", action="store_true",
                   help="also tune from scratch for the new mix and measure that plan (one more tuner budget)")
    p.add_argument("--rounds", type=in_range(1, 100), default=None, metavar="N",
                   help="measure the after-shift rows N times in turn, each row showing its median round "
                   "(default 3 with --retune, else 1)")
