"""The ``apportion`` command line: ``apportion <command> [options]`` (also ``python -m apportion``).

Commands:

- ``topology [--root PATH] [--json]``: the machine as apportion sees it.
- ``plan CONFIG [--root PATH] [--json]``: which CPUs, threads and memory each model of a
  config file would get.
- ``run CONFIG [--duration S] [--json]``: serve a config (under its load for S seconds).
  Ctrl-C or SIGTERM stops it: without ``--duration`` that is how it ends (exit 0); with it, the
  run ends early, prints what it has (the runtime's stats, no load report) and exits 128 plus
  the signal's number.
- ``bench CONFIG | --model SPEC --factory NAME=MOD:FN [--json]``: the load generator.
- ``tune CONFIG --budget-s N --out DIR``: search a plan; writes plan.toml, report.md, a plot.
- ``demo``: three torch models, unmanaged vs equal split vs tuned.

A config file (see :mod:`apportion.config`) is TOML with one ``[models.<name>]`` table per
model holding quota fields (and factory, serving settings, SLO and load)::

    [models.ranker]
    cores = 2                 # physical cores, or a CPU list such as "0-3,8"
    isolation = "exclusive"   # or "shared"
    threads = 2

Exit status: 0 on success; 1 when valid input does not fit the machine (a PlacementError), the
machine cannot be read, a model fails to start or a load's inputs callable raises (the message
names the model's key); 2 for usage and config errors (the message names the file, the key and
what is allowed).

Each command is a :class:`Command` in ``COMMANDS``: a name, a one-line help, a function that
adds its arguments and one that runs it, so further commands (run, bench, tune, demo) are one
more entry.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import load as ld
from ._private.argtypes import MAX_SECONDS, above_zero, between, in_range, seconds
from ._private.loops import LOOPS
from .errors import ApportionError, QuotaError
from .config import QUOTA_KEYS, Config, ConfigError, DoesNotFit, StartFailed, model_key
from .placement import Plan, Quota
from .topology import Topology, topology

__all__ = ["COMMANDS", "Command", "ConfigError", "DoesNotFit", "load_quotas", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class RequestsFailed(ApportionError):
    """``apportion bench`` sent requests that failed (the model raised, a connection broke, a
    client timeout): the report is printed, and the command exits 1 naming each such model, its
    count and its errors by kind, so a script does not take a broken run for a measurement.
    Rejections and expiries alone are outcomes of the load, not failures."""


def _failures(report: ld.LoadReport) -> None:
    """Raises RequestsFailed when any model of ``report`` had failed requests."""
    lines = []
    for name, m in report.items():
        t = m.totals  # the whole run, warm-up included: a failure anywhere spoils the measurement
        if t.failed:
            kinds = ", ".join(f"{k} x{n}" for k, n in sorted(t.errors.items(), key=lambda kv: -kv[1]))
            lines.append(f"model {name!r}: {t.failed} of {t.submitted} requests failed (not completed, by kind: "
                         f"{kinds})")
    if lines:
        raise RequestsFailed("; ".join(lines))


class InputsFailed(ConfigError):
    """A load's inputs callable raised while the load ran (the message names the model's
    inputs key and the error; ``__cause__`` is the error itself). Exit status 1."""


@contextlib.contextmanager
def _inputs_errors(key_of: Callable[[str], tuple[str, str]]) -> Iterator[None]:
    """An exception a load's inputs raised (load.run re-raises it as it was, naming the model)
    as an InputsFailed at the (file, key) ``key_of(model)`` gives; anything else as it is."""
    try:
        yield
    except ApportionError:
        raise
    except Exception as e:
        model = ld.failed_model(e)
        if model is None:
            raise
        path, key = key_of(model)
        raise InputsFailed(path, key, f"model {model!r}: its inputs raised {type(e).__name__}: {e}") from e


class _Stopped(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is (as Ctrl-C raises KeyboardInterrupt)."""


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """While inside: SIGTERM stops the main thread as Ctrl-C does (a service manager's stop
    ends `apportion run` as cleanly as a user's Ctrl-C). Outside the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def load_quotas(path: str | Path) -> list[Quota]:
    """Reads the ``[models.<name>]`` tables of a TOML file into validated Quotas.

    Raises ConfigError for an unreadable file, invalid TOML, an unknown key or an invalid
    value; the message names the file and the key (``models.<name>.<field>``).
    """
    return Config.load(path).quotas()


# -- commands --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, TextIO], int]


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="/", metavar="PATH",
                   help="read the machine from the sysfs tree under PATH (default: this machine)")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _print(out: TextIO, obj: Topology | Plan, as_json: bool) -> None:
    if as_json:
        json.dump(obj.to_dict(), out, indent=2)
        out.write("\n")
    else:
        print(obj, file=out)


def _topology_args(p: argparse.ArgumentParser) -> None:
    _add_root(p)
    _add_json(p)


def _topology_run(args: argparse.Namespace, out: TextIO) -> int:
    _print(out, topology(args.root), args.json)
    return EXIT_OK


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="TOML file with one [models.<name>] table per model "
                   f"(keys: {', '.join(QUOTA_KEYS)})")
    _add_root(p)
    _add_json(p)


def _plan_run(args: argparse.Namespace, out: TextIO) -> int:
    # Plan through a runtime that is never started, so the printed plan is exactly what
    # rt.plan() gives for the same models (the runtime lets a shared model without a core
    # count float over the whole pool, which a bare ap.plan() would not).
    rt = Config.load(args.config).runtime(topology_root=args.root, build=False)
    try:
        result = rt.plan()
    finally:
        rt.close(drain=False)
    _print(out, result, args.json)
    return EXIT_OK


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", metavar="CONFIG", nargs=None if required else "?",
                   help="TOML config: [models.<name>] tables with factory, quota fields, max_queue, "
                   "timeout_ms, batching, slo and load (see apportion.config)")


def _window_args(p: argparse.ArgumentParser, window: float, max_s: float) -> None:
    p.add_argument("--warmup-s", type=seconds, default=window,
                   help=f"warm-up seconds (default {window:g})")
    p.add_argument("--window-s", type=between(ld.MIN_WINDOW_S, MAX_SECONDS), default=window,
                   help=f"measurement window seconds, {ld.MIN_WINDOW_S:g} at least (default {window:g})")
    p.add_argument("--max-s", type=seconds, default=None,
                   help=f"stop after this many seconds even if not stable, warm-up included; at least "
                   f"the warm-up and three windows (default {max_s:g}, or that least if it is more)")
    p.set_defaults(default_max_s=max_s)


def _max_s(args: argparse.Namespace) -> float:
    """--max-s, checked against the warm-up and three windows it must hold (its default grows
    to hold them; a value given is not changed silently)."""
    needed = args.warmup_s + 3 * args.window_s
    if args.max_s is None:
        return max(args.default_max_s, needed)
    if args.max_s < needed - 1e-9:
        raise ConfigError("<command line>", "--max-s", f"{args.max_s:g} s leaves no room for the warm-up "
                          f"and three windows ({args.warmup_s:g} + 3 x {args.window_s:g} = {needed:g} s); "
                          f"give at least {needed:g}")
    return args.max_s


def _run_args(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    p.add_argument("--duration", type=seconds, default=None, metavar="S",
                   help="serve for S seconds, putting each model's configured load on it, then print "
                   "the load report and stats (default: serve until Ctrl-C)")
    _add_adapt(p)
    _add_root(p)
    _add_json(p)


ADAPT_WINDOW_S = (0.05, 3600.0)  # the lower bound is controller.MIN_WINDOW_S
"""--adapt-window-s's range: a shorter window holds too few requests to read a p99 from (the
controller moved and undid models that met their objectives), and the controller spins."""


def _add_adapt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapt", action="store_true",
                   help="run the online controller beside the runtime: it moves instances, batching and "
                   "admission between the models that have an slo when one's objective is at risk or "
                   "capacity idles, and logs every move with its reason (see apportion.Controller)")
    p.add_argument("--adapt-window-s", type=between(*ADAPT_WINDOW_S), default=None, metavar="S",
                   help=f"the controller's window (default 1; {ADAPT_WINDOW_S[0]:g} to {ADAPT_WINDOW_S[1]:g})")
    p.add_argument("--adapt-batchable", action="append", default=[], metavar="NAME",
                   help="a model whose batching the controller may switch on (its calls take a list of "
                   "inputs; repeatable). Without it the controller changes the batch size only of models "
                   "whose config already batches")
    p.add_argument("--adapt-classes", action="store_true",
                   help="let the controller move a saturated model into a lower priority class of the "
                   "scheduled pool, with an instance more, where another instance in its own class would "
                   "starve the classes below (for classes a tuner chose: without it a class stays where "
                   "the config set it; see apportion.Controller, classes)")


def _adapt_objectives(cfg: Config, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """--adapt's latency objectives and their percentiles from the config, checked before any
    model starts (a usage mistake costs no start-up)."""
    slos = {n: m.slo["latency_ms"] for n, m in cfg.models.items() if m.slo}
    percentiles = {n: m.slo.get("percentile", 99.0) for n, m in cfg.models.items() if m.slo}
    if args.adapt and not slos:
        raise ConfigError(args.config, "models", "--adapt needs a latency objective: give at least one model "
                          "slo = { latency_ms = ... }")
    if args.adapt_window_s is not None and not args.adapt:
        raise ConfigError("<command line>", "--adapt-window-s", "applies with --adapt only")
    if args.adapt_classes:
        if not args.adapt:
            raise ConfigError("<command line>", "--adapt-classes", "applies with --adapt only")
        if cfg.shared_pool != "scheduled":
            raise ConfigError("<command line>", "--adapt-classes", "priority classes are the scheduled pool's: the "
                              f"config's [runtime] has shared_pool = {cfg.shared_pool!r}")
        if cfg.pool_reserve:
            raise ConfigError("<command line>", "--adapt-classes", "a class cannot change while the pool has "
                              "pool_reserve (a worker's OS priority follows its class from its start)")
    for name in args.adapt_batchable:
        if not args.adapt:
            raise ConfigError("<command line>", "--adapt-batchable", "applies with --adapt only")
        if name not in slos:
            raise ConfigError("<command line>", "--adapt-batchable", f"model {name!r} has no slo in the config, so the "
                              f"controller does not manage it; models with one: {', '.join(slos)}")
    return slos, percentiles


def _adapt_window_s(args: argparse.Namespace) -> float:
    return args.adapt_window_s if args.adapt_window_s is not None else 1.0


def _managed(window_s: float, slos: dict[str, float], percentiles: dict[str, float],
             unserved: Iterable[str] = ()) -> str:
    """--adapt's line saying which models the controller manages (``unserved``: those of them
    no client can call)."""
    managed = ", ".join(f"{n} (p{percentiles[n]:.10g} <= {slo:.10g} ms)" for n, slo in slos.items())
    idle = sorted(unserved)
    aside = (f"; {', '.join(idle)} {'has' if len(idle) == 1 else 'have'} an slo and no signature: not served, "
             "moved like the others (it may give capacity to the served models)" if idle else "")
    return f"online controller: every {window_s:g} s, manages {managed}{aside}"


def _start_controller(rt: Any, args: argparse.Namespace, cfg: Config, slos: dict[str, float],
                      percentiles: dict[str, float], out: TextIO | None, errors: TextIO | None = None) -> Any:
    """--adapt's controller, started beside ``rt``; each move is a line on ``out`` (None: quiet),
    each failure one on ``errors`` as it happens (None: kept in ``controller.errors`` only). It
    asks the config's cost models (a tuner's plan has them) before a batching move."""
    from .controller import Controller

    log = None if out is None else (lambda m: print(f"[{m.at_s:7.1f}s] {m.model}: {m.change} ({m.reason})",
                                                    file=out, flush=True))
    on_error = None if errors is None else (lambda e: print(f"controller error at {e}", file=errors, flush=True))
    return Controller(rt, slos, window_s=_adapt_window_s(args), log=log, on_error=on_error, percentiles=percentiles,
                      batchable=args.adapt_batchable, classes=args.adapt_classes,
                      costs={n: m.cost for n, m in cfg.models.items() if m.cost is not None}).start()


def _run_run(args: argparse.Namespace, out: TextIO) -> int:
    from . import load as ld

    cfg = Config.load(args.config)
    # Before any model starts: --adapt steers by latency objectives.
    slos, percentiles = _adapt_objectives(cfg, args)
    rt, stopped = _start_or_stop(cfg, args.root, "apportion run")  # a service manager's stop, too
    if stopped is not None:
        return stopped
    report = None
    controller = None
    stopped_by: int | None = None  # the signal that ended a --duration run early
    try:
        if not args.json:
            print(rt.plan(), file=out)
        if args.adapt:
            controller = _start_controller(rt, args, cfg, slos, percentiles, None if args.json else out)
            if not args.json:
                print(_managed(controller.window_s, slos, percentiles), file=out, flush=True)
        loads = cfg.model_loads()
        with _sigterm_stops():
            try:
                if args.duration is not None and loads:
                    window = max(0.1, args.duration / 4)
                    with _inputs_errors(lambda m: (cfg.path, f"{model_key(m)}.inputs")):
                        report = ld.run(rt, loads, warmup_s=window, window_s=window, stable_windows=3,
                                        max_s=max(args.duration, 4 * window))
                elif args.duration is not None:
                    time.sleep(args.duration)
                else:
                    if not args.json:
                        print("serving; Ctrl-C stops", file=out, flush=True)
                    while True:
                        time.sleep(3600)
            except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (_Stopped)
                if args.duration is not None:
                    stopped_by = signal.SIGTERM if isinstance(e, _Stopped) else signal.SIGINT
        stats = rt.stats()
    finally:
        if controller is not None:
            controller.stop()
        rt.close(drain=False)
    if args.json:
        doc: dict[str, Any] = {"plan": rt.plan().to_dict(),
                               "stats": {n: v.to_dict() for n, v in stats.items()}}
        if report is not None:
            doc["load"] = report.to_dict()
        if controller is not None:
            doc["moves"] = [{"at_s": m.at_s, "model": m.model, "change": m.change, "reason": m.reason,
                             "undo": m.undo} for m in controller.moves]
            doc["controller_errors"] = controller.errors
            state = controller.stats()
            doc["controller"] = {"counts": state["counts"], "error_count": state["error_count"],
                                 "held": {n: {"at_s": at, "windows": k, "why": why}
                                          for n, (at, k, why) in state["held"].items()}}
        if stopped_by is not None:
            doc["stopped_by"] = signal.Signals(stopped_by).name
        json.dump(doc, out, indent=2, default=str)
        out.write("\n")
    else:
        if stopped_by is not None:
            print(f"stopped early by {signal.Signals(stopped_by).name}: the runtime's stats so far", file=out)
        if report is not None:
            print(report, file=out)
        print(stats, file=out)
        for err in controller.errors if controller is not None else ():
            print(f"controller error at {err}", file=out)
    return EXIT_OK if stopped_by is None else 128 + int(stopped_by)


def _bench_args(p: argparse.ArgumentParser) -> None:
    _add_config(p, required=False)
    p.add_argument("--url", metavar="URL",
                   help="drive a KServe v2 server (apportion serve, Triton, ...) at http://HOST:PORT or "
                   "grpc://HOST:PORT instead of models built here; CONFIG, if given, supplies the loads and "
                   "inputs, the server the models")
    p.add_argument("--request-timeout-s", type=seconds, default=30.0, metavar="S",
                   help="with --url: a request with no answer after S seconds counts as failed "
                   "('client timeout'; default 30)")
    p.add_argument("--tensors", choices=("binary", "json"), default="binary",
                   help="with --url: send tensors as binary data (default) or as JSON (HTTP only)")
    p.add_argument("--model", action="append", default=[], metavar="SPEC",
                   help="load for one model, NAME:key=value,... e.g. 'mlp:concurrency=4,latency_ms=20' or "
                   "'mlp:rate=200'; replaces that model's configured load (repeatable)")
    p.add_argument("--factory", action="append", default=[], metavar="NAME=MODULE:FUNCTION",
                   help="without CONFIG: the factory of model NAME (repeatable)")
    p.add_argument("--inputs", action="append", default=[], metavar="NAME=MODULE:FUNCTION",
                   help="zero-argument callable making one request's input for model NAME")
    _window_args(p, 1.0, 30.0)
    _add_root(p)
    _add_json(p)


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, eq, ref = v.partition("=")
        if not eq or not name or not ref:
            raise ConfigError("<command line>", flag, f"{v!r}: give NAME=module:function")
        out[name] = ref
    return out


def _bench_run(args: argparse.Namespace, out: TextIO) -> int:
    from . import load as ld
    from .config import ModelConfig
    from .spec import ModelSpec

    args.max_s = _max_s(args)  # before anything starts or connects
    specs = []
    for text in args.model:
        try:
            specs.append(ld.parse_spec(text))
        except ld.LoadError as e:
            raise ConfigError("<command line>", "--model", str(e)) from None
    names = [x.model for x in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError("<command line>", "--model", f"model {twice[0]!r} is given more than once")
    if args.url is not None:
        return _bench_remote(args, specs, out)
    inputs_flags = _pairs(args.inputs, "--inputs")
    if args.config:
        for flag, given in (("--factory", args.factory), ("--inputs", args.inputs)):
            if given:
                raise ConfigError("<command line>", flag, "with CONFIG, each model's factory and inputs come from "
                                  "its table's factory and inputs keys")
        cfg = Config.load(args.config)
    else:
        factories = _pairs(args.factory, "--factory")
        if not specs:
            raise ConfigError("<command line>", None, "give CONFIG or at least one --model SPEC with --factory")
        for flag, given in (("--factory", factories), ("--inputs", inputs_flags)):
            stray = sorted(set(given) - set(names))
            if stray:
                raise ConfigError("<command line>", flag, f"model {stray[0]!r} has no --model SPEC")
        models = {}
        for spec in specs:
            if spec.model not in factories:
                raise ConfigError("<command line>", "--factory", f"model {spec.model!r} has no factory; "
                                  f"add --factory {spec.model}=module:function")
            try:
                model_spec = ModelSpec(spec.model, factory=factories[spec.model])
            except QuotaError as e:
                raise ConfigError("<command line>", "--factory", str(e)) from None
            models[spec.model] = ModelConfig(model_spec, inputs=inputs_flags.get(spec.model))
        cfg = Config(models=models, path="<command line>")
    loads = _config_loads(cfg, specs)
    for x in loads:  # before any model starts: a bad load is the command line's (or config's) error
        where, key = ("<command line>", "--model") if x.model in names else (cfg.path, f"{model_key(x.model)}.load")
        try:
            x.validate([y.model for y in loads])
        except ld.LoadError as e:
            raise ConfigError(where, key, str(e)) from None
        levels = cfg.models[x.model].spec.priority_levels
        if x.priority is not None and not 0 <= x.priority < levels:
            raise ConfigError(where, key, f"model {x.model!r}: priority {x.priority} is not one of the model's "
                              f"priority levels 0-{levels - 1} (0 is the highest)")
    rt = cfg.runtime(topology_root=args.root, start=True)
    try:
        with _inputs_errors(lambda m: _inputs_key(cfg.path, m, not args.config)):
            report = ld.run(rt, loads, warmup_s=args.warmup_s, window_s=args.window_s,
                            max_s=args.max_s)
    finally:
        rt.close(drain=False)
    _print_report(report, args.json, out)
    _failures(report)
    return EXIT_OK


def _inputs_key(path: str, model: str, flag: bool) -> tuple[str, str]:
    """Where a model's inputs were given: its --inputs flag, or its config table's key."""
    return ("<command line>", "--inputs") if flag else (path, f"{model_key(model)}.inputs")


def _config_loads(cfg: Config, specs: Sequence[ld.ModelLoad]) -> list[ld.ModelLoad]:
    """The config's loads, each model's replaced by its --model SPEC where one is given."""
    by_name = {s.model: s for s in specs}
    loads = []
    for m in cfg.models.values():
        spec = by_name.get(m.name)
        if spec is not None:
            # It replaces the load; the model's slo table still applies unless the spec gives one.
            slo = spec.slo if spec.slo is not None or not m.slo else ld.model_load(m.name, {"concurrency": 1, **m.slo}).slo
            loads.append(dataclasses.replace(spec, inputs=m.resolved_inputs(cfg.path), slo=slo))
    configured = [x for x in cfg.model_loads() if x.model not in by_name]
    loads += configured
    if not loads:
        raise ConfigError(cfg.path, "models", "no model has a load: add load = { concurrency = N } "
                          "to a model, or pass --model NAME:concurrency=N")
    unknown = sorted(set(by_name) - set(cfg.models))
    if unknown:
        raise ConfigError(cfg.path, "--model", f"no model {unknown[0]!r} in the config; models: {', '.join(cfg.models)}")
    return loads


def _bench_remote(args: argparse.Namespace, specs: Sequence[ld.ModelLoad], out: TextIO) -> int:
    from .config import resolve

    if args.factory:
        raise ConfigError("<command line>", "--factory", "does not apply with --url: the server builds its models")
    if args.config:
        if args.inputs:
            raise ConfigError("<command line>", "--inputs", "with CONFIG, inputs come from its models' inputs keys")
        loads = _config_loads(Config.load(args.config), specs)
    else:
        if not specs:
            raise ConfigError("<command line>", "--model", "with --url, give CONFIG or at least one --model SPEC")
        inputs = _pairs(args.inputs, "--inputs")
        stray = sorted(set(inputs) - {s.model for s in specs})
        if stray:
            raise ConfigError("<command line>", "--inputs", f"model {stray[0]!r} has no --model SPEC")
        loads = [dataclasses.replace(s, inputs=resolve(inputs[s.model], where="<command line>", key="--inputs"))
                 if s.model in inputs else s for s in specs]
    for x in loads:  # before connecting: a bad load is the command line's error, whatever the server
        try:
            x.validate([y.model for y in loads])
        except ld.LoadError as e:
            raise ConfigError("<command line>", "--model", str(e)) from None
    try:
        # A connection per closed-loop client (one request in flight on each), 256 at least.
        target = ld.RemoteTarget(args.url, [x.model for x in loads], request_timeout_s=args.request_timeout_s,
                                 tensors=args.tensors,
                                 connections=max(256, sum(x.concurrency or 0 for x in loads)))
    except ld.LoadError as e:
        raise ConfigError("<command line>", "--url", str(e)) from None
    try:
        with _inputs_errors(lambda m: _inputs_key(args.config or "<command line>", m, not args.config)):
            report = ld.run(target, loads, warmup_s=args.warmup_s, window_s=args.window_s,
                            max_s=args.max_s,
                            drain_timeout_s=args.request_timeout_s)
    finally:
        target.close()
    _print_report(report, args.json, out)
    _failures(report)
    return EXIT_OK


def _print_report(report: ld.LoadReport, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(report.to_json() + "\n")
    else:
        print(report, file=out)


def _tune_args(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    p.add_argument("--budget-s", type=seconds, default=60.0,
                   help="time budget in seconds (default 60); profiling each model once at each shape takes "
                   "~1 s a run whatever the budget, and the report says how long the search took")
    p.add_argument("--out", default="apportion-tune", metavar="DIR",
                   help="where plan.toml, report.md and candidates.png go (default ./apportion-tune)")
    p.add_argument("--objective", choices=("goodput", "min_fraction"), default="goodput",
                   help="maximise total goodput (default) or the minimum fraction of demand served")
    p.add_argument("--max-batch", type=in_range(1, 65536), default=8,
                   help="largest batch considered, 1 to 65536; 1 disables batching (default 8)")
    p.add_argument("--margin", type=float, default=0.1,
                   help="validate each SLO tightened by this fraction (default 0.1: p99 within 90%% of it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    _add_root(p)


def _tune_run(args: argparse.Namespace, out: TextIO) -> int:
    from .tune import tune
    from .tune.report import writable_outputs
    from .tune.tuner import check_loads

    if not 0 <= args.margin < 1:
        raise ConfigError("<command line>", "--margin", f"got {args.margin}; give a fraction in [0, 1)")
    cfg = Config.load(args.config)  # a config error leaves no --out directory behind
    check_loads(cfg)
    writable_outputs(args.out)  # nor does a missing plotting library
    _writable_dir(args.out)
    result = tune(cfg, budget_s=args.budget_s, objective=args.objective, topology_root=args.root,
                  max_batch=args.max_batch, margin=args.margin, progress=not args.quiet,
                  out_dir=args.out)
    print(result.why(), file=out)
    print(result.summary(shortfall=False), file=out)
    print(f"plan: {Path(args.out) / 'plan.toml'}; report: {Path(args.out) / 'report.md'}; "
          f"plot: {Path(args.out) / 'candidates.png'}", file=out)
    return EXIT_OK


def _writable_dir(path: str) -> None:
    """Makes ``--out`` (a directory) or refuses it at once, before a budget is spent on a result
    it could not hold: a usage error naming --out (exit 2)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".apportion-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError("<command line>", "--out", f"{path!r} cannot hold the results: "
                          f"{e.strerror or e} ({type(e).__name__})") from None


