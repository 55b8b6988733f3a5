"""The peer comparison: the same v2 client and load (``apportion bench --url``) against
``apportion serve``, Triton Inference Server, Ray Serve and LitServe, each server pinned to
the same CPUs. Run through bench/peers/run.sh, which installs the peers first.

Triton runs two ways, both from nvidia-pytriton's venv: ``triton`` is the ``tritonserver``
binary PyTriton ships, run as a server with a model repository of Python-backend models
(serve_triton.py: one stub process per instance, as Triton runs Python models in production);
``pytriton`` is PyTriton's own API (serve_pytriton.py: every model a Python callable in the
one PyTriton process, reached from Triton's stubs through shared memory and ZeroMQ), which
adds two process hops and one GIL for all instances to every request.

Scenarios (bench/peers/models.py has the models and request tensors):

- ``noop``: a model that returns its input, one closed-loop client: round-trip p50;
- ``mlp256``: the torch MLP 256-1024-1024-256 at 1 thread a replica, 2 replicas and 1, without
  and with each server's batching (up to 8 requests, 1 ms), 8 closed-loop clients: req/s and
  p99, and each server's best configuration (on 2 CPUs the load client and each server's front
  share the CPUs with the replicas, so a second replica may cost more than it brings);
- ``demo``: apportion demo's three models (mlp, conv, encoder) under its mixed open load (Poisson,
  shares 35/20/45%) at its SLOs (p99 <= 50/75/40 ms, also sent as each request's timeout):
  goodput, for each server configuration tried (instances, batching) and each load. apportion
  serve configures each model as ``apportion demo`` does (its SLO as its timeout, the demo's
  queue bound, admission by deadline: a request that cannot be served in time is refused at
  once with 429 rather than served late); each peer gets what it has of the same: Triton its
  queue policy (at most that many requests waiting, more refused at once; a request whose
  timeout passes while it waits refused), Ray Serve ``max_queued_requests``, LitServe its
  request timeout. For every server a refusal for a full queue is no good answer and is not
  counted against the SLO, which is of the requests a server admits (the client reads
  Triton's and Ray Serve's 503 answers by their words, load/remote.py). The total
  rate is a fraction (``--demo-load``, by tensor encoding, several separated by ``/``; default
  json=0.1, binary=0.35/0.5/0.65/0.8/0.9/1.0) of
  ``apportion.demo.demo_config(load=1.0)`` for the server's CPUs: the demo's full rate is
  sized for requests with no network, JSON or client cost, and its tensors as JSON (4-12 k
  floats a request) cost the client and every server more than the models themselves
  (15-18 ms a request against 2 ms binary, one client, apportion serve, this machine). A
  server that serves everything offered at one load says nothing of how much more it could
  serve, so the demo runs at several, and a last table gives each server's best goodput over
  every configuration and load (preferring one that met every SLO).

Every request's tensors travel as JSON (``--tensors json``). Ray Serve and LitServe answer v2
through the thin adapters in this folder (serve_ray.py, serve_litserve.py, v2json.py);
apportion serve and Triton speak v2 themselves. ``--tensors json,binary`` adds rows with binary
tensor data (every server takes it; LitServe's adapter finds the body's JSON part by parsing
it, since LitServe passes its API the body and not the headers).

    python bench/peers/run.py [--peers apportion,pytriton,ray,litserve] [--window-s 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILD = ROOT / "build" / "peers"
PEERS = ("apportion", "triton", "pytriton", "ray", "litserve")
BINARY = ("apportion", "triton", "pytriton", "ray", "litserve")  # take binary tensor data (Ray Serve, LitServe: their adapters)
VENV = {"triton": "pytriton"}  # Triton's own binary comes with nvidia-pytriton
# Each server's "every model and worker is ready" route (Ray Serve's serve.run returns once
# its deployments are healthy, before serve_ray.py listens).
READY = {"apportion": "/v2/health/ready", "triton": "/v2/health/ready", "pytriton": "/v2/health/ready",
         "litserve": "/health"}


def venv(peer: str) -> str:
    """The folder under build/peers with the peer's venv and, beside it, its install log."""
    return VENV.get(peer, peer)

