"""What a tune run found (:class:`TuneResult`) and its Markdown report; writing the plan,
the report and the plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _table
from ..config import Config, ConfigError
from .allocation import Allocation
from .cost import CostModel, Sample
from .noise import Confidence, Noise, combine_repeats, profile_spread
from .search import GUARDED, NOISE_BOUNDED, NOISE_MARGIN, Candidate, lowered_bounds

OUTPUTS = ("plan.toml", "report.md", "candidates.png")
"""The files :meth:`TuneResult.write` writes into its directory."""


def writable_outputs(out_dir: str | Path) -> None:
    """Raises ConfigError (path ``out_dir``, key the file) when :meth:`TuneResult.write` could
    not write there: an output path that exists and is not a regular file, or no matplotlib
    for the plot. The tuner checks before it spends its budget."""
    for name in OUTPUTS:
        p = Path(out_dir) / name
        if p.exists() and not p.is_file():
            raise ConfigError(str(out_dir), name, "exists and is not a regular file (a directory?); the tuner "
                              "writes its results there: give another --out / out_dir or remove it")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(str(out_dir), "candidates.png", "the plot needs matplotlib: pip install "
                          "'apportion[tune]'") from None

__all__ = ["TuneResult"]


@dataclass
class TuneResult:
    """What :func:`tune` found: the winning plan (``config``), every candidate tried, the
    profiles, the fitted cost models and the allocation they gave."""

    config: Config
    winner: Candidate
    candidates: list[Candidate]
    profiles: dict[str, list[Sample]]
    costs: dict[str, CostModel]
    allocation: dict[str, Allocation]
    objective: str
    elapsed_s: float
    budget_s: float
    total_cores: int
    margin: float = 0.0
    """The SLO margin candidates were validated with (latency_ms x (1 - margin))."""
    settings: Any = None
    """The validation runs' lengths (a tune.measure.Settings), when runs were measured."""
    needs: list[Any] = field(default_factory=list)
    """What the allocator knew of each model (tune.cost.Need): cost model, demand, SLO."""
    noise: Noise | None = None
    """What the run saw of the machine: other processes' CPU use, how far repeated profiles
    moved, validation runs that never settled."""
    confirmed: list[str] = field(default_factory=list)
    """Candidates run again at the confirmation length, in order (their ``measured`` is that
    run); the winner holds its SLOs there when it is among them."""
    confirm_settings: Any = None
    """The confirmation runs' lengths (a tune.measure.Settings)."""

    @property
    def windows(self) -> int:
        """Validation windows each SLO had to hold in (each one and pooled)."""
        return self.settings.stable_windows if self.settings is not None else 0

    def confidence(self) -> Confidence:
        """How far the plan can be trusted: ``high`` (quiet machine, repeats agreed, winner's
        validation stable), ``medium`` or ``low`` (see :meth:`Noise.confidence`)."""
        noise = self.noise or Noise(self.total_cores)
        return noise.confidence(self.winner.stable())

    def refused(self) -> dict[str, float]:
        """Per model, the share of its offered requests the winner refused at once (admission)."""
        return {n: m.refused_share for n, m in (self.winner.measured or {}).items()}

    def summary(self, shortfall: bool = True) -> str:
        """One paragraph: margin, windows, confidence, what admission refused, the noise and
        (``shortfall``) the missing capacity."""
        w = self.windows
        text = (f"Validated with a {self.margin:.0%} SLO margin"
                + (f" over {w} stable windows (each, and pooled)" if w else "")
                + f"; confidence {self.confidence()}.")
        text += " " + self.confirmation()
        refused = {n: v for n, v in self.refused().items() if v > 0}
        if refused:
            text += " Refused at once (admission): " + ", ".join(f"{n} {v:.0%}" for n, v in refused.items()) + "."
        noise = self.noise.describe() if self.noise is not None else ""
        short = self.shortfall() if shortfall else ""
        return " ".join(t for t in (text, noise, short) if t)

    def confirmation(self) -> str:
        """One sentence on the confirmation runs (see :func:`apportion.tune.tune`)."""
        cs = self.confirm_settings
        length = f" ({cs.stable_windows} windows of {cs.window_s:g} s)" if cs is not None else ""
        if not self.confirmed:
            if not self.winner.slo_ok():
                return "Not confirmed in a longer run: no candidate met every SLO in validation."
            return "Not confirmed in a longer run: no budget was left for it."
        by_name = {c.name: c for c in self.candidates}
        missed = [n for n in self.confirmed if n != self.winner.name and n in by_name and not by_name[n].slo_ok()]
        head = (f"Missed in a longer run{length}: " + ", ".join(f"'{n}'" for n in missed) + ". ") if missed else ""
        if self.winner.name.endswith(NOISE_BOUNDED):
            # Taken whatever its run showed (see tune, step 7): say which, and what came down.
            base = by_name.get(self.winner.name[: -len(NOISE_BOUNDED)])
            came = lowered_bounds(base.choices if base is not None else {}, self.winner.choices)
            return head + ("Beside the other processes' load, the winner's queues were bounded at what each "
                           f"model drained in its last run in time for its SLO less a further {NOISE_MARGIN:.0%}"
                           + (f" ({came})" if came else "") + "; so bounded, it "
                           + ("met every SLO in a longer run" if self.winner.slo_ok() else
                              "still missed an SLO in a longer run") + f"{length}.")
        if self.winner.name in self.confirmed and self.winner.slo_ok():
            text = head + f"Confirmed in a longer run{length}."
            if self.winner.name.endswith(GUARDED):
                text += " Its queues are bounded at what each model drained in time in that run."
            return text
        return head + "The winner was not confirmed in a longer run."

    def missing_capacity(self) -> dict[str, float]:
        """For each model with an SLO and a rate that the allocation does not serve in full: how
        many more cores it would need to serve its whole demand within its SLO, by its fitted
        cost model (inf: no shape of it meets the SLO at all). Empty when the machine suffices."""
        out: dict[str, float] = {}
        measured = self.winner.measured or {}
        for need in self.needs:
            a = self.allocation.get(need.name)
            if a is None or need.slo_ms is None or need.demand is None:
                # No SLO to serve it within, or a closed loop (it takes whatever it is given:
                # no core count serves "all" of it).
                continue
            m = measured.get(need.name)
            if a.fraction >= 0.99:
                # The cost model says it fits; the validation may disagree (a busy machine):
                # then scale the model's share by what it served against what it wanted.
                if m is not None and m.wanted and 0 < m.goodput < 0.95 * m.wanted and a.cores > 0:
                    out[need.name] = math.ceil(2 * a.cores * (m.wanted / m.goodput - 1.0)) / 2
                continue
            cores, limit = max(a.cores, 0.5), max(4.0 * self.total_cores, a.cores + 1.0)
            served, wanted = 0.0, 0.0
            while cores <= limit:
                served, shape = need.served(cores)
                wanted = need.wanted(shape) if shape is not None else (need.demand or 0.0)
                if wanted > 0 and served >= 0.99 * wanted:
                    break
                cores += 0.5
            else:
                # Not within 4x the machine: what it serves grows with its cores, so scale the
                # last figure up; inf only when no shape of it serves anything within the SLO.
                cores = math.ceil(2 * limit * wanted / served) / 2 if served > 0 and wanted > 0 else math.inf
            out[need.name] = cores - a.cores
        return out

    def shortfall(self) -> str:
        """The missing capacity in words ("" when there is none)."""
        parts = [f"no shape of '{n}' meets its SLO" if math.isinf(c) else f"~{c:.1f} more cores for '{n}'"
                 for n, c in self.missing_capacity().items()]
        return ("To serve every model's demand within its SLO: " + "; ".join(parts) + ".") if parts else ""

    def report(self) -> str:
        """Markdown: the workload, the profiles and fits, every candidate and why the winner won."""
        obj = "total goodput (req/s within SLO)" if self.objective == "goodput" else "minimum fraction of demand served"
        lines = ["# apportion tune report", "",
                 f"Objective: maximise {obj}. {self.total_cores} cores. "
                 f"Search took {self.elapsed_s:.1f} s of a {self.budget_s:.0f} s budget; "
                 f"{len(self.candidates)} candidates validated under the mixed load"
                 + (f", each model's SLO tightened by a {self.margin:.0%} margin" if self.margin else "")
                 + (f", over {self.settings.stable_windows} stable windows of {self.settings.window_s:g} s"
                    if self.settings is not None else "") + ". A candidate holds a model's SLO when the "
                 "SLO's percentile of the requests it admitted (expired and failed ones count as misses) meets it in "
                 "every window and over all of them; requests refused at once (queue bound) are not admitted.",
                 "", f"**Margin** {self.margin:.0%} · **windows** {self.windows} · "
                 f"**confidence** {self.confidence()}", ""]
        noise = self.noise.describe() if self.noise is not None else ""
        if self.noise is not None:
            lines += ["## Noise", "",
                      (noise or "Quiet machine: no other process took a noticeable share of the CPUs, and "
                       "repeated profiles agreed.")
                      + (f" Other processes' CPU use while measuring: {self.noise.foreign_cpus:.2f} of "
                         f"{self.noise.cpus} CPUs on average"
                         + (f", at most {self.noise.foreign_peak:.2f} over one run"
                            if self.noise.foreign_peak is not None else "") + "."
                         if self.noise.foreign_cpus is not None else ""), ""]
        lines += ["## Workload", ""]
        demand = self.config.demand()
        rows: list[tuple[str, ...]] = []
        for n, m in self.config.models.items():
            d = demand.get(n)
            load = (f"{d:.0f} req/s" if d is not None else f"closed x{(m.load or {}).get('concurrency', '?')}")
            slo = f"p{m.slo.get('percentile', 99.0):g} <= {m.slo['latency_ms']:g} ms" if m.slo else "-"
            rows.append((n, load, slo))
        lines += _table.markdown(("model", "demand", "SLO"), rows)
        lines += ["", "## Profiles (each model alone) and fitted cost models", ""]
        rows = []
        for n, samples in self.profiles.items():
            spread = profile_spread(samples)
            counts: dict[tuple[int, int], int] = {}
            for x in samples:
                counts[(x.threads, x.batch)] = counts.get((x.threads, x.batch), 0) + 1
            for x in combine_repeats(samples):
                k = (x.threads, x.batch)
                rows.append((n, str(x.threads), str(x.batch), f"{x.call_ms:.2f}", f"{x.mean_batch:.1f}",
                             f"{x.throughput:.0f}", str(counts[k]), f"{spread[k]:.0%}" if k in spread else "-"))
        lines += _table.markdown(("model", "threads", "batch", "call ms (median)", "req/call", "req/s",
                                  "estimates", "spread"), rows)
        rows = []
        for n, c in self.costs.items():
            a = self.allocation.get(n)
            rows.append((n, f"{c.alpha_ms:.3f}", f"{c.beta_ms:.3f}", f"{c.serial:.2f}", str(c.batchable),
                         f"{a.cores if a else 0:.2f}", a.shape.describe() if a and a.shape else "-",
                         f"{a.served if a else 0:.0f}"))
        lines += [""] + _table.markdown(("model", "alpha ms", "beta ms/req", "serial fraction", "batchable",
                                         "allocated cores", "shape", "predicted req/s"), rows)
        names = list(self.config.models)
        ranked = sorted(self.candidates, key=lambda c: c.rank(self.objective), reverse=True)
        rows = []
        for i, cand in enumerate(self.candidates):
            cells = []
            for n in names:
                got = (cand.measured or {}).get(n)
                if got is None:
                    cells.append("-")
                else:
                    p = "-" if got.p99_ms is None else f"{got.p99_ms:.1f}"
                    ref = f", {got.refused_share:.0%} refused" if got.rejected else ""
                    verdict = ("" if got.admitted_met() else " missed with the margin, within the SLO over the run" if got.within_slo
                               else " MISSED")
                    cells.append(f"{got.goodput:.0f} ({p}{ref}{verdict})")
            mark = " **winner**" if cand is self.winner else ""
            rows.append((str(i + 1), f"{cand.name}{mark}", cand.describe(), *cells,
                         "yes" if cand.slo_ok() else "no", f"{cand.score(self.objective):.3g}"))
        lines += ["", "## Candidates", ""]
        lines += _table.markdown(("#", "candidate", "settings", *(f"{n} good/s (p99 ms)" for n in names),
                                  "all SLOs", "objective"), rows)
        lines += ["", "## Why the winner won", "", self.why(ranked), "", self.summary(shortfall=False), ""]
        return "\n".join(lines)

    def why(self, ranked: list[Candidate] | None = None) -> str:
        ranked = ranked or sorted(self.candidates, key=lambda c: c.rank(self.objective), reverse=True)
        w = self.winner
        if w.name.endswith(NOISE_BOUNDED):
            # Taken for the other processes' load, not by its rank (see tune, step 7).
            return (f"'{w.name}' ({w.why}) scored {w.score(self.objective):.3g} "
                    + ("with every model within its SLO" if w.slo_ok() else "and missed an SLO")
                    + f" in its run. It is '{w.name[: -len(NOISE_BOUNDED)]}', the search's winner, with the bounds "
                    "the other processes' load calls for, and was taken for that whatever its rank.")
        text = (f"'{w.name}' ({w.why}) scored {w.score(self.objective):.3g} "
                f"{'with every model within its SLO' if w.slo_ok() else 'but missed an SLO (no candidate met all)'}.")
        others = [c for c in ranked if c is not w]
        if others:
            r = others[0]
            if w.slo_ok() and not r.slo_ok():
                text += f" The runner-up '{r.name}' missed an SLO."
            else:
                s_w, s_r = w.score(self.objective), r.score(self.objective)
                rel = f" ({(s_w / s_r - 1) * 100:+.0f}%)" if s_r > 0 else ""
                text += f" The runner-up '{r.name}' scored {s_r:.3g}{rel}."
        short = self.shortfall()
        return f"{text} {short}" if short else text

    def plot(self, path: str | Path) -> Path:
        """Bar charts of throughput and p99 per model for each candidate (matplotlib, Agg)."""
        from .plot import plot_bars

        return plot_bars(path, {c.name: c.measured or {} for c in self.candidates}, self.config,
                         title="tune candidates")

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Writes ``plan.toml`` (loadable by Config / ``apportion run``), ``report.md`` and
        ``candidates.png`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"plan": self.config.save(out / "plan.toml", header=(
            f"apportion tune: winner '{self.winner.name}' ({self.objective}), "
            f"{self.total_cores} cores.\nLoad with apportion.Config.load(path) or `apportion run`."))}
        paths["report"] = out / "report.md"
        paths["report"].write_text(self.report())
        paths["plot"] = self.plot(out / "candidates.png")
        return paths
