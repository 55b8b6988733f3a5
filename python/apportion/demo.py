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

Three ways to serve the same models under the same load, queue bound and deadlines:

- **unmanaged**: what frameworks do by default: every model floats on every core with torch's
  default thread count (one intra-op thread per CPU), one instance, no batching;
- **equal split**: the cores divided equally (whole exclusive cores each when there are at
  least as many cores as models, else one thread per model on a shared pool);
- **tuned**: the plan :func:`apportion.tune` finds within the time budget.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import _table
from .config import Config, ModelConfig
from .spec import ModelSpec
from .tune import Choice, Measured, Settings, apply, measure_config, tune

__all__ = ["build_conv", "build_encoder", "build_mlp", "conv_input", "demo_config", "encoder_input",
           "mlp_input", "run_demo"]

SHARES = {"mlp": 0.35, "conv": 0.20, "encoder": 0.45}
SLO_MS = {"mlp": 50.0, "conv": 75.0, "encoder": 40.0}
MAX_QUEUE = 64
MAX_TOTAL_RATE = 3000.0


def _torch() -> Any:
    import torch

    return torch


def _leading(inner: Any, tail: int) -> Any:
    """Wraps a module so it accepts any number of leading dims (flattened into one batch dim)."""
    torch = _torch()

    class Leading(torch.nn.Module):
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


def single_thread_ms(repeat_s: float = 0.3) -> dict[str, float]:
    """Each model's time per request on one thread, unbatched (measured in a fresh thread so
    this process's torch settings are untouched)."""
    out: dict[str, float] = {}

    def work() -> None:
        torch = _torch()
        torch.get_num_threads()
        torch.set_num_threads(1)
        for name, (build, make) in _MODELS.items():
            m, x = build().eval(), make()
            with torch.inference_mode():
                for _ in range(3):
                    m(x)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < repeat_s:
                    m(x)
                    n += 1
            out[name] = (time.perf_counter() - t0) / n * 1000.0

    t = threading.Thread(target=work, name="apportion-demo-calibrate")
    t.start()
    t.join()
    return out


def demo_config(load: float = 1.0, *, per_request_ms: dict[str, float] | None = None,
                cpus: int | None = None) -> Config:
    """The demo's models and workload as a Config (``load`` x the machine's one-thread
    capacity, see the module documentation)."""
    ms = per_request_ms or single_thread_ms()
    n_cpus = cpus or len(os.sched_getaffinity(0))
    capacity = n_cpus * 1000.0 / sum(SHARES[n] * ms[n] for n in SHARES)
    rate = round(min(load * capacity, MAX_TOTAL_RATE), 1)
    models = {}
    for name, (build, make) in _MODELS.items():
        models[name] = ModelConfig(
            ModelSpec(name, factory=f"apportion.demo:{build.__name__}", max_queue=MAX_QUEUE,
                      timeout_ms=SLO_MS[name]),
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


@dataclass
class DemoResult:
    config: Config
    results: dict[str, dict[str, Measured]]
    tuned_plan: Config
    per_request_ms: dict[str, float]
    elapsed_s: float

    def goodput(self, mode: str) -> float:
        return sum(m.goodput for m in self.results[mode].values())

    def table(self) -> str:
        demand = self.config.demand()
        head = ["mode", "model", "demand/s", "req/s", "good/s", "p99 ms", "SLO", "met"]
        rows = []
        for mode, res in self.results.items():
            for n, m in res.items():
                slo = self.config.models[n].slo or {}
                rows.append([mode, n, f"{demand.get(n) or 0:.0f}", f"{m.throughput:.0f}", f"{m.goodput:.0f}",
                             "-" if m.p99_ms is None else f"{m.p99_ms:.1f}",
                             f"p{slo.get('percentile', 99):g}<={slo.get('latency_ms', 0):g}ms",
                             "yes" if m.slo_met else "NO"])
            rows.append([mode, "TOTAL", f"{sum(v or 0 for v in demand.values()):.0f}",
                         f"{sum(m.throughput for m in res.values()):.0f}", f"{self.goodput(mode):.0f}", "", "",
                         "all" if all(m.slo_met for m in res.values()) else "no"])
        lines = _table.text(head, rows, left=2)
        base = self.goodput("unmanaged"), self.goodput("equal split")
        tuned = self.goodput("tuned")
        ratios = [f"{tuned / b:.2f}x {name}" if b > 0 else f"inf x {name}"
                  for b, name in zip(base, ("unmanaged", "equal split"))]
        lines.append(f"tuned goodput: {', '.join(ratios)}")
        return "\n".join(lines)


def run_demo(*, load: float = 1.0, budget_s: float = 60.0, out_dir: str | Path = "apportion-demo",
             settings: Settings | None = None, stream: TextIO | None = None,
             progress: bool | TextIO = True, switch_interval_s: float = 0.0005) -> DemoResult:
    """Calibrates, tunes, measures the three modes, prints the table, writes the plot, the
    tuned plan and the tuner's report into ``out_dir``."""
    out = stream or sys.stdout
    t0 = time.monotonic()
    # The load generator's driver threads run Python between submissions; a worker that needs
    # the GIL to call its model would otherwise wait up to the 5 ms switch interval for them
    # (see README, "Threads and the GIL"). Every mode runs with the same setting.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval_s)
    try:
        return _run_demo(load, budget_s, Path(out_dir), settings, out, progress, t0)
    finally:
        sys.setswitchinterval(previous)


def _run_demo(load: float, budget_s: float, out_path: Path, settings: Settings | None, out: TextIO,
              progress: bool | TextIO, t0: float) -> DemoResult:
    settings = settings or Settings(warmup_s=1.0, window_s=1.0, stable_windows=3, max_s=6.0)
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
    print(f"workload: Poisson, {cfg.rate:g} req/s in total ({load:g}x the one-thread capacity): "
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
    demo = DemoResult(cfg, results, result.config, ms, time.monotonic() - t0)
    print(demo.table(), file=out)
    for mode, choices in modes.items():
        print(f"  {mode}: " + "; ".join(f"{n}: {c.describe()}" for n, c in choices.items()), file=out)
    print(f"tuner: {result.summary()}", file=out)
    from .tune.plot import plot_bars

    plot = plot_bars(out_path / "demo.png", results, cfg, title=f"apportion demo: {cfg.rate:g} req/s on {n_cores} cores")
    print(f"plot: {plot}; tuned plan: {out_path / 'tune' / 'plan.toml'}; tuner report: "
          f"{out_path / 'tune' / 'report.md'} ({demo.elapsed_s:.0f} s)", file=out)
    return demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", type=float, default=1.0,
                   help="offered load as a multiple of the cores' one-thread capacity (default 1.0)")
    p.add_argument("--budget-s", type=float, default=60.0, help="tuner time budget in seconds (default 60)")
    p.add_argument("--window-s", type=float, default=1.0,
                   help="measurement window for the three modes, seconds (default 1; 3 windows each)")
    p.add_argument("--out", default="apportion-demo", metavar="DIR",
                   help="where the plot, the tuned plan and the tuner's report go (default ./apportion-demo)")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
