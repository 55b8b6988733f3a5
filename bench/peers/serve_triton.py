"""Triton Inference Server run directly, as production deployments run it: the ``tritonserver``
binary that nvidia-pytriton ships, a model repository written here, each model on Triton's
Python backend (one stub process per instance, torch at one thread in each), no PyTriton
proxy between Triton and the model. The same models as every peer (bench/peers/models.py).

Each model's config.pbtxt: ``instance_group`` of "instances" CPU instances; with "batch" > 1
the dynamic batcher (max_batch_size = batch, max_queue_delay = delay_ms); with "timeout_ms"
and "max_queue" (the demo's models) the batcher's queue policy as serve_pytriton.py sets it
(at most max_queue waiting, a request whose timeout passes while it waits refused), which
needs the batcher, so such a model gets it at batch 1 too.

    python serve_triton.py PORT '{"mlp256": {"instances": 2, "batch": 1, "delay_ms": 0}}' WORK_DIR
    (HTTP on PORT, gRPC on PORT+1, both on 127.0.0.1; no metrics port; the server's files
    copied once into WORK_DIR/tritonserver-VERSION-pyX.Y, the model repository in
    WORK_DIR/models-PORT, removed when the server exits)

Run from nvidia-pytriton's venv (bench/peers/install.sh pytriton), whose interpreter's
version picks the Python backend's stub.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import models

HERE = Path(__file__).resolve().parent


def pytriton_dir() -> Path:
    """nvidia-pytriton's package: its ``tritonserver`` folder (binary, backends, the Python
    backend's stubs) and, beside it, ``nvidia_pytriton.libs`` (the binary's libraries)."""
    import pytriton

    return Path(pytriton.__file__).resolve().parent


MODEL_PY = '''\
import numpy as np
import triton_python_backend_utils as pb_utils

import models


class TritonPythonModel:
    def initialize(self, args):
        import torch

        torch.set_num_threads(1)
        self.run = models.runner(args["model_name"])

    def execute(self, requests):
        ys = models.run_each(self.run, [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests])
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", np.ascontiguousarray(y, dtype=np.float32))])
                for y in ys]
'''


def dims(shape: tuple[int, ...], batched: bool) -> str:
    """A tensor's dims in config.pbtxt: without the batch dim where Triton adds it."""
    return ", ".join(map(str, shape[1:] if batched else (-1, *shape[1:])))


def config_pbtxt(name: str, c: dict[str, Any]) -> str:
    x, y = models.SHAPES[name]
    batch = int(c.get("batch", 1))
    policy = "timeout_ms" in c
    batched = batch > 1 or policy
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {batch if batched else 0}",
             f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {dims(x, batched)} ] }} ]',
             f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {dims(y, batched)} ] }} ]',
             f"instance_group [ {{ count: {int(c.get('instances', 1))} kind: KIND_CPU }} ]"]
    if batched:
        queue = ""
        if policy:
            queue = (" default_queue_policy { timeout_action: REJECT allow_timeout_override: true "
                     f"default_timeout_microseconds: {int(float(c['timeout_ms']) * 1000)} "
                     f"max_queue_size: {int(c['max_queue'])} }}")
        delay = int(float(c.get("delay_ms", 0.0)) * 1000)
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {delay}{queue} }}")
    return "\n".join(lines) + "\n"


def repository(config: dict[str, dict[str, Any]], root: Path, port: int) -> Path:
    repo = root / f"models-{port}"
    shutil.rmtree(repo, ignore_errors=True)
    for name, c in config.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config_pbtxt(name, c))
        (repo / name / "1" / "model.py").write_text(MODEL_PY)
    return repo


def server_dir(root: Path) -> Path:
    """The binary and its backends, with the Python backend's stub for this interpreter."""
    from importlib.metadata import version

    # Named by the package's version and the interpreter's: another install copies afresh.
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    dist, src = root / f"tritonserver-{version('nvidia-pytriton')}-py{py}", pytriton_dir() / "tritonserver"
    if not dist.exists():
        part = dist.with_name(dist.name + ".part")  # a copy cut short is never taken for whole
        shutil.rmtree(part, ignore_errors=True)
        shutil.copytree(src, part, ignore=shutil.ignore_patterns("python_backend_stubs"))
        shutil.copy(src / "python_backend_stubs" / py / "triton_python_backend_stub",
                    part / "backends" / "python" / "triton_python_backend_stub")
        part.rename(dist)
    return dist


def main(port: int, config: dict[str, dict[str, Any]], work: str) -> None:
    root = Path(work)
    root.mkdir(parents=True, exist_ok=True)
    dist, repo = server_dir(root), repository(config, root, port)
    env = dict(os.environ)
    # The stubs run this venv's packages (torch, numpy) and models.py; the binary its own libraries.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), sysconfig.get_paths()["purelib"],
                                                      env.get("PYTHONPATH")]))
    libs = pytriton_dir().parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    cmd = [str(dist / "bin" / "tritonserver"), f"--model-repository={repo}",
           f"--backend-directory={dist / 'backends'}", f"--cache-directory={dist / 'caches'}",
           "--http-address=127.0.0.1", f"--http-port={port}", "--grpc-address=127.0.0.1",
           f"--grpc-port={port + 1}", "--allow-metrics=false",
           f"--backend-config=python,shm-region-prefix-name=triton{port}_", "--log-verbose=0"]
    proc = subprocess.Popen(cmd, env=env)
    signal.signal(signal.SIGTERM, lambda *a: proc.send_signal(signal.SIGINT))
    code = proc.wait()
    shutil.rmtree(repo, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main(int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3])
