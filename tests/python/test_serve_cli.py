"""`apportion serve CONFIG`: a config file's models served over v2 HTTP and gRPC by the CLI,
called with the real tritonclient, scraped with prometheus_client's parser, stopped with
SIGTERM (drains, exits 0); and the config errors of a signature."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

th = pytest.importorskip("tritonclient.http")
tg = pytest.importorskip("tritonclient.grpc")
httpx = pytest.importorskip("httpx")

import apportion as ap  # noqa: E402
from apportion.config import Config  # noqa: E402
from apportion.serve import signatures  # noqa: E402

HERE = Path(__file__).resolve().parent

CONFIG = """
[models.double]
factory = "process_models:doubler"
instances = 2
warmup = [[1.0, 2.0]]
[models.double.signature]
inputs = [{ name = "x", datatype = "FP32", shape = [-1] }]
outputs = [{ name = "y", datatype = "FP32", shape = [-1] }]

[models.helper]
factory = "process_models:echo"
"""


@contextlib.contextmanager
def serving(cfg: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`apportion serve CFG --http-port 0 ARGS...` in a process of its own: yields it and the line it
    prints once its ports listen; kills it if the test left it running."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    proc = subprocess.Popen([sys.executable, "-m", "apportion", "serve", str(cfg), "--http-port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the ports listen
        assert "v2 HTTP on" in line, line + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        yield proc, line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_for_metric(http: str, sample: str) -> None:
    """Polls http's /metrics until a line starts with ``sample`` (a sample and its value)."""
    for _ in range(3000):
        if any(line.startswith(sample) for line in httpx.get(f"http://{http}/metrics").text.splitlines()):
            return
        time.sleep(0.01)
    raise AssertionError(f"/metrics never showed {sample}")


@pytest.mark.parametrize(("args", "loop"), [([], "uvloop"), (["--loop", "asyncio"], "asyncio")])
def test_the_cli_serves_a_config_over_http_and_grpc_and_drains_on_sigterm(tmp_path: Path, args: list[str],
                                                                         loop: str) -> None:
    cfg = tmp_path / "serve.toml"
    cfg.write_text(CONFIG)
    with serving(cfg, "--grpc-port", "0", *args) as (proc, line):
        m = re.search(r"v2 HTTP on http://127\.0\.0\.1:(\d+), v2 gRPC on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        assert line.startswith("serving double:")  # only the model with a signature
        assert f"({loop} loop)" in line, line  # uvloop: the default where installed (the test extra)
        http, grpc = f"127.0.0.1:{m.group(1)}", f"127.0.0.1:{m.group(2)}"

        client = th.InferenceServerClient(http)
        assert client.is_server_ready() and client.is_model_ready("double")
        x = np.array([1.5, -2.0, 3.0], dtype=np.float32)
        inp = th.InferInput("x", [3], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("double", [inp]).as_numpy("y"), 2 * x)

        gclient = tg.InferenceServerClient(grpc)
        ginp = tg.InferInput("x", [3], "FP32")
        ginp.set_data_from_numpy(x)
        np.testing.assert_array_equal(gclient.infer("double", [ginp]).as_numpy("y"), 2 * x)

        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://{http}/metrics").text
        completed = {s.labels["model"]: s.value for fam in text_string_to_metric_families(text)
                     for s in fam.samples
                     if s.name == "apportion_requests_total" and s.labels.get("outcome") == "completed"}
        assert completed["double"] == 2  # warm-up calls are not requests

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_the_cli_passes_the_server_options(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.toml"
    cfg.write_text('[models.nap]\nfactory = "process_models:sleeper"\nmax_queue = 1\n[models.nap.signature]\n'
                   'inputs = [{ name = "x", datatype = "FP32", shape = [1] }]\n'
                   'outputs = [{ name = "y", datatype = "FP32", shape = [1] }]\n')
    with serving(cfg, "--grpc-port", "-1", "--max-body-bytes", "300", "--queue-full-status", "503",
                 "--drain-timeout-s", "20", "--body-timeout-s", "0.5", "--max-header-bytes", "2048") as (proc, line):
        m = re.search(r"v2 HTTP on http://(127\.0\.0\.1:\d+) ", line)
        assert m, line
        http = m.group(1)
        url = f"http://{http}/v2/models/nap/infer"

        def body(seconds: float, pad: int = 0) -> bytes:
            return json.dumps({"id": " " * pad, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                                            "data": [seconds]}]}).encode()

        r = httpx.post(url, content=body(0.0, pad=300), timeout=30)
        assert r.status_code == 413 and "limit of 300 bytes" in r.json()["error"], r.text
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, url, content=body(3.0), timeout=30)  # runs 3 s
            wait_for_metric(http, 'apportion_in_flight{model="nap"} 1.0')
            queued = pool.submit(httpx.post, url, content=body(0.0), timeout=30)  # waits in the queue
            wait_for_metric(http, 'apportion_queue_depth{model="nap"} 1.0')
            r = httpx.post(url, content=body(0.0), timeout=30)
            assert r.status_code == 503 and "retry-after" not in r.headers, r.text  # 503, not 429
            assert first.result().status_code == 200 and queued.result().status_code == 200
        host, port = http.split(":")
        with socket.create_connection((host, int(port)), timeout=30) as c:  # a body that stops
            c.sendall(b"POST /v2/models/nap/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n{")
            assert c.recv(65536).startswith(b"HTTP/1.1 408")
        r = httpx.get(f"http://{http}/v2/health/ready", headers={"x-pad": "p" * 3000}, timeout=30)
        assert r.status_code == 431 and "limit of 2048 bytes" in r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


