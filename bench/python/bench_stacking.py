"""The stacking wrapper's own cost per batch (what a batching model pays around its call):
an identity model, torch and numpy inputs of 256 floats, batches of 1 and 8; min of 5 x 20,000
calls, two builds alternated.

    python bench/python/bench_stacking.py OLD_BATCHING_PY

OLD_BATCHING_PY: another version's python/apportion/batching.py, e.g.
``git show d359e3f:python/apportion/batching.py > /tmp/batching_old.py`` (its relative imports
are rewritten to absolute ones on load); it is compared with the installed apportion.batching.
"""
import importlib.util
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from apportion import batching as batching_new


def load_old(path: str):
    text = re.sub(r"^from \.([\w.]*) import", lambda m: f"from apportion{'.' + m.group(1) if m.group(1) else ''} import",
                  Path(path).read_text(), flags=re.M)
    tmp = Path(tempfile.mkdtemp()) / "batching_old.py"
    tmp.write_text(text)
    spec = importlib.util.spec_from_file_location("batching_old", tmp)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["batching_old"] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


batching_old = load_old(sys.argv[1])

def run(mod, xs, n=20000):
    serve = mod.stacking("m", lambda b: b)
    t0 = time.perf_counter()
    for _ in range(n):
        serve(xs)
    return (time.perf_counter() - t0) / n * 1e6

cases = {"torch x1": [torch.randn(256)], "torch x8": [torch.randn(256) for _ in range(8)],
         "numpy x1": [np.random.rand(256)], "numpy x8": [np.random.rand(256) for _ in range(8)]}
for name, xs in cases.items():
    old, new = [], []
    for r in range(5):
        for mod, out in ((batching_old, old), (batching_new, new)) if r % 2 == 0 else ((batching_new, new), (batching_old, old)):
            out.append(run(mod, xs))
    print(f"{name}: old {min(old):.2f} us, installed {min(new):.2f} us per batch ({min(new) - min(old):+.2f} us)")
