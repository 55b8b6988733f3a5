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

from .app import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, asgi
from .configured import signatures
from .server import Server
from .tensors import DATATYPES, Signature, TensorError, TensorSpec

__all__ = ["DATATYPES", "DEFAULT_BODY_TIMEOUT_S", "DEFAULT_MAX_BODY_BYTES", "Server", "Signature", "TensorError", "TensorSpec", "asgi", "signatures"]