def _demo_args(p: argparse.ArgumentParser) -> None:
    from .demo import add_arguments

    add_arguments(p)


def _demo_run(args: argparse.Namespace, out: TextIO) -> int:
    from .demo import run_demo
    from .tune import Settings

    w = args.window_s
    if args.no_shift:  # both only measure what comes after the shift
        for flag, given in (("--retune", args.retune), ("--rounds", args.rounds is not None)):
            if given:
                raise ConfigError("<command line>", flag, "measures the rows after the mix shift, and --no-shift "
                                  "leaves them out: give one or the other")
    _writable_dir(args.out)
    run_demo(load=args.load, budget_s=args.budget_s, out_dir=args.out, stream=out, progress=not args.quiet,
             settings=Settings(warmup_s=w, window_s=w, stable_windows=3, max_s=6 * w), shift=not args.no_shift,
             adapt_s=args.adapt_s, retune=args.retune, shift_shares=args.shift, rounds=args.rounds)
    return EXIT_OK


def _serve_args(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--http-port", type=in_range(0, 65535), default=8000, metavar="PORT",
                   help="v2 HTTP/REST port (default 8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=in_range(-1, 65535), default=8001, metavar="PORT",
                   help="v2 gRPC port (default 8001; 0 picks a free one; -1: no gRPC)")
    p.add_argument("--loop", choices=LOOPS, default="auto",
                   help="event loop: uvloop, asyncio, or auto (default: uvloop where installed)")
    p.add_argument("--queue-full-status", type=int, choices=(429, 503), default=429, metavar="STATUS",
                   help="HTTP status of a request refused because its model's queue is full: 429 (with "
                   "Retry-After, the default) or 503")
    p.add_argument("--max-body-bytes", type=above_zero(int), default=64 << 20, metavar="N",
                   help="refuse request bodies (HTTP) and messages (gRPC) beyond N bytes with 413 / "
                   "RESOURCE_EXHAUSTED (default 64 MiB)")
    p.add_argument("--drain-timeout-s", type=seconds, default=30.0, metavar="S",
                   help="on SIGTERM or Ctrl-C, wait at most S seconds for admitted requests (default 30)")
    p.add_argument("--body-timeout-s", type=seconds, default=60.0, metavar="S",
                   help="answer 408 to an HTTP request whose body has not arrived whole S seconds after "
                   "its headers (default 60)")
    p.add_argument("--header-timeout-s", type=seconds, default=60.0, metavar="S",
                   help="answer 408 and close a connection whose request headers have not arrived whole S "
                   "seconds after the connection (or the request's first byte) (default 60)")
    p.add_argument("--max-header-bytes", type=in_range(1024, 1 << 30), default=64 << 10, metavar="N",
                   help="answer 431 and close a connection whose request line and headers pass N bytes "
                   "(default 64 KiB)")
    p.add_argument("--write-timeout-s", type=seconds, default=60.0, metavar="S",
                   help="drop an HTTP connection whose client has taken none of its answer for S seconds "
                   "(default 60)")
    _add_adapt(p)
    _add_root(p)


