"""A Ray Serve deployment whose replica serves several models under apportion quotas.

Plain Serve gives each model deployment a logical CPU count and nothing more: no pinning, the
framework's thread pools at the machine's width, replicas of different models interfering on a
node. :func:`deployment` turns a config into one Serve deployment whose every replica runs an
:class:`apportion.Runtime` with all of the config's models (pinning, per-model threads, queues,
batching, weights as on one host), reserving from Ray the cores those models take::

    from ray import serve
    from apportion.ray.serve import deployment

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    handle = serve.run(deployment(ap.Config.load("models.toml")), name="apportion",
                       route_prefix="/apportion")
    y = handle.infer.remote("ranker", x).result()          # through a handle
    # HTTP: POST /apportion/ranker with {"inputs": x}  ->  {"model": "ranker", "outputs": y}

Over HTTP, ``GET <prefix>/`` lists the models, ``POST <prefix>/<model>`` takes a JSON body
``{"inputs": ..., "timeout_ms": ..., "priority": ...}`` (only ``inputs`` required) and answers
``{"model", "outputs"}``; errors answer ``{"error", "type"}`` with 404 (ModelNotFound), 429
with ``Retry-After: 1`` (QueueFull, as ``apportion serve`` answers it), 504
(DeadlineExceeded), 422 (a body without ``inputs``) or 500 (the model's own exception).
Through a handle, errors are raised as the single-host runtime raises them (Ray wraps them in
a RayTaskError that is also an instance of the original class); one that Ray cannot rebuild in
the caller arrives as a RuntimeError naming the model, its class and its message.

The replica's runtime uses the CPUs named by its node's ``apportion-cpus`` label (see
:data:`apportion.ray.cluster.CPU_SET_LABEL`), else every CPU its process may use. Factories
must be importable where the replica runs ("module:function" paths, or module-level functions).
"""

# No "from __future__ import annotations": FastAPI reads the endpoints' annotations at run time
# (a string "Request" would make it look for a query parameter named request).

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, cast

try:
    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve
except ImportError as e:
    raise ImportError(f"apportion.ray.serve needs Ray Serve ({e}): pip install 'apportion[ray]'",
                      name=__name__) from e

from ..errors import DeadlineExceeded, ModelNotFound, PlacementError, QueueFull, RequestCancelled
from ..futures import on_loop
from ..spec import ModelSpec
from ._node import ModelCounts, counts, raise_portable, runtime_settings, started_runtime, tamed
from .cluster import CPU_SET_LABEL, ray_nodes
from .plan import Node, plan

__all__ = ["ApportionReplica", "deployment"]

_http = FastAPI()

_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (ModelNotFound, 404), (QueueFull, 429), (DeadlineExceeded, 504), (RequestCancelled, 503))


def _error_response(e: Exception) -> JSONResponse:
    status = next((code for cls, code in _STATUS if isinstance(e, cls)), 500)
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse({"error": str(e), "type": type(e).__name__}, status_code=status, headers=headers)


