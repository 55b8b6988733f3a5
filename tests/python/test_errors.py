"""Every error apportion defines pickles and unpickles with its message and attributes: errors
cross process boundaries (a worker process's failure, a process pool's task)."""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import apportion as ap
from apportion.errors import ApportionError


def every_error_class() -> set[type[ApportionError]]:
    for info in pkgutil.walk_packages(ap.__path__, "apportion."):
        if info.name.startswith(("apportion.ray", "apportion.examples")) or info.name.endswith("__main__"):
            continue  # Ray's modules import ray; its error is covered below by name
        importlib.import_module(info.name)
    importlib.import_module("apportion.ray.plan")  # plan does not import ray
    seen: set[type[ApportionError]] = set()
    todo: list[type[ApportionError]] = [ApportionError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
    return seen


def examples() -> dict[str, Any]:
    from apportion.adapters.gpu import GpuMemoryExceeded
    from apportion.cli import InputsFailed, RequestsFailed
    from apportion.config import ConfigError, DoesNotFit, StartFailed
    from apportion.load import LoadError
    from apportion.load.remote import RemoteError, RemoteExpired, RemoteRejected
    from apportion.ray.plan import ClusterPlacementError
    from apportion.tune.tuner import ProfilingFailed

    return {
        "ApportionError": ApportionError("plain"),
        "QuotaError": ap.QuotaError("must be >= 1", model="m", field="instances"),
        "PlacementError": ap.PlacementError("does not fit", model="m", field="cores"),
        "QueueFull": ap.QueueFull("model 'm': queue full"),
        "DeadlineExceeded": ap.DeadlineExceeded("model 'm': deadline passed"),
        "RuntimeClosed": ap.RuntimeClosed("closed"),
        "RequestCancelled": ap.RequestCancelled("cancelled"),
        "ModelNotFound": ap.ModelNotFound("no model named 'x'", model="x"),
        "WorkerCrashed": ap.WorkerCrashed("model 'm' instance 0 died", model="m", instance=0, exitcode=-9),
        "ConfigError": ConfigError("a.toml", "models.x.cores", "must be >= 1"),
        "DoesNotFit": DoesNotFit("a.toml", None, "3 cores wanted, 2 here"),
        "StartFailed": StartFailed("a.toml", "models.x.factory", "raised"),
        "ProfilingFailed": ProfilingFailed("a.toml", "models.x", "raised in every run"),
        "InputsFailed": InputsFailed("a.toml", "models.x.load.inputs", "raised"),
        "RequestsFailed": RequestsFailed("model 'm': 3 of 9 requests failed"),
        "LoadError": LoadError("model 'm': rate must be > 0"),
        "RemoteError": RemoteError("http 500", "boom"),
        "RemoteRejected": RemoteRejected("http 429", "queue full"),
        "RemoteExpired": RemoteExpired("http 504", "deadline"),
        "ClusterPlacementError": ClusterPlacementError("no node has 4 cores", model="m", needed=4, available=2),
        "GpuMemoryExceeded": GpuMemoryExceeded("model 'm': over its budget"),
    }


def test_every_error_pickles_with_its_message_and_attributes() -> None:
    made = examples()
    missing = sorted(c.__name__ for c in every_error_class() if c.__name__ not in made)
    assert not missing, f"add an example of each to examples(): {missing}"
    for name, err in made.items():
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err), name
        assert str(again) == str(err) and again.args == err.args, name
        assert again.__dict__ == err.__dict__, name
    cpe = pickle.loads(pickle.dumps(made["ClusterPlacementError"]))
    assert (cpe.model, cpe.needed, cpe.available, cpe.shortfall) == ("m", 4, 2, 2)
    cfg = pickle.loads(pickle.dumps(made["ConfigError"]))
    assert (cfg.path, cfg.key) == ("a.toml", "models.x.cores")
    assert pickle.loads(pickle.dumps(made["RemoteRejected"])).kind == "http 429"
    pe = pickle.loads(pickle.dumps(made["PlacementError"]))
    assert (pe.model, pe.field, pe.kind) == ("m", "cores", "capacity")
    wc = pickle.loads(pickle.dumps(made["WorkerCrashed"]))
    assert (wc.model, wc.instance, wc.exitcode) == ("m", 0, -9)