def _serve_run(args: argparse.Namespace, out: TextIO) -> int:
    import threading

    from ._private.loops import loop_factory

    try:
        from .serve import Server, signatures

        # Before the models are built and warmed up: --loop uvloop without uvloop is refused now.
        loop_factory(args.loop)
    except ImportError as e:  # the serve extra not installed: one line naming it
        raise ApportionError(str(e)) from None
    cfg = Config.load(args.config)
    sigs = signatures(cfg)
    slos, percentiles = _adapt_objectives(cfg, args)
    _log_on_stderr()
    if args.adapt and not set(slos) & set(sigs):
        raise ConfigError(args.config, "models", f"--adapt manages models with an slo, and none of them "
                          f"({', '.join(slos)}) is served (no signature table): nothing it moves would "
                          "serve a request")
    # A signal while the models build and warm up ends the process as the signal asks, with a
    # line instead of an abrupt exit (SIGTERM) or a traceback (Ctrl-C).
    rt, stopped = _start_or_stop(cfg, args.root, "apportion serve")
    if stopped is not None:
        return stopped
    controller = None

    def stop_controller() -> None:
        # Not waiting: a move in progress (a factory, a warm-up) must not hold the drain or an
        # abort; it goes on until the runtime closes, and none starts after this.
        if controller is not None:
            controller.stop(wait=False)

    try:
        server = Server(rt, sigs, host=args.host, http_port=args.http_port,
                        grpc_port=None if args.grpc_port == -1 else args.grpc_port, loop=args.loop,
                        max_body_bytes=args.max_body_bytes, queue_full_status=args.queue_full_status,
                        drain_timeout_s=args.drain_timeout_s, body_timeout_s=args.body_timeout_s,
                        header_timeout_s=args.header_timeout_s, max_header_bytes=args.max_header_bytes,
                        write_timeout_s=args.write_timeout_s)

        def announce() -> None:
            if server.listening.wait(120):
                grpc = f", v2 gRPC on {args.host}:{server.grpc_port}" if server.grpc_port is not None else ""
                print(f"serving {', '.join(sigs)}: v2 HTTP on http://{args.host}:{server.http_port}{grpc} "
                      f"({server.loop} loop); "
                      "SIGTERM or Ctrl-C drains and exits", file=out, flush=True)
                if args.adapt:
                    print(_managed(_adapt_window_s(args), slos, percentiles, set(slos) - set(sigs)), file=out,
                          flush=True)

        threading.Thread(target=announce, daemon=True).start()
        if args.adapt:
            # Moves on stdout with the rest of the server's lines; a failed move on stderr.
            controller = running = _start_controller(rt, args, cfg, slos, percentiles, out, sys.stderr)
            # Stopped when the server begins to stop: no move (new instances, their warm-up)
            # starts during the drain.
            threading.Thread(target=lambda: (server.stopping.wait(), running.stop(wait=False)), daemon=True,
                             name="apportion-serve-adapt-stop").start()
        try:
            server.serve_forever()
        except OSError as e:  # the address: in use, not this machine's, or a host that does not resolve
            raise ApportionError(f"cannot serve on --host {args.host} (--http-port {args.http_port}, --grpc-port "
                                 f"{args.grpc_port}): {e}") from None
        except SystemExit as e:  # a second signal aborted the drain
            stop_controller()
            _close_or_exit(rt, drain=False, code=e.code if isinstance(e.code, int) else 1)
            raise
    except BaseException:
        stop_controller()
        _close_or_exit(rt, drain=False, code=1)
        raise
    stop_controller()
    # The drain answered every admitted request; past its timeout, those still running got 503,
    # and their calls are not waited for (one that never returns held the exit for ever).
    if server.drained is False:  # said before the close, which may end the process (os._exit)
        print(f"apportion serve: requests still running after --drain-timeout-s {args.drain_timeout_s:g} "
              f"got 503 (not finished: {_unfinished(rt)})", file=sys.stderr, flush=True)
    if server.drained is True and controller is not None and controller.stats()["running"]:
        # Every request answered; what holds the close is a move that began before the signal
        # (a factory or warm-up of new instances): nothing is lost by leaving it.
        _close_or_exit(rt, drain=True, code=EXIT_OK, running="a move of the online controller (new instances starting)")
    else:
        _close_or_exit(rt, drain=server.drained is True, code=1)
    return 1 if server.drained is False else EXIT_OK


