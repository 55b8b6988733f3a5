"""The command line: every command, its --help, its JSON, and every error path with its exit code."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import apportion as ap
from apportion import cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "topology"
VM2 = str(FIXTURES / "vm2")
SERVER = str(FIXTURES / "server_2s128t")
SCATTERED = str(FIXTURES / "container_scattered")


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def config(tmp_path: Path, text: str, name: str = "models.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


TWO_MODELS = """
[models.ranker]
cores = 2
isolation = "exclusive"
threads = 2

[models.echo]
instances = 3
"""


# -- help ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["topology", "--help"], ["plan", "--help"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: apportion")
    if argv == ["--help"]:
        # Every registered command is listed: a new Command shows up without touching main().
        assert all(c.name in text for c in cli.COMMANDS)
    elif argv[0] == "plan":
        assert "[models.<name>]" in text and "--root PATH" in text and "--json" in text


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["plan"], ["topology", "--bogus"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "usage: apportion" in capsys.readouterr().err


# -- topology --------------------------------------------------------------------------------

def test_topology_text_on_fixtures() -> None:
    code, out, err = run("topology", "--root", VM2)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"topology of {VM2}: 2 usable CPUs (0-1) of 2 present"
    assert "node 0: 3.8 GiB, usable CPUs 0-1" in out

    code, out, _ = run("topology", "--root", SCATTERED)
    assert code == 0
    assert "5 usable CPUs (1,3-4,9,14) of 16 present" in out
    assert "not allowed to this process: 0,2,5-8,10-13,15" in out


def test_topology_json_matches_the_api() -> None:
    code, out, err = run("topology", "--root", SERVER, "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc == json.loads(json.dumps(ap.topology(SERVER).to_dict()))
    assert len(doc["usable"]) == 128 and doc["threads_per_core"] == 2


def test_topology_of_this_machine() -> None:
    code, out, _ = run("topology", "--json")
    assert code == 0
    assert json.loads(out)["usable"] == sorted(os.sched_getaffinity(0))


def test_unreadable_root_is_exit_1_naming_the_path(tmp_path: Path) -> None:
    code, out, err = run("topology", "--root", str(tmp_path))
    assert (code, out) == (1, "")
    assert err.startswith("apportion topology: error: ") and str(tmp_path) in err


def test_a_sysfs_value_that_is_not_utf8_is_exit_1_naming_the_file(tmp_path: Path) -> None:
    # The native message carried the raw bytes: a UnicodeDecodeError traceback from topology,
    # and plan blamed a runtime.cpus key the config did not have.
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(VM2, root)
    (root / "sys/devices/system/cpu/cpu0/topology/core_id").write_bytes(b"\xfd\xfe\n")
    for argv in (["topology"], ["plan", config(tmp_path, TWO_MODELS)]):
        code, out, err = run(*argv, "--root", str(root))
        assert (code, out) == (1, ""), err
        assert "cpu0/topology/core_id, found '\\xfd\\xfe'" in err and "runtime.cpus" not in err, err


def test_python_dash_m_apportion_runs_the_cli() -> None:
    package_parent = str(Path(ap.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "apportion", "topology", "--root", VM2],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"topology of {VM2}: 2 usable CPUs")
    proc = subprocess.run([sys.executable, "-m", "apportion", "plan", "/nonexistent/models.toml"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2
    assert "apportion plan: error: /nonexistent/models.toml: cannot read it" in proc.stderr


# -- plan ------------------------------------------------------------------------------------

def test_plan_text_and_json_on_the_server_fixture(tmp_path: Path) -> None:
    path = config(tmp_path, TWO_MODELS)
    code, out, err = run("plan", path, "--root", SERVER)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"plan on {SERVER}: 128 usable CPUs")
    ranker = next(line for line in lines if line.lstrip().startswith("ranker"))
    assert "exclusive" in ranker and "x2" in ranker

    code, out, _ = run("plan", path, "--root", SERVER, "--json")
    assert code == 0
    doc = json.loads(out)
    models = {m["name"]: m for m in doc["models"]}
    assert set(models) == {"ranker", "echo"}
    # Two physical cores with their SMT siblings held idle; on one L3 domain.
    assert len(models["ranker"]["cpus"]) == 2 and len(models["ranker"]["reserved"]) == 2
    assert models["ranker"]["locality"] == "l3"
    assert len(models["echo"]["instances"]) == 3
    assert not set(models["ranker"]["cpus"]) & set(doc["shared_pool"])


def test_plan_is_what_the_runtime_would_plan(tmp_path: Path) -> None:
    # On two CPUs the shared model's three instances only fit because the runtime lets a
    # shared model without a core count float over the pool: the CLI must agree with it.
    code, out, err = run("plan", config(tmp_path, TWO_MODELS.replace("cores = 2", "cores = 1")
                                        .replace("threads = 2", "threads = 1")), "--root", VM2, "--json")
    assert (code, err) == (0, "")
    rt = ap.Runtime(topology_root=VM2)
    try:
        rt.add_model("ranker", model=len, cores=1, isolation="exclusive", threads=1)
        rt.add_model("echo", model=len, instances=3)
        expected = json.loads(json.dumps(rt.plan().to_dict()))
    finally:
        rt.close()
    assert json.loads(out) == expected


def test_every_quota_key_is_accepted(tmp_path: Path) -> None:
    path = config(tmp_path, """
