"""Load generator: drive models of a running :class:`~apportion.Runtime` and measure them.

perf_analyzer-style measurement for the models of a runtime the caller built::

    import apportion as ap
    from apportion import load

    report = load.run(rt, [
        load.ModelLoad("ranker", concurrency=4, inputs=make_query,
                       slo=load.SLO(latency_ms=20, percentile=99)),
        load.ModelLoad("echo", rate=500.0, inputs=[b"a", b"b"]),
    ], warmup_s=1.0, window_s=1.0, tolerance=0.1, max_s=30.0)
    print(report)                 # one table row per model
    report.to_json()              # the same, machine-readable

Each model gets either

- a **closed loop** (``concurrency=N``): N requests outstanding at all times; a completion
  lets the next one in. Throughput then reflects the model's capacity at that concurrency.
- an **open loop** (``rate=R``): arrivals at R per second (Poisson by default), scheduled at
  absolute times so that a late submission never shifts the ones after it. An arrival the
  runtime refuses (``QueueFull``) is counted as rejected and dropped, never retried: an open
  loop models independent clients, and retrying would hide overload.

After ``warmup_s`` the run is cut into windows of ``window_s``. It stops as soon as the last
``stable_windows`` windows agree, for every model, on throughput and p99 end-to-end latency
within ``tolerance`` (each window within that fraction of their mean), or when ``max_s``
would be exceeded. The report aggregates those last windows and says whether they were stable.

Where figures come from:

- end-to-end latency is measured here, per request, from just before ``submit`` to the
  moment the request's done-callback runs (exact percentiles over the reported windows);
- goodput counts completions whose end-to-end latency met the model's SLO;
- queue wait, compute and the runtime's own end-to-end latency come from its native histograms
  (``rt.stats()``), snapshotted at every window boundary: a window's figures
  (``WindowStats.queue_wait``, ``.compute``, ``.end_to_end``) are the percentiles of the
  later snapshot's buckets minus the earlier one's (:func:`window_latency`), computed natively,
  each within ~3% of the truth; a model's ``queue_wait``/``compute``/``end_to_end`` cover the
  reported windows the same way, and their means are exact (differences of counts and sums).
  ``str(report)`` lists them per window.

The same loads drive a KServe v2 server over the network (``apportion serve``, Triton, ...)
through :class:`RemoteTarget` (``apportion bench --url http://127.0.0.1:8000``): see
:mod:`apportion.load.remote` for what differs (no runtime histograms; refusals and errors
arrive as responses, counted by kind in ``ModelReport.errors``). Every report also counts the
whole run's requests (``ModelReport.totals``: warm-up and the final drain included), which is
what a server's own counters show for the same run.

One driver thread per model submits requests and accounts for completions; a request's
done-callback (run by the worker that completed it) only stamps the time and hands the future
to that driver, so the model's worker spends well under a microsecond of Python per request
on the generator's behalf. A :class:`RemoteTarget`'s loads run on the target's event loop
instead: requests are sent and answers accounted for there, with no hand-off between threads
per request (the generator then costs about as much CPU per request as the client library
itself, which matters when it shares the CPUs with the server it measures).
"""

from __future__ import annotations

from .driver import failed_model, run
from .remote import RemoteError, RemoteExpired, RemoteRejected, RemoteResult, RemoteTarget
from .report import (
    LoadReport,
    ModelReport,
    Totals,
    WindowStats,
    histogram_latency,
    window_latency,
    windows_stable,
)
from .spec import MIN_WINDOW_S, SLO, SPEC_KEYS, LoadError, ModelLoad, model_load, parse_spec

__all__ = [
    "MIN_WINDOW_S",
    "SLO",
    "SPEC_KEYS",
    "LoadError",
    "LoadReport",
    "ModelLoad",
    "ModelReport",
    "RemoteError",
    "RemoteExpired",
    "RemoteRejected",
    "RemoteResult",
    "RemoteTarget",
    "Totals",
    "WindowStats",
    "failed_model",
    "histogram_latency",
    "model_load",
    "parse_spec",
    "run",
    "window_latency",
    "windows_stable",
]
