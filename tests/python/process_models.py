"""Factories for process-isolated test models: the worker process imports them by path
("process_models:name"), so they live in a plain module, not in a test file."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any


def echo(ctx: Any) -> Any:
    return lambda x: x


def info(ctx: Any) -> Any:
    def serve(x: Any) -> Any:
        return {"pid": os.getpid(), "ppid": os.getppid(), "cpus": sorted(os.sched_getaffinity(0)),
                "model": ctx.model, "instance": ctx.instance, "isolation": ctx.isolation,
                "ctx_cpus": ctx.cpus, "threads": ctx.threads, "x": x}

    return serve


def _scribble_on_the_reply_ring() -> None:
    """Publishes, on this child's reply ring, a frame whose one part claims 1 GiB."""
    import ctypes
    import struct

    with open("/proc/self/maps") as maps:
        base = next(int(line.split("-")[0], 16) for line in maps if "/dev/shm/apportion-" in line)
    cap = ctypes.c_uint64.from_address(base + 16).value  # Header.ring_bytes
    header_bytes = 64 + 2 * 256  # magic, version, ring_bytes in the first line; two rings of 4 lines
    head = ctypes.c_uint64.from_address(base + 64 + 256)  # rings[1].head
    frame = base + header_bytes + cap + head.value % cap
    ctypes.memmove(frame, struct.pack("<QIIQ", 128, 1, 1, 1 << 30), 24)
    head.value += 128


def faulty(ctx: Any) -> Any:
    """Does what the input says: crash, exit, hang, raise, or echo."""

    def serve(x: Any) -> Any:
        if not isinstance(x, (str, tuple)):
            return x
        if x == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif x == "exit":
            os._exit(7)
        elif x == "hang":
            time.sleep(3600)
        elif x == "kill":  # what the OOM killer does
            os.kill(os.getpid(), signal.SIGKILL)
        elif x == "scribble":  # native code writing over the reply ring: a frame no sender writes
            _scribble_on_the_reply_ring()
            time.sleep(3600)
        elif isinstance(x, tuple) and x[0] == "hang_after":
            Path(x[1]).touch()
            time.sleep(3600)
        elif x == "raise":
            raise ValueError("the model refused")
        elif isinstance(x, tuple) and x[0] == "gate":
            # Blocks until the test creates x[2]; creates x[1] first to say it is running.
            Path(x[1]).touch()
            deadline = time.monotonic() + 60
            while not Path(x[2]).exists() and time.monotonic() < deadline:
                time.sleep(0.002)
            return "gate"
        return x

    return serve


def double_batch(ctx: Any) -> Any:
    return lambda xs: [2 * x for x in xs]


def failing_factory(ctx: Any) -> Any:
    raise RuntimeError(f"factory of {ctx.model!r} failed on purpose")


def second_fails(ctx: Any) -> Any:
    """Instance 1's factory raises; instance 0 builds (an echo)."""
    if ctx.instance == 1:
        raise RuntimeError(f"instance 1 of {ctx.model!r} refuses")
    return lambda x: x


def crashing_factory(ctx: Any) -> Any:
    os._exit(3)


def not_callable(ctx: Any) -> Any:
    return 42


def spin(ctx: Any) -> Any:
    """Pure-Python CPU work that holds the GIL: n iterations."""

    def serve(n: int) -> int:
        acc = 0
        for i in range(n):
            acc += i * i % 7
        return acc

    return serve