MLP_CONFIGS: dict[str, dict[str, Any]] = {
    "2 replicas x 1 thread": {"instances": 2},
    "2 replicas x 1 thread, batch 8 / 1 ms": {"instances": 2, "batch": 8, "delay_ms": 1.0},
    "1 replica x 1 thread": {"instances": 1},
    "1 replica x 1 thread, batch 8 / 1 ms": {"instances": 1, "batch": 8, "delay_ms": 1.0},
}

DEMO_CONFIGS: dict[str, dict[str, Any]] = {
    "1 instance each": {"instances": 1},
    "1 instance each, batch 8 / 2 ms": {"instances": 1, "batch": 8, "delay_ms": 2.0},
    "2 instances each": {"instances": 2},
}


@dataclass
class Row:
    peer: str
    scenario: str
    config: str
    tensors: str
    load: float | None = None  # the demo's: the fraction of its full rate offered
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    restarted: bool = False  # its server failed to start once and was started again


def _ephemeral_low() -> int:
    """The first port of the range the kernel picks from for a bind to port 0."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_base(n: int = 3) -> int:
    """A port p with p..p+n-1 free on 127.0.0.1 (Triton takes HTTP, gRPC and metrics).

    Below the kernel's range for port 0 and above Ray's worker ports (10002-19999): Ray's own
    processes bind port 0 after this check, and one of them once took the port picked here
    for Ray Serve's HTTP proxy (the client read an HTTP/2 SETTINGS frame)."""
    high = min(40000, _ephemeral_low()) - n
    for _ in range(200):
        base = random.randrange(20000, high)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def apportion_config(models: dict[str, dict[str, Any]], slo_ms: dict[str, float], path: Path) -> Path:
    from apportion import demo

    lines = []
    for name, c in models.items():
        lines += [f"[models.{name}]", f'factory = "models:{name}_factory"',
                  f"instances = {int(c.get('instances', 1))}", "threads = 1"]
        if name in slo_ms:  # as apportion demo configures its models
            lines += [f"timeout_ms = {slo_ms[name]}", f"max_queue = {demo.MAX_QUEUE}", 'admission = "deadline"']
        if int(c.get("batch", 1)) > 1:
            lines += [f"[models.{name}.batching]", f"max_size = {int(c['batch'])}",
                      f"max_delay_ms = {float(c.get('delay_ms', 0.0))}"]
        from models import signature

        sig = signature(name)
        shape_in, shape_out = sig["inputs"][0]["shape"], sig["outputs"][0]["shape"]
        lines += [f"[models.{name}.signature]",
                  f'inputs = [{{ name = "x", datatype = "FP32", shape = {shape_in} }}]',
                  f'outputs = [{{ name = "y", datatype = "FP32", shape = {shape_out} }}]',
                  'tensor = "torch"', ""]
    path.write_text("\n".join(lines))
    return path


class ServerExited(RuntimeError):
    """A server process ended before it was ready."""


