"""Same-run A/B of the round trips: run it alternately with two builds (e.g. PYTHONPATH=<old
checkout>/python python bench/python/ab_roundtrip.py old; python bench/python/ab_roundtrip.py new)
and compare the lines. Prints ThreadPoolExecutor, submit().result(), call() on a thread and a
process model, submit_many throughput and a scheduled-pool round trip (µs, medians).
Run both from an interpreter with no apportion installed (a venv with its dependencies only):
an editable install's import hook wins over PYTHONPATH, and both runs would load that build
(check with `python -c "import apportion._core as c; print(c.__file__)"`)."""
import statistics, sys, time
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, __import__("os").path.dirname(__file__))
import apportion as ap

def med(fn, n=2000):
    for _ in range(200): fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - t0)
    return statistics.median(ts) / 1000

out = {}
pool = ThreadPoolExecutor(1)
out["tpe"] = med(lambda: pool.submit(int, 1).result())
rt = ap.Runtime(); rt.add_model("m", model=lambda x: x)
rt.add_model("p", factory="ab_models:echo", isolation="process"); rt.start()
out["submit"] = med(lambda: rt.submit("m", 1).result())
out["call"] = med(lambda: rt.call("m", 1))
out["proc_call"] = med(lambda: rt.call("p", 1), 1000)
out["proc_submit"] = med(lambda: rt.submit("p", 1).result(), 1000)
xs = list(range(256))
t0 = time.perf_counter(); n = 0
while time.perf_counter() - t0 < 1.0:
    for f in rt.submit_many("m", xs): f.result()
    n += len(xs)
out["many_kreq_s"] = n / (time.perf_counter() - t0) / 1e3
rt.close()
rt = ap.Runtime(shared_pool="scheduled"); rt.add_model("a", model=lambda x: x, weight=1.0); rt.add_model("b", model=lambda x: x, weight=3.0); rt.start()
out["pooled_submit"] = med(lambda: rt.submit("a", 1).result())
rt.close(); pool.shutdown()
print(sys.argv[1], " ".join(f"{k}={v:.1f}" for k, v in out.items()), flush=True)