[models.m]
cores = "0-1"
instances = 1
threads = 4
isolation = "exclusive"
numa = 0
smt = true
memory_policy = "prefer"
oversubscribe = true
""")
    code, out, err = run("plan", path, "--root", VM2, "--json")
    assert (code, err) == (0, "")
    m = json.loads(out)["models"][0]
    assert (m["cpus"], m["memory_policy"], m["instances"][0]["threads"]) == ([0, 1], "prefer", 4)
    assert set(cli.QUOTA_KEYS) == {"cores", "instances", "threads", "isolation", "numa", "smt",
                                   "memory_policy", "oversubscribe"}


# -- config errors: exit 2, naming the file, the key and what is allowed ---------------------

@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ('[models.m]\ncores = 1\nflavour = "mint"\n', "models.m.flavour",
         "unknown key; allowed: factory, instances, threads, cores, isolation, numa, smt, memory_policy, "
         "oversubscribe, max_queue"),
        ('[models.m]\ncores = 1\nname = "x"\n', "models.m.name", "unknown key; allowed: factory, instances"),
        ('[models.m]\ncores = 1\nisolation = "solo"\n', "models.m.isolation",
         "got 'solo'; give \"exclusive\", \"shared\" or \"process\""),
        ("[models.m]\ncores = 0\n", "models.m.cores", "give a count in [1, 65536]"),
        ("[models.m]\ncores = 1.5\n", "models.m.cores", "give an integer count >= 1"),
        ("[models.m]\ninstances = -1\n", "models.m.instances", "got -1; give an integer >= 1"),
        ('[models.m]\nthreads = "two"\n', "models.m.threads", "give an integer in [1, 65536]"),
        ('[models.m]\nsmt = "yes"\n', "models.m.smt", "give True or False"),
        ('[models.m]\nmemory_policy = "interleave"\n', "models.m.memory_policy", 'give "bind", "prefer" or "none"'),
        ('[models.m]\ncores = "3-1"\n', "models.m.cores", "is not a CPU list"),
        ("[models.m]\ncores = 1\nthreads = 3\n", "models.m.threads", "oversubscribe=True"),
        ('[models.m]\ncores = 1\nisolation = "exclusive"\nnuma = -2\n', "models.m.numa", 'give a node id in [0, 65536) or "auto"'),
        ("models = 3\n", "models", "no models"),
        ("[models]\n", "models", "no models"),
        ("[models]\nm = 1\n", "models.m", "must be a table of model fields"),
        ("[frobnicate]\nx = 1\n[models.m]\ncores = 1\n", "frobnicate", "unknown top-level key"),
        # Valid alone, impossible on this machine: the planner's QuotaError, named the same way.
        ('[models.m]\ncores = 3\nisolation = "exclusive"\n', "models.m.cores",
         "asks 3 physical cores but this machine has only 2 usable"),
        ('[models.m]\ncores = 1\nisolation = "exclusive"\nnuma = 5\n', "models.m.numa",
         "NUMA node 5 has no usable CPU on this machine; nodes with CPUs: 0"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, key: str, allowed: str) -> None:
    path = config(tmp_path, text)
    code, out, err = run("plan", path, "--root", VM2)
    assert (code, out) == (2, "")
    assert err.startswith(f"apportion plan: error: {path}: {key}: "), err
    assert allowed in err


def test_bad_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = config(tmp_path, "[models.m]\ncores = 1\ncores = \n")
    code, out, err = run("plan", path, "--root", VM2)
    assert (code, out) == (2, "")
    assert err.startswith(f"apportion plan: error: {path}: not valid TOML: ")
    assert "line 3" in err


def test_missing_config_file(tmp_path: Path) -> None:
    code, _, err = run("plan", str(tmp_path / "absent.toml"), "--root", VM2)
    assert code == 2
    assert f"{tmp_path / 'absent.toml'}: cannot read it: No such file or directory" in err


def test_overlapping_exclusive_cpu_lists_are_named(tmp_path: Path) -> None:
    path = config(tmp_path, '[models.a]\ncores = "0"\nisolation = "exclusive"\n'
                            '[models.b]\ncores = "0-1"\nisolation = "exclusive"\n')
    code, out, err = run("plan", path, "--root", VM2)
    assert (code, out) == (1, "")
    assert err.startswith(f"apportion plan: error: {path}: models.b.cores: the models do not fit this machine: ")
    assert "CPUs 0 already belong to exclusive model 'a'" in err


def test_models_that_do_not_fit_together_exit_1(tmp_path: Path) -> None:
    # Each fits alone; together they need three of the two cores: a PlacementError.
    path = config(tmp_path, '[models.a]\ncores = 2\nisolation = "exclusive"\n'
                            '[models.b]\ncores = 1\nisolation = "exclusive"\n')
    code, out, err = run("plan", path, "--root", VM2)
    assert (code, out) == (1, "")
    assert err.startswith(f"apportion plan: error: {path}: models.b.cores: the models do not fit this machine: ")
    assert "0 free cores left" in err


# -- run, bench, tune, demo ------------------------------------------------------------------

SLEEPERS = """
[models.slow]
factory = "apportion.examples.sleepers:slow"
max_queue = 64
slo = { latency_ms = 100 }
load = { rate = 50 }

