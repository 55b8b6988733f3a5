"""Server.serve_forever() in a process of its own: SIGTERM/SIGINT drain with nothing lost and
exit 0; a second signal aborts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("uvicorn")
th = pytest.importorskip("tritonclient.http")
tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.timeout(180)


def start_child(mode: str, marker: Path) -> tuple[subprocess.Popen[str], dict[str, int]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    proc = subprocess.Popen([sys.executable, str(HERE / "serve_child.py"), mode, str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"child did not start: {proc.communicate(timeout=30)[1]}")
    return proc, json.loads(line)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"child did not exit: {err}") from None
    return proc.returncode, out, err


def refused(e: BaseException) -> bool:
    """A request the server did not take: 503/UNAVAILABLE, no connection at all, or a gRPC
    call that reached the port as the gRPC server stopped (grpc cancels calls it has not
    handed to the service yet). None of these was admitted: the drain waits for every
    admitted request, and the counts below check that each admitted one was answered."""
    if isinstance(e, InferenceServerException):
        return e.status() in ("503", "StatusCode.UNAVAILABLE", "StatusCode.CANCELLED", None)
    return isinstance(e, (OSError, ConnectionError)) or type(e).__module__.startswith("gevent")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_under_load_and_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    proc, ports = start_child("load", tmp_path / "m")
    ok = [0] * 6
    wrong: list[str] = []
    errors: list[str] = []
    go_signal = threading.Event()

    def http_load(k: int) -> None:
        c = th.InferenceServerClient(f"127.0.0.1:{ports['http']}", network_timeout=30)
        _load(k, c, th, "http")

    def grpc_load(k: int) -> None:
        c = tg.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
        _load(k, c, tg, "grpc")

    def _load(k: int, c: Any, mod: Any, kind: str) -> None:
        for n in range(5000):  # bounded; ends at the first refusal after the signal
            x = np.array([k, n], np.float32)
            i = mod.InferInput("x", [2], "FP32")
            i.set_data_from_numpy(x)
            try:
                y = c.infer("slow", [i]).as_numpy("y")
            except Exception as e:  # noqa: BLE001 - sorted below
                if not refused(e):
                    errors.append(f"{kind}: {type(e).__name__}: {e}")
                return
            if not np.array_equal(y, x + 1):
                wrong.append(f"{kind} {x} -> {y}")
            ok[k] += 1
            if sum(ok) >= 150:
                go_signal.set()

    threads = [threading.Thread(target=http_load if k < 4 else grpc_load, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        assert go_signal.wait(60), "load never got going"
        proc.send_signal(sig)
    finally:
        for t in threads:
            t.join(90)
    code, out, err = finish(proc)
    assert code == 0, err
    assert not wrong and not errors, (wrong, errors)
    counts = json.loads(out.strip().splitlines()[-1])
    # every request the runtime took was answered, and every answer the clients got was one
    assert counts["submitted"] == counts["completed"] == sum(ok), (counts, ok)
    assert counts["failed"] == counts["expired"] == counts["cancelled"] == counts["rejected"] == 0


def test_second_signal_aborts(tmp_path: Path) -> None:
    marker = tmp_path / "entered"
    proc, ports = start_child("hang", marker)
    c = th.InferenceServerClient(f"127.0.0.1:{ports['http']}", network_timeout=60)
    outcome: list[Any] = []

    def one() -> None:
        i = th.InferInput("x", [1], "FP32")
        i.set_data_from_numpy(np.ones(1, np.float32))
        try:
            outcome.append(c.infer("slow", [i]).as_numpy("y"))
        except Exception as e:  # noqa: BLE001
            outcome.append(e)

    t = threading.Thread(target=one)
    t.start()
    for _ in range(3000):
        if marker.exists():
            break
        time.sleep(0.01)
    assert marker.exists(), "the request never reached the model"
    proc.send_signal(signal.SIGTERM)
    probe = th.InferenceServerClient(f"127.0.0.1:{ports['http']}")
    for _ in range(3000):  # readiness goes false while the admitted request drains
        if not probe.is_server_ready():
            break
        time.sleep(0.01)
    assert not probe.is_server_ready()
    probe.close()
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    t.join(60)
    assert code == 128 + signal.SIGTERM, err
    assert len(outcome) == 1 and isinstance(outcome[0], Exception)  # aborted: never answered