@pytest.mark.parametrize("option,value", [("--max-body-bytes", "0"), ("--max-body-bytes", "1.5"),
                                          ("--max-header-bytes", "1023"), ("--max-header-bytes", "x"),
                                          ("--drain-timeout-s", "-1"), ("--drain-timeout-s", "nan"),
                                          ("--queue-full-status", "500"), ("--http-port", "99999"),
                                          ("--http-port", "-1"), ("--grpc-port", "-2"), ("--grpc-port", "x"),
                                          ("--body-timeout-s", "0"), ("--body-timeout-s", "inf"),
                                          ("--write-timeout-s", "0"), ("--write-timeout-s", "nan")])
def test_bad_server_options_are_usage_errors(option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from apportion.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "unused.toml", option, value])
    assert info.value.code == 2
    assert option in capsys.readouterr().err


def _cfg(signature: str) -> str:
    return f'[models.m]\nfactory = "process_models:echo"\n[models.m.signature]\n{signature}\n'


@pytest.mark.parametrize("signature,key,message", [
    ('inputs = []\noutputs = [{ name = "y", datatype = "FP32", shape = [-1] }]', "models.m.signature.inputs",
     "give a list of tensors"),
    ('inputs = [{ name = "x", datatype = "FP32", shape = [-1], colour = 1 }]\n'
     'outputs = [{ name = "y", datatype = "FP32", shape = [-1] }]', "models.m.signature.inputs[0].colour",
     "unknown key"),
    ('inputs = [{ name = "x", datatype = "FP33", shape = [-1] }]\n'
     'outputs = [{ name = "y", datatype = "FP32", shape = [-1] }]', "models.m.signature.inputs[0]", "datatype"),
    ('inputs = [{ name = "x", shape = [-1] }]\noutputs = [{ name = "y", datatype = "FP32", shape = [-1] }]',
     "models.m.signature.inputs[0].datatype", "missing"),
    ('inputs = [{ name = "x", datatype = "FP32", shape = [-1] }]\n'
     'outputs = [{ name = "y", datatype = "FP32", shape = [-1] }]\ntensor = "jax"', "models.m.signature.tensor",
     "'numpy' or 'torch'"),
    ('inputs = [{ name = "x", datatype = "FP32", shape = [4] }, { name = "x", datatype = "FP32", shape = [4] }]\n'
     'outputs = [{ name = "y", datatype = "FP32", shape = [-1] }]', "models.m.signature.inputs",
     "names ['x'] more than once"),
])
def test_signature_errors_name_the_key(signature: str, key: str, message: str) -> None:
    with pytest.raises(ap.ConfigError) as err:
        signatures(Config.loads(_cfg(signature), "s.toml"))
    assert err.value.key == key and message in str(err.value)