[models.fast]
factory = "apportion.examples.sleepers:fast"
instances = 2
load = { concurrency = 2 }
"""


@pytest.mark.parametrize("command", ["run", "bench", "tune", "demo"])
def test_new_commands_have_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: apportion {command}")


@pytest.mark.parametrize("argv", [["run", "x.toml", "--adapt", "--adapt-window-s", "nan"],
                                  # a window too short to read a p99 from, or one that never ends
                                  ["run", "x.toml", "--adapt", "--adapt-window-s", "0.001"],
                                  ["serve", "x.toml", "--adapt", "--adapt-window-s", "1e10"],
                                  ["run", "x.toml", "--adapt-window-s", "inf"], ["run", "x.toml", "--duration", "0"],
                                  ["bench", "x.toml", "--warmup-s", "-1"], ["bench", "x.toml", "--max-s", "0"],
                                  ["bench", "x.toml", "--window-s", "nan"], ["bench", "x.toml", "--window-s", "0.0005"],
                                  ["tune", "x.toml", "--budget-s", "0"],
                                  ["tune", "x.toml", "--budget-s", "inf"], ["demo", "--budget-s", "-1"],
                                  ["demo", "--load", "nan"], ["demo", "--window-s", "0"], ["demo", "--window-s", "0.0005"],
                                  ["demo", "--adapt-s", "inf"]])
def test_numbers_that_are_not_positive_and_finite_are_usage_errors(argv: list[str],
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    flag = next(a for a in argv if a.startswith("--") and a != "--adapt")
    assert f"argument {flag}: must be a finite number " in capsys.readouterr().err  # "> 0", ">= least", "in [a, b]"


@pytest.mark.parametrize("command", ["tune", "demo"])
def test_an_out_dir_that_cannot_hold_the_results_is_refused_before_any_work(tmp_path: Path, command: str) -> None:
    # Found only when the results were written, after the whole budget, as a traceback.
    afile = tmp_path / "a-file"
    afile.write_text("")
    path = config(tmp_path, SLEEPERS)
    for out_dir, why in ((afile, "FileExistsError"), (afile / "sub", "NotADirectoryError")):
        argv = [command, path] if command == "tune" else [command]
        code, out, err = run(*argv, "--out", str(out_dir))
        assert (code, out) == (2, ""), err
        assert f"--out: {str(out_dir)!r} cannot hold the results" in err and why in err


@pytest.mark.parametrize("value", ["0", "-3", "65537", "two"])
def test_tune_max_batch_outside_its_range_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # 0 and negative values were taken as 1 silently; 100000 failed as a Batching field, exit 1.
    with pytest.raises(SystemExit) as e:
        cli.main(["tune", "x.toml", "--max-batch", value])
    assert e.value.code == 2 and "argument --max-batch:" in capsys.readouterr().err


def test_a_model_that_fails_to_start_is_an_error_naming_it_not_a_traceback(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "failing_cli_models.py").write_text('def build(ctx):\n    raise ValueError("no weights here")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    path = config(tmp_path, '[models.ranker]\nfactory = "failing_cli_models:build"\n')
    for command in (["run", path, "--duration", "0.2"], ["plan", path]):
        code, _, err = run(*command)
        if command[0] == "plan":  # plans without building: nothing starts
            assert code == 0, err
            continue
        assert code == 1, err
        assert err.startswith(f"apportion run: error: {path}: models: a model failed to start: ValueError: "
                              "no weights here")
        assert "(raised by the factory of model 'ranker', instance 0)" in err and "Traceback" not in err


def test_run_serves_the_config_under_its_load(tmp_path: Path) -> None:
    code, out, err = run("run", config(tmp_path, SLEEPERS), "--duration", "0.8")
    assert (code, err) == (0, "")
    assert "plan on /" in out and "slow" in out and "fast" in out and "total:" in out

    code, out, err = run("run", config(tmp_path, SLEEPERS), "--duration", "0.4", "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert set(doc) == {"plan", "stats", "load"} and doc["stats"]["slow"]["completed"] > 0
    slow = doc["stats"]["slow"]  # numbers, not the histograms' repr strings
    assert "batch_size" not in slow and "histogram" not in slow["end_to_end"] and "<" not in out
    assert slow["in_flight"] == slow["submitted"] - sum(slow[k] for k in ("completed", "failed", "rejected",
                                                                         "expired", "cancelled"))


def test_bench_model_flag_replaces_the_load_and_keeps_the_configs_slo(tmp_path: Path) -> None:
    # --model NAME:... dropped the model's slo table: good/s counted every completion.
    path = config(tmp_path, SLEEPERS.replace("slo = { latency_ms = 100 }", "slo = { latency_ms = 0.01 }"))
    code, out, err = run("bench", path, "--model", "slow:concurrency=2", "--warmup-s", "0.2", "--window-s", "0.3",
                         "--max-s", "1.5", "--json")
    assert code == 0, err
    slow = json.loads(out)["models"]["slow"]
    assert slow["load"] == "closed x2" and slow["slo"]["latency_ms"] == 0.01 and slow["slo_met"] is False
    assert slow["goodput"] == 0.0


def test_run_adapt_moves_the_model_whose_slo_is_at_risk(tmp_path: Path) -> None:
    # An objective below the slow model's own call time: at risk in every window.
    at_risk = SLEEPERS.replace("slo = { latency_ms = 100 }", "slo = { latency_ms = 0.5 }")
    code, out, err = run("run", config(tmp_path, at_risk), "--duration", "1.6", "--adapt",
                         "--adapt-window-s", "0.2", "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["controller_errors"] == []
    assert doc["moves"] and {m["model"] for m in doc["moves"]} == {"slow"}
    assert all("SLO at risk: p99 " in m["reason"] for m in doc["moves"])
    # The controller's counts come with the moves (as on /metrics).
    counts = doc["controller"]["counts"]["slow"]
    assert counts["moves"] == len(doc["moves"]) and counts["undone"] == sum(m["undo"] for m in doc["moves"])
    assert doc["controller"]["error_count"] == 0
    assert all({"at_s", "windows", "why"} == set(h) for h in doc["controller"]["held"].values())
    # It steers by the objective's percentile (it read p99 whatever the config said).
    code, out, err = run("run", config(tmp_path, at_risk.replace("latency_ms = 0.5", "latency_ms = 0.5, percentile = 50")),
                         "--duration", "1.6", "--adapt", "--adapt-window-s", "0.2", "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["moves"] and all("SLO at risk: p50 " in m["reason"] for m in doc["moves"])

    # Without a latency objective: refused before any model starts (it printed the plan first).
    code, out, err = run("run", config(tmp_path, SLEEPERS.replace("slo = { latency_ms = 100 }\n", "")),
                         "--duration", "0.2", "--adapt")
    assert code == 2 and out == "" and "models: --adapt needs a latency objective" in err, (out, err)


@pytest.mark.parametrize("where", [[], ["--url", "http://127.0.0.1:9"]])
def test_a_max_s_too_short_for_the_warmup_and_three_windows_is_refused_not_raised(tmp_path: Path,
                                                                                 where: list[str]) -> None:
    path = config(tmp_path, SLEEPERS)
    # 0.1 + 3 x 0.2 = 0.7 s: 0.5 s was raised to 0.7 silently. With --url nothing listens on
    # port 9: the refusal comes before connecting, so the error is --max-s, not the connection.
    code, out, err = run("bench", path, *where, "--model", "fast:concurrency=1", "--warmup-s", "0.1",
                         "--window-s", "0.2", "--max-s", "0.5")
    assert (code, out) == (2, "")
    assert "--max-s: 0.5 s leaves no room for the warm-up and three windows (0.1 + 3 x 0.2 = 0.7 s)" in err


def test_the_default_max_s_grows_to_hold_the_warmup_and_three_windows() -> None:
    ns = argparse.Namespace(warmup_s=20.0, window_s=5.0, max_s=None, default_max_s=30.0)
    assert cli._max_s(ns) == 35.0
    assert cli._max_s(argparse.Namespace(warmup_s=1.0, window_s=1.0, max_s=None, default_max_s=30.0)) == 30.0
    assert cli._max_s(argparse.Namespace(warmup_s=1.0, window_s=1.0, max_s=4.0, default_max_s=30.0)) == 4.0


def _started_run(path: str, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "apportion", "run", path, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)  # started and serving (a slow start only delays the signal's effect)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_timed_run_prints_the_stats_so_far_and_exits_128_plus_it(tmp_path: Path,
                                                                                  sig: int) -> None:
    proc = _started_run(config(tmp_path, SLEEPERS), "--duration", "60", "--json")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert "Traceback" not in err, err
    doc = json.loads(out)  # the whole of stdout is the document
    assert doc["stopped_by"] == signal.Signals(sig).name and "load" not in doc
    assert doc["stats"]["fast"]["submitted"] > 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serving_until_a_signal_ends_with_exit_0_and_json_alone_on_stdout(tmp_path: Path, sig: int) -> None:
    proc = _started_run(config(tmp_path, SLEEPERS), "--json")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (0, "")
    doc = json.loads(out)  # "serving; Ctrl-C stops" went to stdout before the document
    assert set(doc["stats"]) == {"slow", "fast"} and "stopped_by" not in doc


def test_an_inputs_callable_that_raises_is_an_error_naming_its_key(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "raising_inputs_cli.py").write_text('def make():\n    raise ValueError("no input here")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    path = config(tmp_path, '[models.fast]\nfactory = "apportion.examples.sleepers:fast"\n'
                            'inputs = "raising_inputs_cli:make"\nload = { concurrency = 1 }\n')
    want = "models.fast.inputs: model 'fast': its inputs raised ValueError: no input here"
    code, out, err = run("run", path, "--duration", "0.4")
    assert code == 1 and f"apportion run: error: {path}: {want}" in err, err
    code, out, err = run("bench", path, "--warmup-s", "0.1", "--window-s", "0.1")
    assert code == 1 and f"apportion bench: error: {path}: {want}" in err, err
    code, out, err = run("bench", "--model", "fast:concurrency=1", "--factory", "fast=apportion.examples.sleepers:fast",
                         "--inputs", "fast=raising_inputs_cli:make", "--warmup-s", "0.1", "--window-s", "0.1")
    assert code == 1 and "<command line>: --inputs: model 'fast': its inputs raised ValueError" in err, err


def test_bench_whose_requests_failed_prints_the_report_and_exits_1_naming_the_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It exited 0 with every request failed: a script read a broken run as a measurement.
    (tmp_path / "raising_model_cli.py").write_text(
        'def make(ctx):\n    def serve(x):\n        raise ValueError("no answer here")\n    return serve\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run("bench", "--model", "bad:concurrency=1", "--factory", "bad=raising_model_cli:make",
                         "--model", "fast:concurrency=1", "--factory", "fast=apportion.examples.sleepers:fast",
                         "--warmup-s", "0.1", "--window-s", "0.1", "--max-s", "0.5", "--json")
    doc = json.loads(out)  # the report comes first, whole
    assert doc["models"]["bad"]["failed"] > 0 and doc["models"]["fast"]["completed"] > 0
    assert code == 1, err
    assert err.startswith("apportion bench: error: model 'bad': ") and "requests failed" in err, err
    assert "ValueError x" in err and "'fast'" not in err, err


def test_bench_config_and_model_specs(tmp_path: Path) -> None:
    path = config(tmp_path, SLEEPERS)
    code, out, err = run("bench", path, "--warmup-s", "0.1", "--window-s", "0.2", "--max-s", "1", "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert set(doc["models"]) == {"slow", "fast"} and doc["models"]["fast"]["completed"] > 0

    code, out, err = run("bench", "--model", "s:concurrency=2,latency_ms=50",
                         "--factory", "s=apportion.examples.sleepers:fast",
                         "--warmup-s", "0.1", "--window-s", "0.2", "--max-s", "1")
    assert (code, err) == (0, "")
    assert "closed x2" in out and "p99<=50ms" in out

    code, out, err = run("bench", "--model", "s:concurrency=2")
    assert code == 2 and "--factory: model 's' has no factory" in err
    code, out, err = run("bench", path, "--model", "nope:rate=5")
    assert code == 2 and "no model 'nope'" in err


def test_bench_refuses_flags_it_would_ignore_and_bad_loads_before_starting(tmp_path: Path) -> None:
    path = config(tmp_path, SLEEPERS)
    # With CONFIG, --factory and --inputs were silently ignored; without it, those naming a
    # model with no --model were.
    for flag, value in (("--factory", "fast=apportion.examples.sleepers:fast"), ("--inputs", "fast=x:y")):
        code, _, err = run("bench", path, flag, value)
        assert code == 2 and f"<command line>: {flag}: with CONFIG, each model's factory and inputs" in err, err
    fast = ("--model", "s:concurrency=1", "--factory", "s=apportion.examples.sleepers:fast")
    for flag, value in (("--factory", "t=apportion.examples.sleepers:fast"), ("--inputs", "t=x:y")):
        code, _, err = run("bench", *fast, flag, value)
        assert code == 2 and f"<command line>: {flag}: model 't' has no --model SPEC" in err, err
    # A load the runtime would refuse was exit 1 naming no flag, after the models started.
    for spec, want in (("s:concurrency=0", "concurrency must be an integer in 1..65536, got 0"),
                       ("s:rate=nan", "rate"), ("s:concurrency=1,arrivals=bogus", "arrivals must be"),
                       ("s:concurrency=1,priority=5", "priority 5 is not one of the model's priority levels 0-0")):
        code, _, err = run("bench", "--model", spec, "--factory", "s=apportion.examples.sleepers:fast")
        assert code == 2 and "apportion bench: error: <command line>: --model: model 's'" in err and want in err, err
    code, _, err = run("bench", path, "--model", "fast:concurrency=1,priority=-1")
    assert code == 2 and "<command line>: --model: model 'fast': priority must be an integer >= 0" in err, err


def test_tune_writes_a_plan_that_run_loads(tmp_path: Path) -> None:
    out_dir = tmp_path / "tuned"
    code, out, err = run("tune", config(tmp_path, SLEEPERS), "--budget-s", "5", "--out", str(out_dir),
                         "--max-batch", "2", "--quiet")
    assert (code, err) == (0, ""), err
    assert "plan:" in out and "scored" in out and "Validated with a 10% SLO margin over 3" in out
    assert "; confidence " in out
    assert {p.name for p in out_dir.iterdir()} >= {"plan.toml", "report.md", "candidates.png"}
    code, out, err = run("run", str(out_dir / "plan.toml"), "--duration", "0.4")
    assert (code, err) == (0, "")
    code, _, err = run("tune", config(tmp_path, SLEEPERS), "--margin", "1.5")
    assert code == 2 and "--margin" in err and "[0, 1)" in err
    assert "tightened by a 10% margin" in (out_dir / "report.md").read_text()


def test_tune_refuses_outputs_it_could_not_write_before_its_budget_and_leaves_no_dir_on_a_bad_config(
        tmp_path: Path) -> None:
    # A plan.toml that was a directory failed with IsADirectoryError after the whole budget,
    # the result lost; a config error left --out's directories behind.
    blocked = tmp_path / "blocked"
    (blocked / "plan.toml").mkdir(parents=True)
    started = time.monotonic()
    code, out, err = run("tune", config(tmp_path, SLEEPERS), "--budget-s", "60", "--out", str(blocked), "--quiet")
    assert time.monotonic() - started < 30, "refused after the budget"
    assert code == 2 and out == "" and f"apportion tune: error: {blocked}: plan.toml: exists and is not a regular " \
        "file" in err, err
    code, _, err = run("tune", config(tmp_path, "[models.m]\nfactory = 'x:y'\n"), "--out", str(tmp_path / "a" / "b"))
    assert code == 2 and "models.m.load" in err and not (tmp_path / "a").exists(), err


def test_tune_without_matplotlib_is_refused_before_its_budget(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Without matplotlib, plan.toml and report.md were written, then a ModuleNotFoundError
    # traceback; a stale candidates.png from an earlier run stayed beside the new plan.
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, out, err = run("tune", config(tmp_path, SLEEPERS), "--budget-s", "60", "--out", str(tmp_path / "o"))
    assert code == 2 and "candidates.png: the plot needs matplotlib: pip install 'apportion[tune]'" in err, err
    assert not (tmp_path / "o" / "plan.toml").exists()


def test_ctrl_c_in_a_command_that_does_not_handle_it_is_one_line_and_exit_130(tmp_path: Path) -> None:
    # tune printed a 40-line KeyboardInterrupt traceback through the load generator.
    proc = subprocess.Popen([sys.executable, "-m", "apportion", "tune", config(tmp_path, SLEEPERS), "--budget-s", "60",
                             "--out", str(tmp_path / "o"), "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)  # profiling
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "apportion tune: interrupted (SIGINT)\n", (proc.returncode, err)


def test_the_demo_without_torch_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It failed with KeyError: 'mlp' (the calibration thread's ImportError was printed by the
    # thread and lost; the empty result was taken for "not given" and measured again).
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    code, out, err = run("demo", "--budget-s", "5", "--window-s", "0.2", "--quiet", "--out", str(tmp_path))
    assert code == 1, (code, err)
    assert "the demo's models are torch models and torch cannot be imported" in err, err
    assert "pip install 'apportion[demo]'" in err and "KeyError" not in err


def test_demo_runs_quickly(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    code, out, err = run("demo", "--budget-s", "5", "--window-s", "0.2", "--load", "0.3", "--quiet",
                         "--shift", "mlp=0.85,conv=0.1,encoder=0.05", "--rounds", "2", "--out", str(tmp_path))
    assert (code, err) == (0, ""), err
    # Two rounds of the after-shift rows: each round's goodput, and the worst adaptation.
    line = next(x for x in out.splitlines() if "each after-shift row is the median of its rounds" in x)
    assert re.search(r": static \d+/\d+; controller \d+/\d+$", line), line
    assert "(the latest over 2 rounds)" in out or "no move after the shift" in out
    assert "unmanaged" in out and "equal split" in out and "tuned goodput:" in out
    assert "tuner: Validated with a 10% SLO margin" in out and "; confidence " in out
    assert "shift: static" in out and "shift: controller" in out and "after the shift: controller" in out
    assert "mix shift: mlp 35% -> 85%, conv 20% -> 10%, encoder 45% -> 5%" in out
    assert (tmp_path / "demo.png").exists() and (tmp_path / "tune" / "plan.toml").exists()

    code, out, err = run("demo", "--budget-s", "3", "--window-s", "0.2", "--load", "0.3", "--quiet",
                         "--no-shift", "--out", str(tmp_path))
    assert (code, err) == (0, ""), err
    assert "shift:" not in out


@pytest.mark.parametrize("flags", [["--retune"], ["--rounds", "3"]])
def test_demo_retune_and_rounds_without_the_shift_are_usage_errors(tmp_path: Path, flags: list[str]) -> None:
    # Both measure only the rows after the shift: with --no-shift they were ignored, and
    # --rounds 3 then failed after the whole demo had run.
    code, out, err = run("demo", "--no-shift", *flags, "--out", str(tmp_path / "d"))
    assert (code, out) == (2, ""), err
    assert f"{flags[0]}: measures the rows after the mix shift, and --no-shift leaves them out" in err
    assert not (tmp_path / "d").exists()  # refused before anything ran


@pytest.mark.parametrize(("argv", "message"), [
    (["--shift", "mlp=0.9,conv=0.2,encoder=0"], "argument --shift: the shares add up to 1.1, not 1"),
    (["--shift", "mlp=1,conv=0,encoder=0", "--no-shift"], "argument --no-shift: not allowed with argument --shift"),
    (["--rounds", "0"], "argument --rounds: must be an integer in [1, 100], got '0'"),
    (["--rounds", "two"], "argument --rounds: expected an integer, got 'two'"),
])
def test_demo_shift_usage_errors_exit_2_before_anything_runs(argv: list[str], message: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_apportion_command_imports_a_configs_paths_from_the_current_directory(tmp_path: Path) -> None:
    # As `python -m apportion` does: the command failed with "No module named 'mypkg'" in the
    # project directory that holds mypkg/.
    import shutil
    import subprocess

    exe = shutil.which("apportion")
    if exe is None:
        pytest.skip("the apportion command is not installed on PATH")
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text("def build(ctx):\n    return lambda x: x\n")
    (tmp_path / "m.toml").write_text('[models.ranker]\nfactory = "mypkg.models:build"\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([exe, "plan", "m.toml"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ranker" in done.stdout


def test_sigterm_while_runs_models_start_is_one_line_and_exit_143(tmp_path: Path) -> None:
    # The process died of the signal (exit 143 from the shell, nothing said) while its models
    # started: the moment a service manager is likely to stop it.
    (tmp_path / "slow_build_cli.py").write_text(
        "import pathlib, time\n\ndef build(ctx):\n    pathlib.Path('building').touch()\n"
        "    time.sleep(1.0)\n    return lambda x: x\n")
    path = config(tmp_path, '[models.m]\nfactory = "slow_build_cli:build"\n')
    proc = subprocess.Popen([sys.executable, "-m", "apportion", "run", path], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while not (tmp_path / "building").exists():  # building (a slow machine may take seconds to get there)
        assert proc.poll() is None and time.monotonic() < end, proc.communicate(timeout=60)
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # a second one (a process-group kill, `timeout`) changes nothing
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (143, "", "apportion run: stopped by SIGTERM while its models started\n")


def test_adapt_batchable_names_models_the_controller_manages(tmp_path: Path) -> None:
    path = config(tmp_path, SLEEPERS)
    code, _, err = run("run", path, "--adapt-batchable", "slow", "--duration", "0.2")
    assert code == 2 and "--adapt-batchable: applies with --adapt only" in err, err
    code, _, err = run("run", path, "--adapt", "--adapt-batchable", "nope", "--duration", "0.2")
    assert code == 2 and "--adapt-batchable: model 'nope' has no slo in the config" in err, err
    code, out, err = run("run", path, "--adapt", "--adapt-batchable", "slow", "--duration", "0.4", "--json")
    assert (code, err) == (0, ""), err


def test_adapt_classes_needs_adapt_and_a_scheduled_pool_without_reservations(tmp_path: Path) -> None:
    scheduled = '[runtime]\nshared_pool = "scheduled"\n'
    classed = SLEEPERS.replace("max_queue = 64\n", "max_queue = 64\npriority_class = 1\n")
    for text, args, message in (
            (scheduled + SLEEPERS, ["--adapt-classes"], "--adapt-classes: applies with --adapt only"),
            (SLEEPERS, ["--adapt", "--adapt-classes"], "--adapt-classes: priority classes are the scheduled pool's: "
                                                       "the config's [runtime] has shared_pool = 'os'"),
            ('[runtime]\nshared_pool = "scheduled"\npool_reserve = { "1" = 1 }\n' + classed,
             ["--adapt", "--adapt-classes"], "--adapt-classes: a class cannot change while the pool has pool_reserve")):
        path = config(tmp_path, text)
        code, _, err = run("run", path, *args, "--duration", "0.2")
        assert code == 2 and message in err, (args, err)



def test_adapt_gives_the_controller_the_configs_cost_models_and_classes(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import apportion.controller as controller_module
    from apportion.tune import CostModel

    given: list[dict[str, Any]] = []

    class Seen(controller_module.Controller):
        def __init__(self, *args: Any, **kw: Any) -> None:
            given.append(kw)
            super().__init__(*args, **kw)

    monkeypatch.setattr(controller_module, "Controller", Seen)
    # A tuner's plan carries a cost model per model: the controller asks it before a batching move.
    text = '[runtime]\nshared_pool = "scheduled"\n' + SLEEPERS.replace(
        "slo = { latency_ms = 100 }\n", "slo = { latency_ms = 100 }\ncost = { alpha_ms = 0.5, beta_ms = 2.0 }\n")
    path = config(tmp_path, text)
    code, out, err = run("run", path, "--adapt", "--adapt-classes", "--duration", "0.4", "--json")
    assert (code, err) == (0, ""), err
    assert len(given) == 1 and given[0]["costs"] == {"slow": CostModel(0.5, 2.0)} and given[0]["classes"] is True
    code, out, err = run("run", config(tmp_path, SLEEPERS), "--adapt", "--duration", "0.4", "--json")
    assert (code, err) == (0, ""), err
    assert given[1]["costs"] == {} and given[1]["classes"] is False


def test_failed_controller_moves_are_shown_in_the_text_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only --json carried them: the text said nothing of the growth that kept failing.
    (tmp_path / "second_fails_cli.py").write_text(
        "import time\n\ndef build(ctx):\n    if ctx.instance >= 1:\n        raise RuntimeError('no second instance')\n"
        "    def serve(x):\n        time.sleep(0.02)\n        return x\n    return serve\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = config(tmp_path, '[models.m]\nfactory = "second_fails_cli:build"\nslo = { latency_ms = 1 }\n'
                            'load = { concurrency = 4 }\n')
    code, out, err = run("run", path, "--adapt", "--adapt-window-s", "0.2", "--duration", "3")
    assert (code, err) == (0, ""), err
    assert "controller error at " in out and "no second instance" in out, out


def test_a_config_that_is_no_regular_file_is_one_line(tmp_path: Path) -> None:
    # /dev/zero was read until memory ran out (a traceback ending in MemoryError), and a FIFO
    # with no writer blocked `plan` for good.
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path, why in (("/dev/zero", "not a regular file"), (str(fifo), "not a regular file"),
                      (str(tmp_path), "a directory")):
        code, out, err = run("plan", path)
        assert (code, out, err) == (2, "", f"apportion plan: error: {path}: cannot read it: {why}\n")
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * ((16 << 20) + 1))
    code, _, err = run("plan", str(big))
    assert code == 2 and "cannot read it: larger than 16 MiB" in err


@pytest.mark.parametrize("option", ["--duration", "--window-s", "--warmup-s", "--max-s"])
def test_seconds_beyond_what_a_timer_holds_are_a_usage_error(tmp_path: Path, option: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # `run --duration 1e10` started the models, then died in time.sleep: OverflowError.
    command = "run" if option == "--duration" else "bench"
    path = config(tmp_path, '[models.m]\nfactory = "process_models:echo"\n')
    with pytest.raises(SystemExit) as e:
        cli.main([command, path, option, "1e10"])
    assert e.value.code == 2
    assert f"argument {option}: must be a finite number" in capsys.readouterr().err