class Server:
    """One peer's server process (its own session, pinned to the server CPUs)."""

    def __init__(self, peer: str, models: dict[str, dict[str, Any]], cpus: list[int], slo_ms: dict[str, float],
                 log: Path, apportion_loop: str = "auto") -> None:
        from apportion import demo

        self.peer = peer
        self.port = free_base()
        py = sys.executable if peer == "apportion" else str(BUILD / venv(peer) / "bin" / "python")
        # A model with an SLO (the demo's): its timeout and queue bound, which each peer applies
        # with its own options where it has them (serve_pytriton.py, serve_ray.py, serve_litserve.py).
        spec = json.dumps({n: {**c, "timeout_ms": slo_ms[n], "max_queue": demo.MAX_QUEUE} if n in slo_ms else c
                           for n, c in models.items()})
        env = dict(os.environ, PYTHONPATH=str(HERE), PYTHONUNBUFFERED="1")
        if peer in ("triton", "pytriton"):
            # Triton's Python-backend stub links libpython3.x: make it the interpreter's own,
            # not an older system copy with another stdlib ABI.
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                filter(None, [sysconfig.get_config_var("LIBDIR"), env.get("LD_LIBRARY_PATH")]))
        if peer == "apportion":
            cfg = apportion_config(models, slo_ms, log.with_suffix(".toml"))
            cmd = [py, "-m", "apportion", "serve", str(cfg), "--http-port", str(self.port),
                   "--grpc-port", str(self.port + 1), "--loop", apportion_loop]
        elif peer == "triton":
            cmd = [py, str(HERE / "serve_triton.py"), str(self.port), spec, str(BUILD / "triton")]
        elif peer == "pytriton":
            cmd = [py, str(HERE / "serve_pytriton.py"), str(self.port), spec]
        elif peer == "ray":
            tmp = BUILD / "raytmp"
            tmp.mkdir(parents=True, exist_ok=True)
            cmd = [py, str(HERE / "serve_ray.py"), str(self.port), spec, str(len(cpus)), str(tmp)]
        else:
            cmd = [py, str(HERE / "serve_litserve.py"), str(self.port), spec]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(["taskset", "-c", ",".join(map(str, cpus)), *cmd], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, cwd=str(HERE), start_new_session=True)
        self.log_path = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, models: list[str], timeout_s: float = 240.0) -> None:
        """Waits until each model's metadata answers and then the server's own readiness does
        (READY: LitServe, for one, answers a route once any worker is up, and its /health once
        every worker is)."""
        deadline = time.monotonic() + timeout_s
        pending = [f"/v2/models/{m}" for m in models] + ([READY[self.peer]] if self.peer in READY else [])
        while pending:
            if self.proc.poll() is not None:
                raise ServerExited(f"{self.peer} exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.peer} not ready after {timeout_s:g} s: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}{pending[0]}", timeout=5) as r:
                    if r.status == 200:
                        pending.pop(0)
                        continue
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)

    def tail(self, n: int = 1500) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace")
        return text[-n:].strip().replace("\n", " | ")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever it left in its session (Ray's and Triton's helper processes)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def start_ready(start: Any, models: list[str]) -> tuple[Any, bool]:
    """``start(again)`` -> a server; waits until it is ready and returns it with whether it was
    started twice. A server that exits before it is ready failed to start, which says nothing of
    how it serves (PyTriton's model stubs now and then find their handshake socket not listening
    yet): it is stopped and started once more, and the row says so. A second failure, or a
    server that stays up without becoming ready, is the row's error."""
    server = start(False)
    try:
        server.wait_ready(models)
        return server, False
    except ServerExited as e:
        server.stop()
        print(f"  ({server.peer} failed to start, starting it again: {str(e)[-300:]})", flush=True)
    server = start(True)
    server.wait_ready(models)
    return server, True


SHM = Path("/dev/shm")


def shm_entries(root: Path = SHM) -> set[str]:
    """What is in the shared-memory filesystem now (empty where there is none)."""
    try:
        return set(os.listdir(root))
    except OSError:
        return set()


def clean_shm(before: set[str], root: Path = SHM) -> list[str]:
    """Removes what appeared in ``root`` since ``before`` was listed and returns its names. A
    stopped server's segments outlive it: PyTriton's (``psm_*`` and ``pytrtion*``, two of each a
    row) stay in /dev/shm, which is memory, when its processes are killed."""
    left = sorted(shm_entries(root) - before)
    for name in left:
        try:
            (root / name).unlink()
        except OSError:  # gone meanwhile, or not a file: nothing to free
            pass
    return left


def settle(max_s: float = 20.0, idle: float = 0.9, step_s: float = 0.5) -> float:
    """Waits until the machine's CPUs were at least ``idle`` idle over one ``step_s`` (what a
    stopped server left behind, such as Ray's helper processes, has ended), at most ``max_s``.
    Returns the seconds waited (0 where /proc/stat cannot be read)."""
    from apportion._private.cputime import cpus_busy_s

    cpus = range(os.cpu_count() or 1)
    t0 = time.monotonic()
    while True:
        b0, s0 = cpus_busy_s(cpus), time.monotonic()
        if b0 is None:
            return 0.0
        time.sleep(step_s)
        b1, s1 = cpus_busy_s(cpus), time.monotonic()
        if b1 is None or 1.0 - (b1 - b0) / ((s1 - s0) * len(cpus)) >= idle or s1 - t0 >= max_s:
            return s1 - t0