@serve.deployment
@serve.ingress(_http)
class ApportionReplica:
    """One Serve replica: an apportion runtime with every model of the config."""

    def __init__(self, specs: Sequence[ModelSpec], cpu_set_label: str = CPU_SET_LABEL,
                 settings: Mapping[str, Any] | None = None) -> None:
        # Ray annotates the values as lists; they are the node's label strings, as ray.nodes()
        # reports them ("0-3_8", see CPU_SET_LABEL).
        labels = cast(dict[str, str], ray.get_runtime_context().get_node_labels())
        label = labels.get(cpu_set_label)
        self.rt = started_runtime(label.replace("_", ",") if label else None, specs, settings)

    async def infer(self, model: str, inputs: Any, timeout_ms: float | None = None,
                    priority: int | None = None) -> Any:
        """One request through a handle: ``handle.infer.remote(model, inputs)``."""
        try:
            return await self.rt.infer(model, inputs, timeout_ms=timeout_ms, priority=priority)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise_portable(model, e)
            raise
        except BaseException as e:  # the model's SystemExit, KeyboardInterrupt...
            raise tamed(model, e) from None

    def models(self) -> list[str]:
        return list(self.rt.models)

    def stats(self) -> dict[str, ModelCounts]:
        """Outcome counts and end-to-end p50/p99 per model (``handle.stats.remote()``)."""
        return counts(self.rt)

    @_http.get("/")
    def http_models(self) -> dict[str, list[str]]:
        return {"models": list(self.rt.models)}

    @_http.post("/{model}")
    async def http_infer(self, model: str, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "inputs" not in body:
            return JSONResponse({"error": 'give a JSON object with "inputs" (and optionally "timeout_ms", '
                                          '"priority")', "type": "BadRequest"}, status_code=422)
        try:
            # Submitted first: a timeout_ms or priority the runtime refuses is the client's error
            # (422), not the model's (500), and nothing ran.
            fut = self.rt.submit(model, body["inputs"], timeout_ms=body.get("timeout_ms"),
                                 priority=body.get("priority"))
        except (ValueError, TypeError) as e:
            return JSONResponse({"error": str(e), "type": type(e).__name__}, status_code=422)
        except Exception as e:  # noqa: BLE001 - every error becomes an HTTP answer
            return _error_response(e)
        try:
            out = await on_loop(fut, asyncio.get_running_loop(), model)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every error becomes an HTTP answer
            return _error_response(e)
        except BaseException as e:  # the model's SystemExit, KeyboardInterrupt...: not the replica's
            return _error_response(tamed(model, e))
        try:
            return JSONResponse({"model": model, "outputs": out})
        except (TypeError, ValueError) as e:  # bytes, an array, NaN: not JSON
            return JSONResponse({"error": f"model {model!r}: its output cannot be sent as JSON: {e}",
                                 "type": "OutputError"}, status_code=500)

    def __del__(self) -> None:
        rt = getattr(self, "rt", None)
        if rt is not None:
            rt.close(drain=False)


def deployment(config: Any, *, name: str = "apportion", num_replicas: int = 1, num_cpus: float | None = None,
               num_gpus: float | None = None, max_ongoing_requests: int = 10_000,
               cpu_set_label: str = CPU_SET_LABEL) -> Any:
    """A Serve application (``serve.run`` it) of one deployment named ``name`` whose
    ``num_replicas`` replicas each serve every model of ``config`` (an :class:`apportion.Config`
    or a sequence of :class:`apportion.ModelSpec`) under its quotas, with a Config's
    ``[runtime]`` settings (shared_pool, pool_reserve, reserve_nice; its ``cpus`` names CPUs of
    one host, so each replica takes its node's CPU set instead).

    ``num_cpus``: the CPUs each replica reserves from Ray (default: the exclusive models' cores,
    counted as :func:`apportion.ray.plan` counts them, plus the widest shared model's instances
    x threads: the shared models float together on one pool, as on one host; the runtime
    divides its CPU set either way). ``num_gpus``: the GPUs each replica reserves (default: one
    past the highest GPU index a model's ``gpu=`` names, none without GPU models; Ray makes the
    GPUs it gives the replica visible as 0, 1, ..., the indices the specs use).
    ``max_ongoing_requests``: Serve's bound per replica; keep
    it above the models' ``max_queue`` sum so that apportion's admission (QueueFull per model)
    bounds the queues."""
    from .plan import _gpu_index, _models

    specs = list(_models(config)[0].values())
    # The replica's node as its specs need it: every GPU index and NUMA node they name (Ray
    # then picks a node that has them; the runtime refuses a replica placed where they lack).
    gpus = 1 + max((g for g in map(_gpu_index, specs) if g is not None), default=-1)
    numa = 1 + max((s.numa for s in specs if isinstance(s.numa, int) and not isinstance(s.numa, bool)), default=0)
    replicas = plan(specs, [Node("replica", 1 << 16, gpus=gpus, numa_nodes=numa)]).node("replica").replicas
    own = sum(r.cores for r in replicas if r.spec.quota.isolation == "exclusive")
    pool = max((r.cores for r in replicas if r.spec.quota.isolation != "exclusive"), default=0)
    cpus = float(own + pool) if num_cpus is None else float(num_cpus)
    options: dict[str, Any] = {"num_cpus": cpus}
    if num_gpus is not None or gpus:
        options["num_gpus"] = float(gpus if num_gpus is None else num_gpus)
    if ray.is_initialized():
        # No node of the connected cluster can hold a replica: serve.run would wait for one
        # for ever (Serve reports the deployment as still scheduling). Ray places it by the
        # nodes' resources, not by the CPUs their labels give apportion. (ray_nodes() also
        # refuses a label that is no CPU list, naming the node.)
        ray_nodes(cpu_set_label)
        nodes = [(int(n.get("Resources", {}).get("CPU", 0)), int(n.get("Resources", {}).get("GPU", 0)))
                 for n in ray.nodes() if n.get("Alive")]
        need_gpus = options.get("num_gpus", 0.0)
        if nodes and not any(c >= cpus and g >= need_gpus for c, g in nodes):
            most_cpus, most_gpus = max(nodes)
            raise PlacementError(f"deployment {name!r}: a replica reserves {cpus:g} CPUs"
                                 + (f" and {need_gpus:g} GPUs" if need_gpus else "")
                                 + f"; no node of the connected Ray cluster has them (the largest: {most_cpus} "
                                 f"CPUs, {most_gpus} GPUs): serve.run would wait for such a node for ever")
    return ApportionReplica.options(  # type: ignore[attr-defined]
        name=name, num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options=options,
    ).bind([r.spec for r in replicas], cpu_set_label, runtime_settings(config))