CLOSE_GRACE_S = 2.0
"""How long ``apportion serve`` waits for the runtime to close after the drain (queued work
cancelled, worker processes ended) before it exits without the calls still running."""


def _start_or_stop(cfg: Config, root: str, prog: str) -> tuple[Any, int | None]:
    """(the config's runtime started, None), or (None, 128 + signal) for SIGTERM or Ctrl-C
    while its models start, said in one line. The start runs on a thread of its own, so the
    signal is heard at once even while a factory or warm-up runs (the engine's wait for them
    cannot be interrupted): a start that then returns within CLOSE_GRACE_S is closed; one that
    does not (a factory or warm-up that never returns) is left, and the process ends."""
    got: dict[str, Any] = {}
    done = threading.Event()  # not Thread.join: an exception in join leaves is_alive() False

    def start() -> None:
        try:
            got["rt"] = cfg.runtime(topology_root=root, start=True)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            got["error"] = e
        finally:
            done.set()

    starter = threading.Thread(target=start, name="apportion-start", daemon=True)
    with _sigterm_stops():
        try:
            starter.start()
            while not done.wait(0.1):  # a signal's handler runs here, between the waits
                pass
        except KeyboardInterrupt as e:
            sig = signal.SIGTERM if isinstance(e, _Stopped) else signal.SIGINT
            # A second signal during the grace below changes nothing (the process ends within it
            # either way): raised out of here, it skipped the close of a start that then returned.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            print(f"{prog}: stopped by {sig.name} while its models started", file=sys.stderr, flush=True)
            if not done.wait(CLOSE_GRACE_S):
                print(f"{prog}: a model's factory or warm-up still running {CLOSE_GRACE_S:g} s later; exiting "
                      "without it", file=sys.stderr, flush=True)
                os._exit(128 + sig)
            if "rt" in got:
                _close_or_exit(got["rt"], drain=False, code=128 + sig)
            return None, 128 + sig
    if "error" in got:
        raise got["error"]
    return got["rt"], None