def bench(url: str, specs: list[str], inputs: list[str], tensors: str, cpus: list[int], args: argparse.Namespace
          ) -> dict[str, Any]:
    cmd = ["taskset", "-c", ",".join(map(str, cpus)), sys.executable, "-m", "apportion", "bench", "--url", url,
           "--tensors", tensors, "--warmup-s", str(args.warmup_s), "--window-s", str(args.window_s),
           "--max-s", str(args.warmup_s + 3 * args.window_s), "--request-timeout-s", str(args.request_timeout_s),
           "--json"]
    for s in specs:
        cmd += ["--model", s]
    for i in inputs:
        cmd += ["--inputs", i]
    env = dict(os.environ, PYTHONPATH=str(HERE))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.warmup_s + 3 * args.window_s + 120)
    # Exit 1 with a report on stdout: some requests failed; the row keeps them (its errors).
    if r.returncode != 0 and not (r.returncode == 1 and r.stdout.strip()):
        raise RuntimeError(f"apportion bench exited {r.returncode}: {r.stderr.strip()[-800:]}")
    return json.loads(r.stdout)


def scenario_loads(scenario: str, demo_rate: float) -> tuple[list[str], list[str]]:
    from apportion import demo

    if scenario == "noop":
        return ["noop:concurrency=1"], ["noop=models:noop_input"]
    if scenario == "mlp256":
        return ["mlp256:concurrency=8"], ["mlp256=models:mlp256_input"]
    specs = [f"{n}:rate={demo_rate * demo.SHARES[n]:.1f},latency_ms={demo.SLO_MS[n]:g},"
             f"timeout_ms={demo.SLO_MS[n]:g}" for n in ("mlp", "conv", "encoder")]
    return specs, [f"{n}=models:{n}_input" for n in ("mlp", "conv", "encoder")]


def figures(scenario: str, report: dict[str, Any]) -> dict[str, Any]:
    ms = report["models"]
    errors: dict[str, int] = {}
    for m in ms.values():
        for k, v in m["errors"].items():
            errors[k] = errors.get(k, 0) + v
    out: dict[str, Any] = {"stable": report["stable"], "errors": errors}
    if scenario == "noop":
        lat = ms["noop"]["latency"]
        out.update(p50_ms=lat and lat["p50_ms"], p99_ms=lat and lat["p99_ms"], rps=ms["noop"]["throughput"])
    elif scenario == "mlp256":
        lat = ms["mlp256"]["latency"]
        out.update(rps=ms["mlp256"]["throughput"], p99_ms=lat and lat["p99_ms"], p50_ms=lat and lat["p50_ms"])
    else:
        out.update(goodput=report["goodput"], throughput=report["throughput"],
                   offered=sum(m["offered_rate"] for m in ms.values()),
                   per_model={n: {"good": m["goodput"], "p99_ms": m["latency"] and m["latency"]["p99_ms"],
                                  "slo_met": m["slo_met"]} for n, m in ms.items()})
    return out


def demo_loads(text: str) -> dict[str, list[float]]:
    """``--demo-load``: "json=0.1,binary=0.35/0.42" -> {"json": [0.1], "binary": [0.35, 0.42]}."""
    out: dict[str, list[float]] = {}
    for part in filter(None, text.split(",")):
        key, sep, values = part.partition("=")
        try:
            loads = [float(v) for v in values.split("/")]
        except ValueError:
            loads = []
        if not sep or key not in ("json", "binary") or not loads or not all(0 < v <= 10 for v in loads):
            raise ValueError(f"--demo-load: {part!r} is not ENCODING=F[/F...] with ENCODING json or binary "
                             "and each F in (0, 10]")
        out[key] = loads
    return out


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, dict[str, dict[str, Any]], str, float | None]]:
    """(peer, scenario, config label, models, tensors, demo load) in run order: peers alternate
    within each scenario, so a slow minute of the shared machine does not fall on one peer alone,
    and the order of the peers turns by one for each configuration and load, so no peer always
    runs first, or always right after the same other one."""
    runs = []
    turn = 0
    for scenario in args.scenarios:
        for tensors in args.tensors:
            loads: list[float | None] = [None]
            if scenario == "demo":
                loads = list(args.demo_loads.get(tensors, [1.0]))
            for load in loads:
                for label, models in configs(scenario):
                    peers = [p for p in args.peers if tensors == "json" or p in BINARY]
                    k = turn % len(peers) if peers else 0
                    turn += 1
                    for peer in peers[k:] + peers[:k]:
                        runs.append((peer, scenario, label, models, tensors, load))
    return runs


def every_slo_met(r: Row) -> bool:
    """Whether a measured demo row met the SLO of each of its models."""
    return all(m["slo_met"] for m in r.figures["per_model"].values())


