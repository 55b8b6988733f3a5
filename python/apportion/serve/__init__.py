"""Serving a runtime's models over the network: the Open Inference Protocol (KServe v2) over
HTTP/REST (an ASGI app, served by uvicorn) and gRPC (grpcio). Needs the ``serve`` extra:
``pip install "apportion[serve]"``.

.. code-block:: python

    from apportion.serve import Server, Signature, TensorSpec

    sigs = {"ranker": Signature(inputs=[TensorSpec("x", "FP32", [-1, 256])],
                                outputs=[TensorSpec("y", "FP32", [-1, 1])])}
    Server(rt, sigs, http_port=8000, grpc_port=8001).serve_forever()
    # or embed: fastapi_app.mount("/", apportion.serve.asgi(rt, sigs))
"""

from __future__ import annotations

from importlib.util import find_spec

# What the extra installs and this package imports (the gRPC front imports grpcio and
# tritonclient's generated stubs when it starts): one ImportError naming the extra and every
# missing package, rather than a traceback from the first import that fails.
_NEEDS = (("numpy", "numpy"), ("orjson", "orjson"), ("prometheus_client", "prometheus-client"),
          ("uvicorn", "uvicorn"), ("httptools", "httptools"), ("grpc", "grpcio"),
          ("tritonclient", "tritonclient[grpc]"))


def _missing() -> list[str]:
    return [dist for module, dist in _NEEDS if find_spec(module) is None]


if _gone := _missing():
    raise ImportError(f"apportion.serve needs {', '.join(_gone)}, which the serve extra installs: "
                      "pip install 'apportion[serve]'", name="apportion.serve")

from .app import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, asgi  # noqa: E402
from .configured import signatures  # noqa: E402
from .server import Server  # noqa: E402
from .tensors import DATATYPES, Signature, TensorError, TensorSpec  # noqa: E402

__all__ = ["DATATYPES", "DEFAULT_BODY_TIMEOUT_S", "DEFAULT_MAX_BODY_BYTES", "Server", "Signature", "TensorError", "TensorSpec", "asgi", "signatures"]
