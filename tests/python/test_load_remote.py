"""`apportion bench --url` / load.RemoteTarget: the load generator driving `apportion serve`
(started here on 127.0.0.1) over v2 HTTP and gRPC through tritonclient. Every run is bounded
in time (max_s) and every request is accounted for exactly once, against the server's own
counters read from /metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import apportion as ap  # noqa: E402
from apportion import load  # noqa: E402
from apportion.cli import main  # noqa: E402

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.timeout(180)

VEC = """
inputs = [{ name = "x", datatype = "FP32", shape = [-1] }]
outputs = [{ name = "y", datatype = "FP32", shape = [-1] }]
"""
CONFIG = f"""
[models.double]
factory = "process_models:doubler"
instances = 2
max_queue = 2
[models.double.signature]
{VEC}
[models.tight]
factory = "remote_models:slow"
max_queue = 1
[models.tight.signature]
{VEC}
[models.slow]
factory = "remote_models:slow"
# expired requests may hold their queue slots until a worker reaches them: a queue this
# deep never refuses the errors test's expiring load
max_queue = 4096
[models.slow.signature]
{VEC}
[models.fails]
factory = "remote_models:fails"
[models.fails.signature]
{VEC}
[models.sleepy]
factory = "remote_models:sleepy"
instances = 2
[models.sleepy.signature]
{VEC}
[models.adder]
factory = "remote_models:adder"
[models.adder.signature]
inputs = [{{ name = "a", datatype = "INT32", shape = [-1] }}, {{ name = "b", datatype = "FP32", shape = [-1] }}]
outputs = [{{ name = "sum", datatype = "FP32", shape = [-1] }}]
"""
SHORT = {"warmup_s": 0.1, "window_s": 0.2, "stable_windows": 2, "max_s": 1.5}


class Serve:
    """`apportion serve CONFIG` in a child process on free ports of 127.0.0.1."""

    def __init__(self, tmp: Path) -> None:
        cfg = tmp / "serve.toml"
        cfg.write_text(CONFIG)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
        self.proc = subprocess.Popen([sys.executable, "-m", "apportion", "serve", str(cfg), "--http-port", "0",
                                      "--grpc-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+), v2 gRPC on 127\.0\.0\.1:(\d+)", line)
        if not m:
            self.close()
            raise AssertionError(f"apportion serve did not start: {line!r}")
        self.http = f"http://127.0.0.1:{m.group(1)}"
        self.grpc = f"grpc://127.0.0.1:{m.group(2)}"

    def url(self, scheme: str) -> str:
        return self.http if scheme == "http" else self.grpc

    def counts(self, model: str) -> dict[str, float]:
        text = httpx.get(f"{self.http}/metrics", timeout=30).text
        return {s.labels["outcome"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "apportion_requests_total" and s.labels.get("model") == model}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    s = Serve(tmp_path_factory.mktemp("serve"))
    try:
        yield s
    finally:
        s.close()


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: int(after[k] - before.get(k, 0)) for k in after}


def accounted(t: load.Totals) -> int:
    return t.completed + t.rejected + t.expired + t.failed + t.cancelled + t.unfinished


# -- counts against the server's ------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_closed_loop_counts_match_the_server(server: Serve, scheme: str) -> None:
    before = server.counts("tight")
    with load.RemoteTarget(server.url(scheme), ["tight"]) as target:
        assert target.models == ["tight"]
        report = load.run(target, load.ModelLoad("tight", concurrency=8,
                                                 inputs=lambda: np.arange(4, dtype=np.float32)), **SHORT)
    got = delta(server.counts("tight"), before)
    m = report["tight"]
    t = m.totals
    assert report.target == server.url(scheme) and report.unfinished == 0
    # 8 in flight against one 20 ms instance and a queue of 1: the server refuses some
    assert t.rejected > 0 and t.completed > 0
    assert t.offered == t.submitted == accounted(t)  # every request sent ended once
    assert (t.completed, t.rejected, t.failed, t.expired) == (
        got["completed"], got["rejected"], got["failed"], got["expired"])
    kind = "http 429" if scheme == "http" else "grpc RESOURCE_EXHAUSTED"
    assert t.errors == {kind: t.rejected}
    assert m.errors.get(kind, 0) == m.rejected <= t.rejected
    assert m.completed <= t.completed and m.queue_wait is None and m.compute is None
    assert f"errors of tight: {kind} x{m.rejected}" in str(report) or m.rejected == 0


def test_open_loop_over_the_network_counts_every_arrival(server: Serve) -> None:
    before = server.counts("slow")
    with load.RemoteTarget(server.http, ["slow"]) as target:
        report = load.run(target, load.ModelLoad("slow", rate=30.0, arrivals="constant"), seed=1, **SHORT)
    got = delta(server.counts("slow"), before)
    t = report["slow"].totals
    assert report["slow"].mode == "open" and t.offered > 0
    assert t.offered == accounted(t) and t.completed == got["completed"] and t.unfinished == 0


def test_an_open_loop_at_a_rate_too_small_to_send_anything_ends_on_time(server: Serve) -> None:
    # The first arrival lies beyond any clock: 1e-300/s overflowed the conversion to nanoseconds.
    with load.RemoteTarget(server.url("http"), ["double"]) as target:
        t0 = time.monotonic()
        report = load.run(target, load.ModelLoad("double", rate=1e-300), warmup_s=0.05, window_s=0.1, max_s=0.5)
        assert report["double"].offered == 0 and time.monotonic() - t0 < 5.0


# -- errors by kind -------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,failed,expired", [("http", "http 500", "http 504"),
                                                   ("grpc", "grpc INTERNAL", "grpc DEADLINE_EXCEEDED")])
def test_errors_are_counted_by_kind(server: Serve, scheme: str, failed: str, expired: str) -> None:
    url = server.url(scheme)
    before = {m: server.counts(m) for m in ("fails", "slow")}
    with load.RemoteTarget(url, ["fails", "slow"]) as target:
        report = load.run(target, [
            load.ModelLoad("fails", concurrency=2),
            # one instance at 20 ms a call, 6 in flight with a 1 ms deadline: queued ones expire
            load.ModelLoad("slow", concurrency=6, slo=load.SLO(timeout_ms=1.0)),
        ], **SHORT)
    f, s = report["fails"].totals, report["slow"].totals
    assert f.failed > 0 and f.completed == 0 and f.errors == {failed: f.failed}
    assert f.failed == delta(server.counts("fails"), before["fails"])["failed"]
    assert s.expired > 0 and s.errors == {expired: s.expired}
    got = delta(server.counts("slow"), before["slow"])
    assert (s.completed, s.expired) == (got["completed"], got["expired"])
    assert f.offered == accounted(f) and s.offered == accounted(s)


def test_a_request_with_no_answer_in_time_fails_as_client_timeout(server: Serve) -> None:
    with load.RemoteTarget(server.http, ["sleepy"], request_timeout_s=0.2) as target:
        fut = target.submit("sleepy", np.ones(2, np.float32))
        assert not fut.cancel()  # in flight: it cannot be taken back
        exc = fut.exception(30)
    assert isinstance(exc, load.RemoteError) and exc.kind == "client timeout"
    assert "'sleepy'" in str(exc) and "0.2 s" in str(exc)


def test_a_server_that_goes_away_fails_requests_as_connection_errors() -> None:
    from apportion.serve import Server, Signature, TensorSpec

    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: x)
    rt.start()
    sig = Signature([TensorSpec("x", "FP32", [-1])], [TensorSpec("y", "FP32", [-1])])
    server = Server(rt, {"echo": sig}, http_port=0, grpc_port=None).start()
    try:
        target = load.RemoteTarget(f"http://127.0.0.1:{server.http_port}", ["echo"], request_timeout_s=10)
        assert target.submit("echo").result(30) is not None
    finally:
        server.stop()
        rt.close()
    with target:
        exc = target.submit("echo").exception(30)
        assert isinstance(exc, load.RemoteError) and exc.kind == "connection"
        # A closed loop against it pauses after each refused connection: the failures count
        # requests, not a retry spin (2 clients made ~8,000 "requests" in 3 s).
        report = load.run(target, load.ModelLoad("echo", concurrency=2), warmup_s=0.1, window_s=0.25,
                          stable_windows=2, max_s=0.6)
        assert 0 < report["echo"].totals.failed <= 2 * 0.6 / 0.001
    with pytest.raises(load.RemoteError, match="closed"):
        target.submit("echo")


# -- inputs -----------------------------------------------------------------------------------------
def test_inputs_convert_to_the_declared_datatypes(server: Serve) -> None:
    torch = pytest.importorskip("torch")

    with load.RemoteTarget(server.grpc, ["adder", "double"]) as target:
        r = target.submit("adder", {"a": [1, 2], "b": np.array([0.5, 0.5])}).result(30)
        np.testing.assert_array_equal(r.as_numpy("sum"), np.array([1.5, 2.5], np.float32))
        r = target.submit("double", torch.arange(3, dtype=torch.float64)).result(30)
        np.testing.assert_array_equal(r.as_numpy("y"), np.array([0, 2, 4], np.float32))
        r = target.submit("double").result(30)  # None: zeros of the declared shape, -1 as 1
        np.testing.assert_array_equal(r.as_numpy("y"), np.zeros(1, np.float32))
        with pytest.raises(load.LoadError, match=r"model 'adder': field 'inputs'.*\['a', 'b'\]"):
            target.submit("adder", np.ones(2))
        with pytest.raises(load.LoadError, match=r"model 'adder': field 'inputs'.*got \['a'\]"):
            target.submit("adder", {"a": np.ones(2)})
        with pytest.raises(load.LoadError, match=r"model 'double': input 'x': cannot send it as FP32"):
            target.submit("double", np.array(["a"]))
        with pytest.raises(ap.ModelNotFound, match="'slow'"):
            target.submit("slow")


def test_json_tensors_over_http(server: Serve) -> None:
    before = server.counts("adder")
    with load.RemoteTarget(server.http, ["adder"], tensors="json") as target:
        r = target.submit("adder", {"a": [1, 2], "b": [0.5, 0.25]}).result(30)
        assert "data" in r.get_output("sum")  # asked for, and answered, as JSON
        np.testing.assert_array_equal(r.as_numpy("sum"), np.array([1.5, 2.25], np.float32))
        report = load.run(target, load.ModelLoad("adder", concurrency=2, inputs=lambda: {"a": [1], "b": [2.0]}),
                          **SHORT)
    assert report["adder"].totals.completed + 1 == delta(server.counts("adder"), before)["completed"]
    with pytest.raises(load.LoadError, match="over HTTP, 'json'"):
        load.RemoteTarget(server.grpc, ["adder"], tensors="json")
    with pytest.raises(load.LoadError, match="tensors must be"):
        load.RemoteTarget(server.http, ["adder"], tensors="xml")


@pytest.mark.parametrize("mode", [{"concurrency": 1}, {"rate": 50.0}])
def test_a_bad_input_stops_the_run_naming_the_model(server: Serve, mode: dict) -> None:
    with load.RemoteTarget(server.http, ["adder"]) as target:
        with pytest.raises(load.LoadError, match="model 'adder'") as err:
            load.run(target, load.ModelLoad("adder", inputs=lambda: np.ones(2), **mode), **SHORT)
    assert "driving model 'adder'" in "".join(err.value.__notes__)


# -- the load runs on the target's event loop ---------------------------------------------------------
def test_the_load_runs_on_the_targets_loop_thread(server: Serve) -> None:
    # Each request is made, sent and accounted for on the client's event loop: no thread
    # hand-off per request (inputs are drawn there too).
    seen: set[str] = set()

    def make() -> np.ndarray:
        import threading

        seen.add(threading.current_thread().name)
        return np.arange(2, dtype=np.float32)

    with load.RemoteTarget(server.http, ["double"]) as target:
        report = load.run(target, [load.ModelLoad("double", concurrency=2, inputs=make)], **SHORT)
    assert seen == {"apportion-load-remote"}
    assert report["double"].totals.completed > 0


@pytest.mark.parametrize("mode", [{"concurrency": 3}, {"rate": 200.0}])
def test_inputs_that_run_out_end_the_run_with_every_request_answered(server: Serve, mode: dict) -> None:
    before = server.counts("double")
    with load.RemoteTarget(server.http, ["double"]) as target:
        report = load.run(target, load.ModelLoad("double", inputs=iter([np.ones(1, np.float32)] * 7), **mode),
                          **{**SHORT, "max_s": 20.0})
    m = report["double"]
    assert m.inputs_exhausted and m.totals.offered == m.totals.submitted == 7
    assert m.totals.completed + m.totals.rejected == 7 and m.totals.unfinished == 0
    assert m.totals.completed == delta(server.counts("double"), before)["completed"]


def test_answers_still_outstanding_after_the_drain_are_counted_unfinished(server: Serve) -> None:
    # sleepy answers after 2 s; the run ends after 0.5 s and waits 0.2 s for the answers
    with load.RemoteTarget(server.http, ["sleepy"], request_timeout_s=30) as target:
        report = load.run(target, load.ModelLoad("sleepy", concurrency=2), warmup_s=0.1, window_s=0.2,
                          stable_windows=2, max_s=0.5, drain_timeout_s=0.2)
    t = report["sleepy"].totals
    assert t.offered == 2 and t.unfinished == 2 and report.unfinished == 2
    assert t.completed == t.failed == 0


# -- connecting -------------------------------------------------------------------------------------
@pytest.mark.parametrize("url,message", [
    ("127.0.0.1:8000", "expected http://HOST:PORT or grpc://HOST:PORT"),
    ("https://127.0.0.1:8000", "expected http://HOST:PORT"),
    ("http://127.0.0.1", "give the port"),
    ("http://127.0.0.1:8000/v2", "expected http://HOST:PORT"),
    ("http://[::1", "Invalid IPv6 URL; expected http://HOST:PORT"),
])
def test_malformed_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(load.LoadError, match=re.escape(message)):
        load.RemoteTarget(url, ["m"])


def test_no_models_or_a_bad_timeout_are_refused(server: Serve) -> None:
    with pytest.raises(load.LoadError, match="at least one model"):
        load.RemoteTarget(server.http, [])
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(load.LoadError, match="request_timeout_s must be a positive, finite number"):
            load.RemoteTarget(server.http, ["double"], request_timeout_s=bad)


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_unknown_models_and_unreachable_servers(server: Serve, scheme: str) -> None:
    with pytest.raises(ap.ModelNotFound, match=r"model 'nope': field 'model': the server at .* does not serve it") as nf:
        load.RemoteTarget(server.url(scheme), ["double", "nope"])
    assert nf.value.model == "nope"
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(load.RemoteError, match="reading model 'double'") as err:
        load.RemoteTarget(f"{scheme}://127.0.0.1:{port}", ["double"], request_timeout_s=5)
    assert err.value.kind in ("connection", "grpc UNAVAILABLE")


# -- the command line -------------------------------------------------------------------------------
def test_bench_url_prints_the_same_report_as_in_process(server: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))  # for --inputs remote_models:pair
    before = server.counts("double")
    out = StringIO()
    rc = main(["bench", "--url", server.grpc, "--model", "double:concurrency=2,latency_ms=500",
               "--warmup-s", "0.1", "--window-s", "0.2", "--max-s", "1.5", "--json"], out=out)
    assert rc == 0
    doc = json.loads(out.getvalue())
    d = doc["models"]["double"]
    assert doc["target"] == server.grpc and d["load"] == "closed x2" and d["slo_met"] is True
    assert d["totals"]["completed"] == delta(server.counts("double"), before)["completed"] > 0
    out = StringIO()
    assert main(["bench", "--url", server.http, "--model", "adder:concurrency=1",
                 "--inputs", "adder=remote_models:pair", "--warmup-s", "0.1", "--window-s", "0.2",
                 "--max-s", "1.0"], out=out) == 0
    text = out.getvalue()
    assert text.startswith(f"{server.http}: ") and "adder" in text and "closed x1" in text


def test_bench_url_reads_loads_from_a_config(server: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    cfg = tmp_path / "load.toml"
    # the factories are never imported: the server builds the models
    cfg.write_text('[models.double]\nfactory = "never:imported"\nload = { concurrency = 1 }\n'
                   'inputs = "remote_models:vector"\n[models.adder]\nfactory = "never:imported"\n'
                   'inputs = "remote_models:pair"\n')
    out = StringIO()
    rc = main(["bench", str(cfg), "--url", server.http, "--model", "adder:concurrency=1",
               "--warmup-s", "0.1", "--window-s", "0.2", "--max-s", "1.0", "--json"], out=out)
    assert rc == 0
    doc = json.loads(out.getvalue())
    assert {n: m["load"] for n, m in doc["models"].items()} == {"adder": "closed x1", "double": "closed x1"}
    assert all(m["completed"] > 0 and m["failed"] == 0 for m in doc["models"].values())
    err = StringIO()
    assert main(["bench", str(cfg), "--url", server.http, "--inputs", "adder=remote_models:pair"],
                out=StringIO(), err=err) == 2
    assert "--inputs" in err.getvalue() and "inputs keys" in err.getvalue()


@pytest.mark.parametrize("argv,flag,message", [
    (["--url", "http://127.0.0.1:1", "--model", "m:concurrency=1", "--factory", "m=a:b"], "--factory",
     "does not apply with --url"),
    (["--url", "http://127.0.0.1:1"], "--model", "give CONFIG or at least one --model SPEC"),
    (["--url", "ftp://127.0.0.1:1", "--model", "m:concurrency=1"], "--url", "expected http://HOST:PORT"),
    (["--url", "http://127.0.0.1:1", "--model", "m:concurrency=1", "--inputs", "n=a:b"], "--inputs",
     "model 'n' has no --model SPEC"),
    (["--url", "http://[::1", "--model", "m:concurrency=1"], "--url", "Invalid IPv6 URL"),
    (["--url", "http://127.0.0.1:1", "--model", "m:concurrency=1", "--request-timeout-s", "inf"],
     "--request-timeout-s", "finite number > 0"),
    (["--url", "http://127.0.0.1:1", "--model", "m:concurrency=1", "--max-s", "0"], "--max-s", "finite number > 0"),
    (["--url", "http://127.0.0.1:1", "--model", "m:concurrency=1", "--window-s", "-3"], "--window-s",
     "finite number in [0.001, 1e+09]"),
    (["--url", "http://127.0.0.1:1", "--model", "m:concurrency=1", "--model", "m:rate=5"], "--model",
     "model 'm' is given more than once"),
    # checked before connecting: nothing listens on port 1, and the error is the load's
    (["--url", "http://127.0.0.1:1", "--model", "m:concurrency=0"], "--model", "concurrency must be an integer in 1..65536"),
    # a task per client: 10**20 of them was memory exhaustion, not an error
    (["--url", "http://127.0.0.1:1", "--model", "m:concurrency=100000000000000000000"], "--model",
     "concurrency must be an integer in 1..65536"),
    (["--url", "http://127.0.0.1:1", "--model", "m:rate=nan"], "--model", "rate"),
    (["--url", "http://127.0.0.1:1", "--model", "m:rate=inf"], "--model", "rate"),
])
def test_bench_url_usage_errors(argv: list[str], flag: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = StringIO()
    try:
        rc = main(["bench", *argv], out=StringIO(), err=err)
    except SystemExit as e:  # argparse's own usage errors (a bad number) exit 2 with its message on stderr
        rc = e.code
    text = err.getvalue() + capsys.readouterr().err
    assert rc == 2, text
    assert flag in text and message in text, text


def test_bench_url_against_nothing_listening_fails_cleanly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = StringIO()
    rc = main(["bench", "--url", f"http://127.0.0.1:{port}", "--model", "m:concurrency=1",
               "--request-timeout-s", "5"], out=StringIO(), err=err)
    assert rc == 1 and "apportion bench: error: connection" in err.getvalue()


# -- what an adversarial review found -------------------------------------------------------------
def test_an_open_loop_far_beyond_the_client_ends_near_max_s_and_says_it_fell_behind(server: Serve) -> None:
    # Behind schedule the arrivals loop made tasks without ever letting one run: nothing was
    # sent, every window read idle ("stable", 0 req/s), and the run took 45 s against max_s 1.5.
    with load.RemoteTarget(server.http, ["double"]) as target:
        t0 = time.monotonic()
        report = load.run(target, load.ModelLoad("double", rate=200_000.0, arrivals="constant"),
                          drain_timeout_s=2.0, **SHORT)
        took = time.monotonic() - t0
    m = report["double"]
    assert took < 1.5 + 2.0 + 5.0, took
    assert m.completed > 0 and m.offered_rate < 0.95 * 200_000
    text = str(report)
    assert "double: the generator fell behind: it offered" in text and "the client, not the model" in text
    assert m.totals.offered == accounted(m.totals)


def test_an_inputs_callable_that_refills_one_buffer_sends_its_current_values(server: Serve) -> None:
    # The encoded tensors were cached by the object's identity: over HTTP every request
    # carried the first values.
    buf = np.zeros(1, dtype=np.float32)
    values = iter(range(1, 10_000))

    def refill() -> np.ndarray:
        buf[0] = next(values)
        return buf

    with load.RemoteTarget(server.http, ["double"]) as target:
        sent = [target.submit("double", refill()).result(30).as_numpy("y").tolist() for _ in range(5)]
    assert sent == [[2.0], [4.0], [6.0], [8.0], [10.0]]
    # A read-only array that owns its data cannot change: sent as encoded the first time.
    frozen = np.full(1, 3.0, dtype=np.float32)
    frozen.flags.writeable = False
    with load.RemoteTarget(server.http, ["double"]) as target:
        assert [target.submit("double", frozen).result(30).as_numpy("y").tolist() for _ in range(2)] == [[6.0]] * 2
        assert target._prepared["double"][0] is frozen


def test_closed_loop_clients_beyond_the_http_connections_are_refused(server: Serve) -> None:
    # The 257th client waited for a connection in the client, which read as the server's latency.
    with load.RemoteTarget(server.http, ["double"], connections=4) as target:
        with pytest.raises(load.LoadError, match=r"5 closed-loop clients need as many HTTP connections; the "
                                                 r"target keeps 4 \(RemoteTarget\(connections=\.\.\.\)\)"):
            load.run(target, load.ModelLoad("double", concurrency=5), **SHORT)
        assert target.connections == 4


@pytest.mark.parametrize(("scheme", "status", "message", "error", "kind"), [
    ("grpc", "StatusCode.UNAVAILABLE", "Exceeds maximum queue size", "RemoteRejected", "grpc UNAVAILABLE"),
    ("grpc", "StatusCode.UNAVAILABLE", "Request timeout expired", "RemoteExpired", "grpc UNAVAILABLE"),
    ("grpc", "StatusCode.UNAVAILABLE", "model m: draining", "RemoteError", "grpc UNAVAILABLE"),
    ("http", "429", "Request dropped due to backpressure (num_queued_requests=3, max_queued_requests=3).",
     "RemoteRejected", "http 429"),
    ("http", "400", "request timeout expired", "RemoteExpired", "http 400"),
    ("grpc", None, "failed to connect", "RemoteError", "connection"),
])
def test_one_status_for_several_outcomes_is_told_apart_by_the_servers_words(
        scheme: str, status: str | None, message: str, error: str, kind: str) -> None:
    from apportion.load import remote

    e = remote.classify(scheme, status, message)
    assert type(e).__name__ == error and e.kind == kind and message in str(e)