def test_a_config_without_signatures_is_refused() -> None:
    with pytest.raises(ap.ConfigError, match="no model declares a signature"):
        signatures(Config.loads('[models.m]\nfactory = "process_models:echo"\n', "s.toml"))


def test_signatures_round_trip_through_toml() -> None:
    cfg = Config.loads(CONFIG, "s.toml")
    again = Config.loads(cfg.to_toml(), "again.toml")
    assert again.models == cfg.models
    assert signatures(again)["double"] == signatures(cfg)["double"]


def serve_beside_a_held_port(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """`apportion serve CONFIG ARGS...` (each "{port}" in ARGS replaced) while another socket
    listens on 127.0.0.1:port: its result, and the port."""
    cfg = tmp_path / "serve.toml"
    cfg.write_text(CONFIG)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
        done = subprocess.run([sys.executable, "-m", "apportion", "serve", str(cfg),
                               *(a.replace("{port}", str(port)) for a in args)],
                              capture_output=True, text=True, env=env, timeout=120)
    return done, port


@pytest.mark.parametrize("host", ["127.0.0.1", "256.1.1.1"])
def test_an_address_it_cannot_serve_on_is_a_one_line_error(tmp_path: Path, host: str) -> None:
    # Was a traceback ending in OSError "Address already in use" / socket.gaierror, exit 1.
    done, port = serve_beside_a_held_port(tmp_path, "--host", host, "--http-port", "{port}", "--grpc-port", "-1")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    line = done.stderr.strip()
    assert line.startswith(f"apportion serve: error: cannot serve on --host {host} (--http-port {port}, "
                           "--grpc-port -1): "), line
    assert len(line.splitlines()) == 1


def test_a_grpc_port_in_use_is_the_same_one_line_error(tmp_path: Path) -> None:
    # grpcio raised its own RuntimeError ("Failed to bind to address"): a traceback-like line
    # that named neither the host nor the flags.
    done, port = serve_beside_a_held_port(tmp_path, "--http-port", "0", "--grpc-port", "{port}")
    assert done.returncode == 1, done.stderr
    lines = [x for x in done.stderr.splitlines() if x.startswith("apportion serve")]
    assert lines and lines[-1].startswith(f"apportion serve: error: cannot serve on --host 127.0.0.1 (--http-port 0, "
                                          f"--grpc-port {port}): gRPC: cannot listen on 127.0.0.1:{port}"), done.stderr
    assert "Traceback" not in done.stderr


HANGS = """
[models.h]
factory = "process_models:hangs_on_negative"
instances = 2

[models.h.signature]
inputs = [{ name = "x", datatype = "FP32", shape = [-1] }]
outputs = [{ name = "x", datatype = "FP32", shape = [-1] }]
"""


def test_a_failing_model_is_reported_on_stderr_with_its_traceback_a_few_times_not_per_request(
        tmp_path: Path) -> None:
    # Nothing was written: the model's exception reached its clients (500) and /metrics
    # (failed), and no log an operator could search.
    cfg = tmp_path / "raises.toml"
    cfg.write_text(HANGS.replace("hangs_on_negative", "raises_on_negative").replace("models.h", "models.r"))
    with serving(cfg, "--grpc-port", "-1") as (proc, line):
        http = re.search(r"http://(127\.0\.0\.1:\d+)", line).group(1)  # type: ignore[union-attr]

        def post(x: float) -> int:
            return httpx.post(f"http://{http}/v2/models/r/infer", timeout=30, json={"inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1], "data": [x]}]}).status_code

        assert [post(-float(i)) for i in range(1, 6)] + [post(1.0)] == [500] * 5 + [200]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert proc.stderr is not None
        err = proc.stderr.read()
    lines = [ln for ln in err.splitlines() if ln.startswith("apportion serve: model 'r' failed")]
    assert lines == ["apportion serve: model 'r' failed: ValueError: negative input -1.0"], err
    assert "Traceback (most recent call last)" in err and "in serve" in err, err  # the model's own frame


@pytest.mark.parametrize("second", [None, signal.SIGTERM, signal.SIGINT])
def test_a_call_that_never_returns_does_not_hold_the_exit(tmp_path: Path, second: signal.Signals | None) -> None:
    # After the drain the CLI closed the runtime with drain=True, which waits for running calls
    # without limit: the process never exited, and a second signal (or Ctrl-C) did not help.
    cfg = tmp_path / "hangs.toml"
    cfg.write_text(HANGS)
    with serving(cfg, "--grpc-port", "-1", "--drain-timeout-s", "1") as (proc, line):
        http = re.search(r"http://(127\.0\.0\.1:\d+)", line).group(1)  # type: ignore[union-attr]
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [-1.0]}]}
        with ThreadPoolExecutor(1) as pool:
            hung = pool.submit(lambda: httpx.post(f"http://{http}/v2/models/h/infer", json=body, timeout=60))
            wait_for_metric(http, 'apportion_in_flight{model="h"} 1')
            assert httpx.post(f"http://{http}/v2/models/h/infer", json={"inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1], "data": [2.0]}]}, timeout=30).status_code == 200
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            if second is not None:
                time.sleep(0.3)
                proc.send_signal(second)
            code = proc.wait(30)
            took = time.monotonic() - started
            with contextlib.suppress(httpx.HTTPError):
                assert hung.result(30).status_code == 503
        err = proc.stderr.read() if proc.stderr else ""
    assert took < 1 + 2 + 5, took  # the drain timeout, the close's grace, a slow machine
    # The drain's start is said, with what it waits for, and the abort by a second signal.
    assert "apportion serve: SIGTERM: draining: not ready, new requests refused; 1 admitted request(s) get up to 1 s" \
        in err, err
    assert ("again: the drain is aborted" in err) == (second is not None), err
    # Each line names the model whose calls held it.
    assert "model calls still running 2 s after the drain (not finished: 'h' 1); exiting without them" in err, err
    assert code == (1 if second is None else 128 + second), (code, err)
    # The drain's own line came too (it was printed after the close, which ended the process).
    assert ("requests still running after --drain-timeout-s 1 got 503 (not finished: 'h' 1)" in err) == (
        second is None), err


@pytest.mark.parametrize(("sig", "factory"), [(signal.SIGTERM, "slow_to_build"), (signal.SIGINT, "slow_to_build"),
                                            (signal.SIGTERM, "never_built")])
def test_a_signal_while_the_models_start_ends_the_process_with_a_line(tmp_path: Path, sig: signal.Signals,
                                                                      factory: str) -> None:
    # SIGTERM killed the process at once with no word (exit -15); Ctrl-C waited for the start,
    # then printed a KeyboardInterrupt traceback (exit -2 / 1); a factory that never returned
    # kept the process for ever, through every signal but SIGKILL.
    cfg = tmp_path / "slow.toml"
    cfg.write_text(HANGS.replace("hangs_on_negative", factory).replace("instances = 2", "instances = 1"))
    building = tmp_path / "building"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]), APPORTION_TEST_BUILDING=str(building))
    proc = subprocess.Popen([sys.executable, "-m", "apportion", "serve", str(cfg), "--http-port", "0", "--grpc-port",
                             "-1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not building.exists():  # the model builds (for 1 s) from here
            assert time.monotonic() < deadline and proc.poll() is None, "the model never began to build"
            time.sleep(0.01)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert f"apportion serve: stopped by {sig.name} while its models started" in err and "Traceback" not in err, err
    assert "v2 HTTP on" not in out
    assert ("a model's factory or warm-up still running 2 s later; exiting without it" in err) == (
        factory == "never_built"), err


def test_thousands_of_grpc_calls_at_once_on_one_channel_are_all_answered(tmp_path: Path) -> None:
    # grpc's own limits on calls the server has not yet taken (1,000 soft, 3,000 hard) cancelled
    # the calls beyond them with CANCELLED (the client's word, not retried, not counted in
    # /metrics): 176 of 2,000 and 315 of 3,000 here, with the server in a process of its own.
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    cfg = tmp_path / "serve.toml"
    cfg.write_text(CONFIG.replace("instances = 2\n", "instances = 2\nmax_queue = 8192\n", 1))

    def request(i: int) -> Any:
        r = pb.ModelInferRequest(model_name="double")
        r.inputs.add(name="x", datatype="FP32", shape=[1])
        r.raw_input_contents.append(np.array([i], np.float32).tobytes())
        return r

    with serving(cfg, "--grpc-port", "0") as (proc, line):
        m = re.search(r"v2 gRPC on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        with grpc.insecure_channel(f"127.0.0.1:{m.group(1)}") as channel:
            stub = pbg.GRPCInferenceServiceStub(channel)
            for n in (2000, 3000):
                calls = [stub.ModelInfer.future(request(i), timeout=120) for i in range(n)]
                answers = [np.frombuffer(c.result().raw_output_contents[0], np.float32)[0] for c in calls]
                assert answers == [2.0 * i for i in range(n)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


ADAPT_CONFIG = """
[models.nap]
factory = "process_models:sleeper"
max_queue = 64
slo = { latency_ms = 1 }
[models.nap.signature]
inputs = [{ name = "x", datatype = "FP32", shape = [1] }]
outputs = [{ name = "y", datatype = "FP32", shape = [1] }]
"""


def nap_client(line: str) -> tuple[str, Any, Any]:
    """From the line `apportion serve` printed: its HTTP address, a tritonclient for it (4
    requests at a time) and the input of a 10 ms call of ADAPT_CONFIG's "nap"."""
    m = re.search(r"v2 HTTP on http://(127\.0\.0\.1:\d+) ", line)
    assert m, line
    inp = th.InferInput("x", [1], "FP32")
    inp.set_data_from_numpy(np.array([0.01], dtype=np.float32))
    return m.group(1), th.InferenceServerClient(m.group(1), concurrency=4), inp


def test_serve_adapt_runs_the_controller_beside_the_server_and_stops_it_at_the_drain(tmp_path: Path) -> None:
    # An objective below the model's own call time (10 ms): at risk in every window with
    # requests, so the controller moves it (an instance more: the CPUs are free).
    cfg = tmp_path / "adapt.toml"
    cfg.write_text(ADAPT_CONFIG)
    with serving(cfg, "--grpc-port", "-1", "--adapt", "--adapt-window-s", "0.2") as (proc, line):
        http, client, inp = nap_client(line)
        x = np.array([0.01], dtype=np.float32)
        lines: list[str] = []
        assert proc.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()
        moved = None
        deadline = time.monotonic() + 30
        while moved is None and time.monotonic() < deadline:
            pending = [client.async_infer("nap", [inp]) for _ in range(4)]
            for p in pending:
                np.testing.assert_array_equal(p.get_result().as_numpy("y"), x)
            moved = re.search(r"\] nap: instances 1 -> 2 \(SLO at risk: p99 [\d.]+ ms of 1 ms", "".join(lines))
        assert moved, "".join(lines)
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://{http}/metrics").text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        # The move is the operator's to see, too, and so is the controller that made it.
        assert samples[("apportion_model_moves_total", (("model", "nap"),))] >= 1, text
        assert samples[("apportion_controller_moves_total", (("model", "nap"),))] >= 1, text
        assert samples[("apportion_controller_running", ())] == 1.0, text
        assert samples[("apportion_controller_objective_seconds", (("model", "nap"), ("percentile", "99")))] == 0.001
        assert "online controller: every 0.2 s, manages nap (p99 <= 1 ms)\n" in "".join(lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        reader.join(10)
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
        client.close()


def test_serve_adapt_says_which_models_it_manages_and_which_of_them_no_client_can_call(tmp_path: Path) -> None:
    cfg = tmp_path / "adapt.toml"
    cfg.write_text(ADAPT_CONFIG + '[models.aside]\nfactory = "process_models:echo"\n'
                   'slo = { latency_ms = 50, percentile = 95 }\n')
    with serving(cfg, "--grpc-port", "-1", "--adapt") as (proc, line):
        assert proc.stdout is not None
        said = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert "serving nap:" in line, line
    assert said == ("online controller: every 1 s, manages nap (p99 <= 1 ms), aside (p95 <= 50 ms); aside has an "
                    "slo and no signature: not served, moved like the others (it may give capacity to the served "
                    "models)\n"), said


def test_serve_adapt_reports_a_failed_move_on_stderr_and_goes_on_serving(tmp_path: Path) -> None:
    # It went to stdout, among the server's lines and the moves.
    cfg = tmp_path / "adapt.toml"
    cfg.write_text(ADAPT_CONFIG.replace("process_models:sleeper", "process_models:sleeper_that_cannot_grow"))
    with serving(cfg, "--grpc-port", "-1", "--adapt", "--adapt-window-s", "0.2") as (proc, line):
        http, client, inp = nap_client(line)
        def errors() -> float:
            m = re.search(r"^apportion_controller_errors_total (\S+)$", httpx.get(f"http://{http}/metrics").text, re.M)
            return float(m.group(1)) if m else 0.0

        deadline = time.monotonic() + 30
        while errors() == 0 and time.monotonic() < deadline:
            for p in [client.async_infer("nap", [inp]) for _ in range(4)]:
                p.get_result()  # every request still answered
        assert errors() >= 1
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
    assert re.search(r"controller error at \d+\.\d+s: nap: instances 1 -> 2: RuntimeError: instance 1 of 'nap' "
                     r"cannot map its weights", err), err
    assert "controller error" not in out, out


def test_sigterm_while_a_move_starts_its_instances_drains_and_exits_0_without_waiting_for_it(tmp_path: Path,
                                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The move's factory takes ten minutes: the controller stopped by joining it, so the signal's
    # drain ended and the process waited for the factory anyway (and a second signal with it).
    cfg = tmp_path / "adapt.toml"
    cfg.write_text(ADAPT_CONFIG.replace("process_models:sleeper", "process_models:sleeper_slow_to_grow"))
    mark = tmp_path / "building"
    monkeypatch.setenv("APPORTION_TEST_BUILDING", str(mark))
    with serving(cfg, "--grpc-port", "-1", "--adapt", "--adapt-window-s", "0.2") as (proc, line):
        _, client, inp = nap_client(line)
        deadline = time.monotonic() + 30
        while not mark.exists() and time.monotonic() < deadline:
            for p in [client.async_infer("nap", [inp]) for _ in range(4)]:
                p.get_result()
        assert mark.exists(), "the controller never began to add an instance"
        client.close()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert time.monotonic() - t0 < 30  # the drain and the close's grace, not the factory
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "a move of the online controller (new instances starting) still running" in err, err


@pytest.mark.parametrize(("config_text", "args", "message"), [
    (ADAPT_CONFIG.replace("slo = { latency_ms = 1 }\n", ""), ["--adapt"], "models: --adapt needs a latency objective"),
    (ADAPT_CONFIG, ["--adapt-batchable", "nap"], "--adapt-batchable: applies with --adapt only"),
    (ADAPT_CONFIG, ["--adapt", "--adapt-batchable", "other"], "--adapt-batchable: model 'other' has no slo"),
    (ADAPT_CONFIG, ["--adapt-window-s", "5"], "--adapt-window-s: applies with --adapt only"),
    # The only model with an objective has no signature: nothing the controller moves serves.
    (ADAPT_CONFIG.split("[models.nap.signature]")[0] + '[models.other]\nfactory = "process_models:echo"\n'
     '[models.other.signature]\ninputs = [{ name = "x", datatype = "FP32", shape = [1] }]\n'
     'outputs = [{ name = "y", datatype = "FP32", shape = [1] }]\n',
     ["--adapt"], "models: --adapt manages models with an slo, and none of them (nap) is served"),
])
def test_serve_adapt_mistakes_are_refused_before_any_model_starts(tmp_path: Path, config_text: str,
                                                                   args: list[str], message: str) -> None:
    cfg = tmp_path / "adapt.toml"
    cfg.write_text(config_text.replace("process_models:sleeper", "no_such_module:never_built"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    done = subprocess.run([sys.executable, "-m", "apportion", "serve", str(cfg), "--http-port", "0", *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "no_such_module" not in done.stderr, done.stderr
