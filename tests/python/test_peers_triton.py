"""The model repository bench/peers/serve_triton.py writes for Triton run as a server: each
config.pbtxt read by Triton's own model configuration schema (tritonclient's protobuf)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

_DIR = Path(__file__).resolve().parents[2] / "bench" / "peers"


@pytest.fixture()
def serve_triton(monkeypatch: pytest.MonkeyPatch) -> object:
    mods = {}
    for name in ("models", "serve_triton"):  # serve_triton imports models as its server finds it
        spec = importlib.util.spec_from_file_location(name, _DIR / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mods[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, mods[name])
        spec.loader.exec_module(mods[name])
    return mods["serve_triton"]


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_an_unbatched_model_takes_its_batch_dim_as_a_variable_dim(serve_triton) -> None:
    c = parse(serve_triton.config_pbtxt("mlp256", {"instances": 2}))
    assert (c.name, c.backend, c.max_batch_size) == ("mlp256", "python", 0)
    assert (list(c.input[0].dims), list(c.output[0].dims)) == ([-1, 256], [-1, 256])
    assert c.input[0].data_type == model_config_pb2.TYPE_FP32 and c.input[0].name == "x" and c.output[0].name == "y"
    assert [(g.count, g.kind) for g in c.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert not c.HasField("dynamic_batching")


def test_a_batched_model_gets_the_dynamic_batcher(serve_triton) -> None:
    c = parse(serve_triton.config_pbtxt("conv", {"instances": 1, "batch": 8, "delay_ms": 2.0}))
    assert c.max_batch_size == 8 and list(c.input[0].dims) == [3, 64, 64] and list(c.output[0].dims) == [10]
    assert c.dynamic_batching.max_queue_delay_microseconds == 2000
    assert not c.dynamic_batching.HasField("default_queue_policy")


def test_a_model_with_an_slo_gets_the_queue_policy_even_at_batch_1(serve_triton) -> None:
    c = parse(serve_triton.config_pbtxt("encoder", {"instances": 1, "timeout_ms": 40.0, "max_queue": 64}))
    assert c.max_batch_size == 1 and list(c.input[0].dims) == [48, 128]
    q = c.dynamic_batching.default_queue_policy
    assert (q.timeout_action, q.default_timeout_microseconds, q.allow_timeout_override, q.max_queue_size) == (
        model_config_pb2.ModelQueuePolicy.REJECT, 40000, True, 64)
    assert c.dynamic_batching.max_queue_delay_microseconds == 0


def test_the_repository_has_each_models_config_and_code(serve_triton, tmp_path: Path) -> None:
    repo = serve_triton.repository({"noop": {"instances": 1}, "mlp": {"instances": 2, "batch": 4}}, tmp_path, 8000)
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()) == [
        "mlp/1/model.py", "mlp/config.pbtxt", "noop/1/model.py", "noop/config.pbtxt"]
    assert parse((repo / "mlp" / "config.pbtxt").read_text()).instance_group[0].count == 2
    compile((repo / "noop" / "1" / "model.py").read_text(), "model.py", "exec")


def test_a_batch_is_run_once_and_each_request_gets_its_own_rows(serve_triton) -> None:
    import numpy as np

    models = sys.modules["models"]
    calls = []

    def run(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        return x * 2

    xs = [np.full((1, 3), 1.0), np.full((2, 3), 2.0), np.full((1, 3), 3.0)]
    ys = models.run_each(run, xs)
    assert calls == [(4, 3)] and [y.tolist() for y in ys] == [[[2.0] * 3], [[4.0] * 3] * 2, [[6.0] * 3]]
    assert [y.tolist() for y in models.run_each(run, xs[:1])] == [[[2.0] * 3]] and calls[-1] == (1, 3)