class _Stderr(logging.Handler):
    """Writes each record to sys.stderr as it is when the record comes (not when the handler
    was made: a test's capture, a redirected stream)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging's own rule: a handler that fails reports it
            self.handleError(record)


def _log_on_stderr() -> None:
    """The package's log (the server's failure lines and its drain: apportion.serve.log) on
    stderr from INFO on, each line headed "apportion serve:", once per process."""
    logger = logging.getLogger("apportion")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("apportion serve: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # the drain's start, too
    logger.propagate = False  # not twice, through a root handler of the process


def _unfinished(rt: Any) -> str:
    """The models with requests not finished (queued or running), and how many each: "'a' 2,
    'b' 1", for an operator's line about a drain or a close that did not end."""
    try:
        busy = [f"{n!r} {s.in_flight}" for n, s in rt.stats().items() if s.in_flight]
    except Exception as e:  # noqa: BLE001 - a line about the exit must not fail the exit
        return f"unknown: {type(e).__name__}: {e}"
    return ", ".join(busy) or "none"


def _close_or_exit(rt: Any, drain: bool, code: int, running: str = "model calls") -> None:
    """Closes ``rt``; when that does not finish within CLOSE_GRACE_S (a model call that does
    not return: a thread cannot be stopped), says so (``running``: what still runs, and the
    models with requests not finished) and ends the process with ``code``."""
    unfinished = _unfinished(rt) if not rt.closed else "none"
    closer = threading.Thread(target=rt.close, kwargs={"drain": drain}, name="apportion-close", daemon=True)
    closer.start()
    closer.join(CLOSE_GRACE_S)
    if closer.is_alive():
        print(f"apportion serve: {running} still running {CLOSE_GRACE_S:g} s after the drain (not finished: "
              f"{unfinished}); exiting without them", file=sys.stderr, flush=True)
        os._exit(code)