def test_the_documented_attributes_are_there_when_not_known() -> None:
    # A handler reads e.model on any PlacementError / WorkerCrashed: None where not known.
    pe, wc = ap.PlacementError("does not fit"), ap.WorkerCrashed("no node serves it now")
    assert (pe.model, pe.field, pe.kind, str(pe)) == (None, None, "capacity", "does not fit")
    assert (wc.model, wc.instance, wc.exitcode, str(wc)) == (None, None, None, "no node serves it now")


def test_a_placement_the_machine_cannot_hold_names_the_model_and_field() -> None:
    rt = ap.Runtime()
    try:
        rt.add_model("first", model=lambda x: x, isolation="exclusive", cores=len(ap.topology().usable_cores))
        with pytest.raises(ap.PlacementError) as e:
            rt.add_model("second", model=lambda x: x, isolation="exclusive", cores=1)
        assert (e.value.model, e.value.field, e.value.kind) == ("second", "cores", "capacity")
    finally:
        rt.close()


@pytest.mark.parametrize(("package", "table"), [("apportion.ray", "_LAZY"), ("apportion.tune", "_OPTIONAL")])
def test_each_name_a_package_loads_on_first_use_is_declared_for_type_checkers(package: str, table: str) -> None:
    # Without the TYPE_CHECKING import, a checker reads the module's __getattr__ (-> Any) and
    # passes any use of the name, misspelled calls included.
    import ast
    import importlib

    mod = importlib.import_module(package)
    tree = ast.parse(Path(mod.__file__).read_text())
    declared = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.If)
                and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                for imp in node.body if isinstance(imp, ast.ImportFrom) for a in imp.names}
    assert declared == set(getattr(mod, table))


def test_a_config_error_in_a_process_pool_reaches_the_caller(tmp_path: Any) -> None:
    # It failed to unpickle in the parent: the pool broke (BrokenProcessPool for this task and
    # every later one). In a process of its own: a spawn pool leaves its resource tracker
    # running as a child of the process that made it.
    bad = tmp_path / "bad.toml"
    bad.write_text("[models.m]\ncores = -1\n")
    script = textwrap.dedent(f"""
        import concurrent.futures as cf, multiprocessing
        import apportion as ap

        if __name__ == "__main__":
            with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                try:
                    pool.submit(ap.Config.load, {str(bad)!r}).result(timeout=120)
                except ap.ConfigError as e:
                    print(type(e).__name__, e.path == {str(bad)!r}, "cores" in str(e))
                print(pool.submit(str, 1).result(timeout=60))  # the pool still works
    """)
    (tmp_path / "pool.py").write_text(script)
    out = subprocess.run([sys.executable, str(tmp_path / "pool.py")], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ConfigError", "True", "True", "1"], out.stdout


def test_invalid_arguments_outside_the_runtime_are_apportion_errors_too() -> None:
    # They were plain ValueErrors: `except ap.ApportionError` missed them.
    from apportion.metrics import latency_bounds_ns
    from apportion.serve import Server
    from apportion.tune.allocation import allocate
    from apportion.tune.cost import CostModel, Sample

    bare = ap.LatencyStats(count=0, mean_ms=0.0, p50_ms=0.0, p90_ms=0.0, p99_ms=0.0, p999_ms=0.0, max_ms=0.0)
    cases = [
        (lambda: Server(ap.Runtime(), {}, loop="trio"), "loop must be one of"),
        (lambda: latency_bounds_ns(per_octave=3), "per_octave must divide 32"),
        (lambda: CostModel(-1.0, 2.0), "alpha_ms must be a finite number >= 0"),
        (lambda: Sample(0, 1, 1.0), "must be an int >= 1"),
        (lambda: allocate([], 2.0, objective="most"), "objective must be one of"),  # type: ignore[arg-type]
        (lambda: bare.since(bare), "both figures need their histogram"),
    ]
    for make, words in cases:
        with pytest.raises(ap.QuotaError, match=words):
            make()
