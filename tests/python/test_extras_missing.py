"""What a user meets with an optional dependency missing: one error naming the extra that
installs it, at the moment the feature is asked for (never a traceback from deep inside an
import, never a server that says ready and then fails every request). Each case runs in a
child interpreter where the package is made unimportable (``sys.modules[name] = None``, which
``import`` and ``importlib.util.find_spec`` both read as not installed)."""

from __future__ import annotations

import importlib.abc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import apportion as ap

SIGNATURE = """
[models.echo]
factory = "apportion.examples.sleepers:fast"
[models.echo.signature]
inputs = [{ name = "x", datatype = "FP32", shape = [-1] }]
outputs = [{ name = "y", datatype = "FP32", shape = [-1] }]
"""


def without(modules: list[str], code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a child interpreter where ``modules`` cannot be imported."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def cli(modules: list[str], *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return without(modules, "from apportion.cli import main\nsys.exit(main(sys.argv[1:]))", *argv, cwd=cwd)


@pytest.fixture()
def echo_config(tmp_path: Path) -> Path:
    path = tmp_path / "echo.toml"
    path.write_text(SIGNATURE)
    return path


def test_importing_serve_without_its_extra_names_every_missing_package_and_the_extra() -> None:
    r = without(["numpy", "uvicorn"], """
        try:
            import apportion.serve
        except ImportError as e:
            print(e)
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("apportion.serve needs numpy, uvicorn, which the serve extra installs: "
                                "pip install 'apportion[serve]'")


@pytest.mark.parametrize("missing", [["orjson"], ["grpc", "prometheus_client"]])
def test_apportion_serve_without_its_extra_is_one_line_before_any_model_builds(echo_config: Path,
                                                                               missing: list[str]) -> None:
    r = cli(missing, "serve", str(echo_config), "--http-port", "0", "--grpc-port", "0")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("apportion serve: error: apportion.serve needs ")
    assert "pip install 'apportion[serve]'" in r.stderr and r.stdout == ""


def test_serve_loop_uvloop_without_uvloop_is_refused_before_the_models_build(tmp_path: Path) -> None:
    # A factory that says when it runs: the refusal comes before it.
    (tmp_path / "slow.py").write_text("def build(ctx):\n    print('built', flush=True)\n    return lambda x: x\n")
    (tmp_path / "c.toml").write_text(SIGNATURE.replace('factory = "apportion.examples.sleepers:fast"',
                                                       'factory = "slow:build"'))
    r = cli(["uvloop"], "serve", "c.toml", "--loop", "uvloop", "--http-port", "0", "--grpc-port", "-1", cwd=tmp_path)
    assert r.returncode == 1 and "built" not in r.stdout, (r.stdout, r.stderr)
    assert r.stderr.strip() == ("apportion serve: error: Server: loop='uvloop' needs the uvloop package "
                                "(pip install 'apportion[serve]')")


def test_a_torch_signature_without_torch_is_refused_when_declared() -> None:
    r = without(["torch"], """
        from apportion.serve import Signature, TensorSpec
        from apportion import QuotaError
        try:
            Signature(TensorSpec("x", "FP32", [-1]), TensorSpec("y", "FP32", [-1]), tensor="torch")
        except QuotaError as e:
            print(e)
        print(Signature(TensorSpec("x", "FP32", [-1]), TensorSpec("y", "FP32", [-1])).tensor)
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Signature: field 'tensor' is 'torch', but torch is not installed "
                                     "(pip install 'apportion[torch]', or tensor='numpy')", "numpy"]


def test_apportion_serve_with_a_torch_signature_without_torch_names_the_key(echo_config: Path) -> None:
    echo_config.write_text(SIGNATURE + 'tensor = "torch"\n')
    r = cli(["torch"], "serve", str(echo_config), "--http-port", "0", "--grpc-port", "-1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "models.echo.signature.tensor" in r.stderr and "torch is not installed" in r.stderr


def test_tune_without_matplotlib_is_refused_before_it_measures_or_makes_its_out_dir(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[models.echo]\nfactory = "apportion.examples.sleepers:fast"\n'
                   'load = { rate = 10.0 }\nslo = { latency_ms = 50.0 }\n')
    out = tmp_path / "out"
    r = cli(["matplotlib"], "tune", str(cfg), "--out", str(out), "--budget-s", "1", "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "the plot needs matplotlib: pip install 'apportion[tune]'" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("name", ["Cluster", "ClusterFuture"])
def test_the_ray_backed_names_without_ray_name_the_extra(name: str) -> None:
    r = without(["ray"], f"""
        import apportion.ray  # the planner is pure: it imports without Ray
        try:
            apportion.ray.{name}
        except ImportError as e:
            print(e)
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("apportion.ray.Cluster needs Ray (") and "pip install 'apportion[ray]'" in r.stdout


def test_ray_serve_without_ray_names_the_extra() -> None:
    r = without(["ray"], """
        try:
            import apportion.ray.serve
        except ImportError as e:
            print(e)
        """)
    assert r.returncode == 0 and "pip install 'apportion[ray]'" in r.stdout, (r.stdout, r.stderr)


def test_an_onnx_model_without_onnxruntime_fails_its_start_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from apportion.adapters.onnxruntime import onnx_model

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    rt = ap.Runtime()
    try:
        rt.add_model("onnx", factory=onnx_model(b"not read"))
        with pytest.raises(ImportError, match=r"onnx_model needs onnxruntime .*pip install 'apportion\[onnx\]'"):
            rt.start()
    finally:
        rt.close()


class _HttpSupportMissing(importlib.abc.MetaPathFinder):
    """tritonclient installed without its http extra: importing tritonclient.http raises
    RuntimeError (tritonclient's own), not ImportError."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == "tritonclient.http":
            raise RuntimeError("The installation does not include http support.")
        return None


def test_remote_load_over_http_without_tritonclients_http_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tritonclient")
    from apportion import load

    monkeypatch.delitem(sys.modules, "tritonclient.http", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_HttpSupportMissing(), *sys.meta_path])
    with pytest.raises(load.LoadError, match=r"load over HTTP needs tritonclient\[http,grpc\] "
                                             r"\(pip install 'apportion\[load\]'\): The installation does not"):
        load.RemoteTarget("http://127.0.0.1:9", ["m"])