COMMANDS: tuple[Command, ...] = (
    Command("topology", "show the CPUs, cores, NUMA nodes and L3 domains this process may use",
            _topology_args, _topology_run),
    Command("plan", "show which CPUs, threads and memory each model of a config file gets",
            _plan_args, _plan_run),
    Command("run", "serve the models of a config file (optionally under its load for a while) and print stats",
            _run_args, _run_run),
    Command("serve", "serve a config's models over the network (KServe v2 HTTP and gRPC, Prometheus /metrics)",
            _serve_args, _serve_run),
    Command("bench", "put a load on models and report throughput, goodput and latency percentiles",
            _bench_args, _bench_run),
    Command("tune", "search cores, isolation, instances, threads and batching for a config's workload",
            _tune_args, _tune_run),
    Command("demo", "three torch models under one load: unmanaged vs equal split vs tuned, then a mix shift: "
            "the tuned plan static vs with the controller",
            _demo_args, _demo_run),
)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="apportion",
        description="Divide one machine's cores, threads and memory between ML models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help[0].upper() + cmd.help[1:] + ".")
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def console() -> int:
    """The ``apportion`` command: :func:`main` with the current directory first on sys.path,
    as ``python -m apportion`` has it, so a config's "module:function" paths (factories,
    inputs, warm-up) resolve in the project directory either way."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return main()


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Runs one command; returns the exit status (argparse's own usage errors exit with 2).

    ``out``/``err`` default to sys.stdout/sys.stderr (tests pass buffers)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    args = build_parser().parse_args(argv)
    prog = f"apportion {args.command}"
    try:
        return int(args._run(args, out))
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=err)
        from .tune.tuner import ProfilingFailed

        return EXIT_FAILURE if isinstance(e, (DoesNotFit, StartFailed, InputsFailed, ProfilingFailed)) else EXIT_USAGE
    except ApportionError as e:  # a load or quota the runtime refused at run time
        print(f"{prog}: error: {e}", file=err)
        return EXIT_FAILURE
    except RuntimeError as e:  # an unreadable or malformed topology tree; the message names it
        print(f"{prog}: error: {str(e).removeprefix('apportion topology: ')}", file=err)
        return EXIT_FAILURE
    except KeyboardInterrupt as e:
        # Ctrl-C in a command that does not handle it itself (run and serve do, once serving;
        # SIGTERM while run's models start comes here too): one line, not a traceback through
        # the load generator. Runtimes were closed on the way out.
        sig = signal.SIGTERM if isinstance(e, _Stopped) else signal.SIGINT
        print(f"{prog}: {'stopped' if sig == signal.SIGTERM else 'interrupted'} ({sig.name})", file=err)
        return 128 + int(sig)
    except BrokenPipeError:
        # The reader went away (`apportion plan x.toml | head`): not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover - `python -m apportion` goes through __main__.py
    sys.exit(main())