def best_goodput(rows: list[Row]) -> list[tuple[str, Row]]:
    """Each server's best demo row: the highest goodput among rows that met every SLO, else
    the highest of all (server order kept; servers without a measured row left out)."""
    return _best(rows, "demo", lambda r: (every_slo_met(r), r.figures["goodput"]))


def best_throughput(rows: list[Row]) -> list[tuple[str, Row]]:
    """Each server's MLP row with the most req/s, over every configuration and encoding
    (server order kept; servers without a measured row left out)."""
    return _best(rows, "mlp256", lambda r: r.figures["rps"])


def _best(rows: list[Row], scenario: str, key: Any) -> list[tuple[str, Row]]:
    best: dict[str, Row] = {}
    for r in rows:
        if r.scenario != scenario or r.error or not r.figures:
            continue
        if r.peer not in best or key(r) > key(best[r.peer]):
            best[r.peer] = r
    return list(best.items())


def configs(scenario: str) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    if scenario == "noop":
        return [("1 instance", {"noop": {"instances": 1}})]
    if scenario == "mlp256":
        return [(label, {"mlp256": dict(c)}) for label, c in MLP_CONFIGS.items()]
    return [(label, {n: dict(c) for n in ("mlp", "conv", "encoder")}) for label, c in DEMO_CONFIGS.items()]


