"""ONNX Runtime adapter: the session is created inside the pinned worker thread.

ONNX Runtime starts its intra-op thread pool when the session is created, and those threads
inherit the creating thread's CPU mask, so creating the session in the worker confines them.
``intra_op_num_threads`` comes from the instance's quota; spinning is disabled on shared cores
(an idle spinning pool would steal time from the models it shares them with) and enabled on
an instance's own CPUs (``ctx.own_cpus``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["OnnxModel", "onnx_model"]


class OnnxModel:
    """Runs an ``onnxruntime.InferenceSession``: an array goes to the model's single input;
    a mapping is passed as the feed. Returns the first output, or all when there are several."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]

    def __call__(self, x: Any) -> Any:
        feed = dict(x) if isinstance(x, Mapping) else {self.inputs[0]: x}
        out = self.session.run(None, feed)
        return out[0] if len(out) == 1 else out


def onnx_model(model: str | os.PathLike[str] | bytes, *, spin: bool | None = None,
               providers: list[str] | None = None) -> Callable[[Any], OnnxModel]:
    """A factory for ``add_model(factory=...)``: each instance builds its own session in its
    worker, with ``intra_op_num_threads`` = the instance's threads (else its CPU count).
    ``spin`` defaults to off on the shared pool and on where the instance's CPUs are its
    model's alone (``ctx.own_cpus``: exclusive models, process models with ``cores``)."""

    def factory(ctx: Any) -> OnnxModel:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(f"onnx_model needs onnxruntime ({e}): pip install 'apportion[onnx]'") from e

        so = ort.SessionOptions()
        threads = ctx.threads or (len(ctx.cpus) if ctx.cpus else 0)
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        allow = spin if spin is not None else (getattr(ctx, "own_cpus", False)
                                               or getattr(ctx, "isolation", "shared") == "exclusive")
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow else "0")
        src = model if isinstance(model, bytes) else os.fspath(model)
        session = ort.InferenceSession(src, sess_options=so,
                                       providers=providers or ["CPUExecutionProvider"])
        return OnnxModel(session)

    return factory