def torch_threads(ctx: Any) -> Any:
    import torch

    model = torch.nn.Linear(4, 2)

    class Probe(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return model(x), torch.get_num_threads(), torch.is_inference_mode_enabled()

    return Probe()


def thread_name(ctx: Any) -> Any:
    """Returns the name of the thread that serves it (and of one it starts)."""
    import threading

    def comm() -> str:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as fh:
            return fh.read().strip()

    def serve(x: Any) -> tuple[str, str]:
        seen: list[str] = []
        t = threading.Thread(target=lambda: seen.append(comm()))
        t.start()
        t.join()
        return comm(), seen[0]

    return serve


def lazy_torch_threads(ctx: Any) -> Any:
    """Imports torch only when called: returns the calling thread's intra-op thread count."""

    def serve(x: Any) -> int:
        import torch

        return int(torch.get_num_threads())

    return serve


def sleepy_factory(ctx: Any) -> Any:
    """Builds nothing for a long time (APPORTION_TEST_FACTORY_S seconds, default an hour)."""
    import os
    import time

    time.sleep(float(os.environ.get("APPORTION_TEST_FACTORY_S", "3600")))
    return lambda x: x


class ScoringError(Exception):
    """Like many libraries' errors: a constructor with more required arguments than it passes
    to Exception, so it pickles but does not unpickle."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def scoring_error(ctx: Any) -> Any:
    def model(x: Any) -> Any:
        raise ScoringError(f"cannot score {x!r}", detail="bad feature")
    return model


def blob(ctx: Any) -> Any:
    """"pid": the worker's pid; an int n: n zero bytes back; a buffer: its size."""

    def serve(x: Any) -> Any:
        if isinstance(x, str):
            return os.getpid()
        if isinstance(x, int):
            return bytearray(x)
        return memoryview(x).nbytes

    return serve


def torch_closure(ctx: Any) -> Any:
    """A function around a torch module (not a module itself): ("info",) gives what this
    process sees; ("heavy", n) runs n large products and gives the thread count torch reads."""
    import threading

    import torch

    layer = torch.nn.Linear(512, 512)
    x0 = torch.randn(512, 512)

    def serve(req: Any) -> Any:
        if req[0] == "info":
            return {"pid": os.getpid(), "tid": threading.get_native_id(), "threads": torch.get_num_threads()}
        with torch.inference_mode():
            y = x0
            for _ in range(req[1]):
                y = torch.tanh(layer(y))
        return torch.get_num_threads()

    return serve


def sample_input() -> int:
    """A warm-up sample (config files name it as "process_models:sample_input")."""
    return 1


def doubler(ctx: Any) -> Any:
    """Doubles its input (numpy arrays over the v2 front)."""
    return lambda x: x * 2


def sleeper(ctx: Any) -> Any:
    """Sleeps x[0] seconds a call (a numpy array in), then returns x."""

    def serve(x: Any) -> Any:
        time.sleep(float(x[0]))
        return x

    return serve


class Unpicklable:
    """Pickles (its __reduce__ drops an argument) but does not unpickle."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b

    def __reduce__(self) -> Any:
        return (Unpicklable, (self.a,))


def raises_on_negative(ctx: Any) -> Any:
    """Echoes x, and raises ValueError for a negative x[0]."""

    def serve(x: Any) -> Any:
        if float(x[0]) < 0:
            raise ValueError(f"negative input {float(x[0])}")
        return x

    return serve


def sleeper_that_cannot_grow(ctx: Any) -> Any:
    """``sleeper``, whose second and later instances' factory raises."""
    if ctx.instance >= 1:
        raise RuntimeError(f"instance {ctx.instance} of {ctx.model!r} cannot map its weights")
    return sleeper(ctx)


def unpicklable_result(ctx: Any) -> Any:
    return lambda x: Unpicklable(x, x)


def warner(ctx: Any) -> Any:
    """Warns at build time, and on each call with the request in the text: a PinningWarning for
    x == "pin", a category only the child has for x == "local", a UserWarning otherwise."""
    import warnings

    from apportion import PinningWarning

    warnings.warn("built", UserWarning, stacklevel=1)

    local = type("LocalWarning", (UserWarning,), {"__module__": "__main__"})

    def serve(x: Any) -> Any:
        category = {"pin": PinningWarning, "local": local}.get(x, UserWarning)
        warnings.warn(f"call {x}", category, stacklevel=1)
        return x

    return serve


def warns_then_fails(ctx: Any) -> Any:
    import warnings

    warnings.warn("about to fail", UserWarning, stacklevel=1)
    raise RuntimeError("factory failed after warning")


def context(ctx: Any) -> Any:
    """Returns the InstanceContext the child built it with, as a dict."""
    import dataclasses

    fields = dataclasses.asdict(ctx)
    return lambda x: fields


def hangs_on_negative(ctx: Any) -> Any:
    """Returns its input; a call whose first value is negative sleeps for ten minutes first (a
    call that, for the test's purposes, never returns)."""
    import time

    def serve(x: Any) -> Any:
        if float(x[0]) < 0:
            time.sleep(600)
        return x

    return serve


def _building() -> None:
    """Creates the file APPORTION_TEST_BUILDING names, if set: the test's sign that a build began."""
    import os

    mark = os.environ.get("APPORTION_TEST_BUILDING")
    if mark:
        open(mark, "w").close()


def slow_to_build(ctx: Any) -> Any:
    """Echo, built in 1 s; creates the file APPORTION_TEST_BUILDING names (if set) as it begins.
    (Half of `apportion serve`'s 2 s grace for a start interrupted by a signal: with the build as
    long as the grace, the rest of the start raced it on a loaded machine.)"""
    import time

    _building()
    time.sleep(1.0)
    return lambda x: x


def never_built(ctx: Any) -> Any:
    """A factory that does not return (for ten minutes); creates the file APPORTION_TEST_BUILDING
    names (if set) as it begins."""
    import time

    _building()
    time.sleep(600)
    return lambda x: x


def sleeper_slow_to_grow(ctx: Any) -> Any:
    """``sleeper``, whose second and later instances take ten minutes to build: a move that
    adds one is still starting when the test stops the server. Creates the file
    APPORTION_TEST_BUILDING names (if set) as such a build begins."""
    import time

    if ctx.instance >= 1:
        _building()
        time.sleep(600)
    return sleeper(ctx)