def _ms(value: float | None, digits: int) -> str:
    """A latency cell: "-" for a row in which nothing completed (every request an error)."""
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    out = []
    for scenario, head in (("noop", "| server | tensors | p50 ms | p99 ms | req/s |"),
                           ("mlp256", "| server | configuration | tensors | req/s | p50 ms | p99 ms |"),
                           ("demo", "| server | configuration | offered/s | req/s | goodput/s | SLOs met (mlp, conv, encoder) |")):
        sel = [r for r in rows if r.scenario == scenario]
        if not sel:
            continue
        out += ["", f"**{scenario}**", "", head, "|" + "---|" * (head.count("|") - 1)]
        for r in sel:
            f = r.figures
            if r.error:
                out.append(f"| {r.peer} | {r.tensors if scenario == 'noop' else r.config} | failed: "
                           f"{r.error[:300]} |")
                continue
            note = "" if f["stable"] else " (not stable)"
            note += " (server started twice)" if r.restarted else ""
            errs = ", ".join(f"{k} x{v}" for k, v in sorted(f["errors"].items()))
            note += f" errors: {errs}" if errs else ""
            if scenario == "noop":
                out.append(f"| {r.peer}{note} | {r.tensors} | {_ms(f['p50_ms'], 2)} | {_ms(f['p99_ms'], 2)} | "
                           f"{f['rps']:.0f} |")
            elif scenario == "mlp256":
                out.append(f"| {r.peer}{note} | {r.config} | {r.tensors} | {f['rps']:.0f} | {_ms(f['p50_ms'], 1)} | "
                           f"{_ms(f['p99_ms'], 1)} |")
            else:
                met = ", ".join("yes" if m["slo_met"] else "no" for m in f["per_model"].values())
                out.append(f"| {r.peer}{note} | {r.config}, {r.tensors}, load {r.load:g} | {f['offered']:.0f} | "
                           f"{f['throughput']:.0f} | {f['goodput']:.0f} | {met} |")
    fastest = best_throughput(rows)
    if fastest:
        out += ["", "**mlp256: each server's best throughput** (over every configuration and encoding)", "",
                "| server | req/s | p99 ms | configuration |", "|---|---|---|---|"]
        for peer, r in fastest:
            out.append(f"| {peer} | {r.figures['rps']:.0f} | {_ms(r.figures['p99_ms'], 1)} | {r.config}, {r.tensors} |")
    best = best_goodput(rows)
    if best:
        out += ["", "**demo: each server's best goodput** (over every configuration and load; one that met "
                "every SLO first)", "", "| server | goodput/s | every SLO met | configuration |", "|---|---|---|---|"]
        for peer, r in best:
            out.append(f"| {peer} | {r.figures['goodput']:.0f} | {'yes' if every_slo_met(r) else 'no'} | "
                       f"{r.config}, {r.tensors}, load {r.load:g} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--scenarios", default="noop,mlp256,demo")
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--window-s", type=float, default=3.0, help="3 windows of this are measured per run")
    p.add_argument("--server-cpus", default=None, help="CPUs every server is pinned to (default: all)")
    p.add_argument("--client-cpus", default=None, help="CPUs the load client is pinned to (default: all)")
    p.add_argument("--tensors", default="json",
                   help="json, binary or json,binary")
    p.add_argument("--demo-load", default="json=0.1,binary=0.35/0.5/0.65/0.8/0.9/1.0",
                   help="fractions of the demo's full rate by tensor encoding, several separated by / "
                        "(default json=0.1,binary=0.35/0.5/0.65/0.8/0.9/1.0)")
    p.add_argument("--request-timeout-s", type=float, default=5.0,
                   help="a request unanswered after this counts as failed (default 5)")
    p.add_argument("--apportion-loop", default="auto", choices=("auto", "uvloop", "asyncio"),
                   help="apportion serve's event loop (its --loop; default auto: uvloop where installed)")
    args = p.parse_args()
    args.peers = [x for x in args.peers.split(",") if x]
    args.scenarios = [x for x in args.scenarios.split(",") if x]
    args.tensors = [x for x in args.tensors.split(",") if x]
    # Stopped with SIGTERM, the run still stops the server it started (SystemExit runs the
    # loop's `finally`): a Ray or Triton server left behind would load the machine.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    allowed = sorted(os.sched_getaffinity(0))
    server_cpus = [int(c) for c in args.server_cpus.split(",")] if args.server_cpus else allowed
    client_cpus = [int(c) for c in args.client_cpus.split(",")] if args.client_cpus else allowed
    BUILD.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))

    from apportion import demo

    per_request = demo.single_thread_ms()
    full_rate = demo.demo_config(load=1.0, per_request_ms=per_request, cpus=len(server_cpus)).rate
    try:
        args.demo_loads = demo_loads(args.demo_load)
    except ValueError as e:
        p.error(str(e))
    print(f"# {platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; servers on CPUs {server_cpus}, client on {client_cpus}; "
          f"demo one-thread ms {({k: round(v, 2) for k, v in per_request.items()})}, demo full rate {full_rate}/s, "
          f"run at {args.demo_loads} of it; apportion serve --loop {args.apportion_loop}",
          flush=True)
    rows: list[Row] = []
    broken: dict[str, str] = {}
    for peer in args.peers:
        if peer != "apportion" and not (BUILD / venv(peer) / ".installed").exists():
            log = BUILD / f"{venv(peer)}.log"
            broken[peer] = "not installed: " + (log.read_text(errors="replace")[-600:].strip().replace("\n", " | ")
                                                if log.exists() else "no install log")
    t0 = time.monotonic()
    for peer, scenario, label, models, tensors, load in plan(args):
        row = Row(peer, scenario, label, tensors, load)
        rows.append(row)
        if peer in broken:
            row.error = broken[peer]
            continue
        specs, inputs = scenario_loads(scenario, full_rate * (load or 1.0))
        slo = {n: demo.SLO_MS[n] for n in models if n in demo.SLO_MS}
        log = BUILD / f"server-{peer}-{scenario}-{len(rows)}.log"
        waited = settle()
        if waited > 2.0:
            print(f"  (waited {waited:.1f} s for the CPUs to go idle before this row)", flush=True)
        shm_before = shm_entries()
        servers: list[Server] = []

        def start(again: bool) -> Server:  # called in this iteration only
            servers.append(Server(peer, models, server_cpus, slo,
                                  log.with_name(log.stem + "-again.log") if again else log, args.apportion_loop))
            return servers[-1]

        try:
            server, row.restarted = start_ready(start, list(models))
            url = server.url
            report = bench(url, specs, inputs, tensors, client_cpus, args)
            row.figures = figures(scenario, report)
        except Exception as e:  # noqa: BLE001 - recorded in the table; the run goes on
            row.error = f"{type(e).__name__}: {e}"
        finally:
            for server in servers:
                server.stop()
            clean_shm(shm_before)
        status = row.error or json.dumps({k: v for k, v in row.figures.items() if k != "per_model"})
        at = f" load {load:g}" if load is not None else ""
        print(f"[{time.monotonic() - t0:5.0f} s] {peer:9s} {scenario:6s} {label:32s} {tensors:6s}{at} {status}",
              flush=True)
    (BUILD / "results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
