"""What every server in the peer comparison serves: the same torch models, the same request
tensors, the same v2 signatures. Imported by each peer's server (in its own venv, which has
apportion installed only for apportion.demo's model builders) and by the client (inputs).

Every request carries a leading batch dim of 1, so the same bytes suit a server that batches
along dim 0 (Triton's max_batch_size, Ray's @serve.batch, LitServe's batch) and one that does
not; the models accept any number of leading dims.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# name -> (input shape of one request, output shape of one request); tensors "x" -> "y", FP32
SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "noop": ((1, 4), (1, 4)),
    "mlp256": ((1, 256), (1, 256)),
    "mlp": ((1, 8, 512), (1, 8, 256)),
    "conv": ((1, 3, 64, 64), (1, 10)),
    "encoder": ((1, 48, 128), (1, 48, 128)),
}

SCENARIOS: dict[str, tuple[str, ...]] = {
    "noop": ("noop",),
    "mlp256": ("mlp256",),
    "demo": ("mlp", "conv", "encoder"),
}


def signature(name: str) -> dict[str, Any]:
    """v2 model metadata (variable batch dim)."""
    x, y = SHAPES[name]
    return {"name": name, "versions": ["1"], "platform": "python",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, *x[1:]]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, *y[1:]]}]}


def build(name: str) -> Any:
    """The model ``name`` as a callable on a torch tensor (eval mode, fixed seeds)."""
    import torch

    if name == "noop":
        return lambda x: x
    if name == "mlp256":
        torch.manual_seed(4)
        nn = torch.nn
        return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 256)).eval()
    from apportion import demo

    return {"mlp": demo.build_mlp, "conv": demo.build_conv, "encoder": demo.build_encoder}[name]().eval()


def runner(name: str) -> Any:
    """``build(name)`` as numpy in, numpy out, under inference mode (what the peers call)."""
    import torch

    model = build(name)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run


def run_each(run: Any, xs: list[np.ndarray]) -> list[np.ndarray]:
    """``run`` on several requests' inputs at once (one call on them stacked along the batch
    dim, one request alone as it is), and each request's rows of the output."""
    if len(xs) == 1:
        return [run(xs[0])]
    y = run(np.concatenate(xs))
    out, i = [], 0
    for x in xs:
        out.append(y[i:i + len(x)])
        i += len(x)
    return out


_INPUTS: dict[str, np.ndarray] = {}


def request(name: str) -> np.ndarray:
    x = _INPUTS.get(name)
    if x is None:
        x = _INPUTS[name] = np.random.default_rng(len(name)).standard_normal(SHAPES[name][0]).astype(np.float32)
        x.flags.writeable = False  # one request for every call: the load client need not check it changed
    return x


# zero-argument input makers for `apportion bench --inputs NAME=models:NAME_input`
def noop_input() -> np.ndarray:
    return request("noop")


def mlp256_input() -> np.ndarray:
    return request("mlp256")


def mlp_input() -> np.ndarray:
    return request("mlp")


def conv_input() -> np.ndarray:
    return request("conv")


def encoder_input() -> np.ndarray:
    return request("encoder")


# apportion serve factories (the config files name them as models:NAME_factory)
def _factory(name: str) -> Any:
    def make(ctx: Any = None) -> Any:
        return build(name)

    make.__name__ = f"{name}_factory"
    return make


noop_factory = _factory("noop")
mlp256_factory = _factory("mlp256")
mlp_factory = _factory("mlp")
conv_factory = _factory("conv")
encoder_factory = _factory("encoder")
