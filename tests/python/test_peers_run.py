"""The peer comparison's runner (bench/peers/run.py): its demo loads, the order it runs
servers, configurations and loads in, and the table of each server's best goodput."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "peers" / "run.py"
_spec = importlib.util.spec_from_file_location("peers_run", _PATH)
assert _spec is not None and _spec.loader is not None
run = importlib.util.module_from_spec(_spec)
sys.modules["peers_run"] = run  # dataclasses look their module up by name
_spec.loader.exec_module(run)


def test_demo_loads_take_several_fractions_per_encoding() -> None:
    assert run.demo_loads("json=0.1,binary=0.35/0.42/0.5") == {"json": [0.1], "binary": [0.35, 0.42, 0.5]}
    assert run.demo_loads("binary=1") == {"binary": [1.0]}


@pytest.mark.parametrize("text", ["binary", "binary=", "binary=x", "binary=0.3/", "grpc=0.1", "binary=0",
                                  "json=11"])
def test_a_demo_load_that_is_not_encoding_and_fractions_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="ENCODING=F"):
        run.demo_loads(text)


def test_the_demo_runs_every_configuration_at_every_load_peers_alternating() -> None:
    args = argparse.Namespace(scenarios=["noop", "demo"], tensors=["binary"], peers=["apportion", "pytriton"],
                              demo_loads={"binary": [0.35, 0.5]})
    runs = run.plan(args)
    noop = [r for r in runs if r[1] == "noop"]
    assert [(r[0], r[5]) for r in noop] == [("apportion", None), ("pytriton", None)]
    demo = [(peer, label, load) for peer, scenario, label, _, _, load in runs if scenario == "demo"]
    labels = list(run.DEMO_CONFIGS)
    # Each configuration and load in turn, every peer in each, the order turning by one each time.
    orders = [("pytriton", "apportion"), ("apportion", "pytriton")]
    assert demo == [(peer, label, load) for i, (load, label) in enumerate((lo, la) for lo in (0.35, 0.5) for la in labels)
                    for peer in orders[i % 2]]


def test_the_peers_order_turns_so_none_always_runs_first_or_after_the_same_one() -> None:
    args = argparse.Namespace(scenarios=["mlp256"], tensors=["binary"], peers=["apportion", "triton", "ray"],
                              demo_loads={})
    runs = run.plan(args)
    groups = [[r[0] for r in runs[i:i + 3]] for i in range(0, len(runs), 3)]
    assert groups[:3] == [["apportion", "triton", "ray"], ["triton", "ray", "apportion"],
                          ["ray", "apportion", "triton"]]
    assert len(groups) == len(run.MLP_CONFIGS) and all(sorted(g) == ["apportion", "ray", "triton"] for g in groups)


def _row(peer: str, goodput: float, met: bool, load: float = 0.35, error: str | None = None) -> object:
    r = run.Row(peer, "demo", "1 instance each", "binary", load)
    if error is None:
        r.figures = {"stable": True, "errors": {}, "offered": 700.0, "throughput": goodput, "goodput": goodput,
                     "per_model": {"mlp": {"slo_met": met}, "conv": {"slo_met": True}}}
    r.error = error
    return r


def test_the_best_goodput_prefers_a_row_that_met_every_slo() -> None:
    rows = [_row("apportion", 700, True, 0.35), _row("apportion", 880, False, 0.5), _row("apportion", 800, True, 0.42),
            _row("pytriton", 365, False, 0.35), _row("pytriton", 9, False, 0.42),
            _row("ray", 0, False, error="not installed")]
    best = run.best_goodput(rows)
    assert [(peer, r.figures["goodput"], r.load) for peer, r in best] == [("apportion", 800, 0.42),
                                                                           ("pytriton", 365, 0.35)]
    text = run.table(rows)
    assert "| apportion | 800 | yes | 1 instance each, binary, load 0.42 |" in text
    assert "| pytriton | 365 | no | 1 instance each, binary, load 0.35 |" in text
    assert "| apportion | 1 instance each, binary, load 0.5 | 700 | 880 | 880 | no, yes |" in text


def test_the_mlp_runs_one_and_two_replicas_and_the_table_names_each_servers_fastest() -> None:
    args = argparse.Namespace(scenarios=["mlp256"], tensors=["json", "binary"], peers=["apportion", "litserve"],
                              demo_loads={})
    replicas = {models["mlp256"]["instances"] for _, _, _, models, _, _ in run.plan(args)}
    assert replicas == {1, 2}

    def mlp(peer: str, config: str, tensors: str, rps: float, p99: float) -> object:
        r = run.Row(peer, "mlp256", config, tensors)
        r.figures = {"stable": True, "errors": {}, "rps": rps, "p50_ms": 1.0, "p99_ms": p99}
        return r

    rows = [mlp("apportion", "2 replicas x 1 thread", "binary", 2600, 7.0),
            mlp("apportion", "1 replica x 1 thread, batch 8 / 1 ms", "binary", 3000, 4.3),
            mlp("litserve", "2 replicas x 1 thread", "json", 900, 16.0),
            mlp("litserve", "2 replicas x 1 thread", "binary", 1000, 14.6),
            run.Row("ray", "mlp256", "1 replica x 1 thread", "binary", error="not installed")]
    fastest = run.best_throughput(rows)
    assert [(peer, r.figures["rps"]) for peer, r in fastest] == [("apportion", 3000), ("litserve", 1000)]
    text = run.table(rows)
    assert "| apportion | 3000 | 4.3 | 1 replica x 1 thread, batch 8 / 1 ms, binary |" in text
    assert "| litserve | 1000 | 14.6 | 2 replicas x 1 thread, binary |" in text
    assert "each server's best goodput" not in text  # no demo rows
    # A row in which every request failed has no latencies: "-", not a TypeError that lost the table.
    failing = mlp("litserve", "1 replica x 1 thread", "binary", 0, 0.0)
    failing.figures.update(p50_ms=None, p99_ms=None)
    noop = run.Row("litserve", "noop", "1 replica", "binary")
    noop.figures = {"stable": True, "errors": {"http 500": 9}, "rps": 0.0, "p50_ms": None, "p99_ms": None}
    text = run.table([*rows, failing, noop])
    assert "| litserve | 1 replica x 1 thread | binary | 0 | - | - |" in text
    assert "| litserve errors: http 500 x9 | binary | - | - | 0 |" in text


def test_settle_returns_once_the_cpus_are_idle_and_gives_up_after_its_limit() -> None:
    assert run.settle(max_s=5.0, idle=0.0, step_s=0.05) < 1.0  # any machine is 0% idle or more
    waited = run.settle(max_s=0.2, idle=1.01, step_s=0.05)  # never that idle: waits its limit out
    assert 0.2 <= waited < 1.0


def test_what_a_row_left_in_shared_memory_is_removed_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "psm_before").write_bytes(b"x")
    before = run.shm_entries(tmp_path)
    (tmp_path / "psm_3c3ba13b").write_bytes(b"y")
    (tmp_path / "pytrtion9810-a49f").write_bytes(b"z")
    assert run.clean_shm(before, tmp_path) == ["psm_3c3ba13b", "pytrtion9810-a49f"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psm_before"]
    assert run.clean_shm(before, tmp_path) == []
    assert run.shm_entries(tmp_path / "missing") == set()


def test_apportion_serves_the_demo_models_as_apportion_demo_configures_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from apportion import config, demo

    spec = importlib.util.spec_from_file_location("models", _PATH.parent / "models.py")
    assert spec is not None and spec.loader is not None
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    monkeypatch.setitem(sys.modules, "models", models)  # run.py's models.py, as its server finds it
    path = run.apportion_config({"mlp": {"instances": 1, "batch": 8, "delay_ms": 2.0}, "noop": {"instances": 2}},
                                {"mlp": demo.SLO_MS["mlp"]}, tmp_path / "c.toml")
    cfg = config.Config.load(path)
    mlp, noop = cfg.models["mlp"].spec, cfg.models["noop"].spec
    assert (mlp.timeout_ms, mlp.max_queue, mlp.admission) == (demo.SLO_MS["mlp"], demo.MAX_QUEUE, "deadline")
    assert (mlp.batching.max_size, mlp.batching.max_delay_ms) == (8, 2.0)
    assert (noop.instances, noop.admission, noop.timeout_ms) == (2, "queue", None)


class _FakeServer:
    """A server whose wait_ready fails with the given exception (None: ready)."""

    def __init__(self, fails: BaseException | None) -> None:
        self.peer, self.fails, self.stopped = "pytriton", fails, 0

    def wait_ready(self, models: list[str]) -> None:
        assert models == ["mlp"]
        if self.fails is not None:
            raise self.fails

    def stop(self) -> None:
        self.stopped += 1


def _starter(*fails: BaseException | None) -> tuple[object, list[_FakeServer], list[bool]]:
    started: list[_FakeServer] = []
    agains: list[bool] = []

    def start(again: bool) -> _FakeServer:
        agains.append(again)
        started.append(_FakeServer(fails[len(started)]))
        return started[-1]

    return start, started, agains


def test_a_server_that_exits_before_it_is_ready_is_started_once_more(capsys: pytest.CaptureFixture[str]) -> None:
    start, started, agains = _starter(run.ServerExited("pytriton exited with 1: handshake refused"), None)
    server, restarted = run.start_ready(start, ["mlp"])
    assert (server, restarted, agains) == (started[1], True, [False, True])
    assert (started[0].stopped, started[1].stopped) == (1, 0)
    assert "pytriton failed to start, starting it again: pytriton exited with 1" in capsys.readouterr().out
    start, started, agains = _starter(None)
    assert run.start_ready(start, ["mlp"]) == (started[0], False) and agains == [False]


def test_a_second_start_failure_or_a_server_never_ready_is_the_rows_error() -> None:
    start, started, agains = _starter(run.ServerExited("first"), run.ServerExited("second"))
    with pytest.raises(run.ServerExited, match="second"):
        run.start_ready(start, ["mlp"])
    assert agains == [False, True]
    start, started, agains = _starter(RuntimeError("pytriton not ready after 240 s"))
    with pytest.raises(RuntimeError, match="not ready after"):
        run.start_ready(start, ["mlp"])
    assert agains == [False] and started[0].stopped == 0  # the row's finally stops it


def test_a_row_whose_server_started_twice_says_so() -> None:
    r = _row("pytriton", 500, True)
    r.restarted = True
    assert "(server started twice)" in run.table([r, _row("apportion", 600, True)]).splitlines()[5]
