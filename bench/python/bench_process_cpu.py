"""CPU-bound requests through two process instances against ProcessPoolExecutor(2), alternated
in one run, with where the CPU time went: the children's CPU per request (from /proc) and the
parent's (time.process_time). The work is bench_process.work (a pure-Python loop).

    python bench/python/bench_process_cpu.py [N] [REPS] [SPIN_US]

N requests in flight per repetition (default 40), REPS repetitions (default 7), SPIN_US the
model's spin_us (default: the runtime's default).
"""

import concurrent.futures as cf
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_process as bp  # noqa: E402

import apportion as ap  # noqa: E402


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    spin = float(sys.argv[3]) if len(sys.argv) > 3 else None
    work = 400_000
    ctx = mp.get_context("spawn")
    rt = ap.Runtime()
    kw = {} if spin is None else {"spin_us": spin}
    rt.add_model("cpu_proc", factory="bench_process:work_factory", isolation="process", instances=2, **kw)
    rt.start()
    ppe2 = cf.ProcessPoolExecutor(max_workers=2, mp_context=ctx)
    def run_rt():
        for f in [rt.submit("cpu_proc", work) for _ in range(n)]: f.result()
    def run_ppe():
        [f.result() for f in [ppe2.submit(bp.work, work) for _ in range(n)]]
    for f in (run_rt, run_ppe): f()
    r = {"rt": [], "ppe": []}; cpu = {}; ccpu = {}
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    def ptime(pids):
        t = 0
        for p in pids:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            t += (int(f[11]) + int(f[12])) * tick
        return t
    rt_pids = [p.pid for p in rt._models["cpu_proc"].processes]
    ppe_pids = list(ppe2._processes.keys())
    pids = {"rt": rt_pids, "ppe": ppe_pids}
    for i in range(reps):
        for k, f in (("rt", run_rt), ("ppe", run_ppe)) if i % 2 == 0 else (("ppe", run_ppe), ("rt", run_rt)):
            c = time.process_time(); cc = ptime(pids[k]); t = time.perf_counter(); f(); r[k].append(n / (time.perf_counter() - t))
            ccpu.setdefault(k, []).append((ptime(pids[k]) - cc) / n * 1e3)
            cpu.setdefault(k, []).append((time.process_time() - c) / n * 1e6)
    ratios = [a / b for a, b in zip(r["rt"], r["ppe"])]
    print(f"n={n} spin={spin} rt {statistics.median(r['rt']):.1f}/s ppe {statistics.median(r['ppe']):.1f}/s ratio med {statistics.median(ratios):.3f} all {[round(x,3) for x in ratios]}")
    print("children CPU ms/request:", {k: round(statistics.median(v), 2) for k, v in ccpu.items()})
    print("parent CPU us/request:", {k: round(statistics.median(v), 1) for k, v in cpu.items()})
    rt.close(); ppe2.shutdown()

if __name__ == "__main__":
    main()
