"""Factories for the Ray tests' models: every node's actor (and Serve replica) imports them by
path ("ray_models:name"), so they live in a plain module that the test sets on PYTHONPATH."""

from __future__ import annotations

import os
import time
from typing import Any


class CodedError(Exception):
    """An exception whose constructor takes other arguments than its args (common in
    libraries): it pickles, but unpickling calls CodedError(message) and fails."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def echo(ctx: Any) -> Any:
    """Returns its input; a dict input may ask it to sleep first ({"sleep": s}), to raise
    ({"raise": message}, a ValueError; {"raise_coded": message}, a CodedError; {"exit": code},
    SystemExit; {"interrupt": message}, KeyboardInterrupt) or to answer
    bytes ({"bytes": text})."""

    def serve(x: Any) -> Any:
        if isinstance(x, dict):
            if "sleep" in x:
                time.sleep(x["sleep"])
            if "raise" in x:
                raise ValueError(x["raise"])
            if "raise_coded" in x:
                raise CodedError(x["raise_coded"], 7)
            if "exit" in x:
                raise SystemExit(x["exit"])
            if "interrupt" in x:
                raise KeyboardInterrupt(x["interrupt"])
            if "bytes" in x:
                return x["bytes"].encode()
        return x

    return serve


def where(ctx: Any) -> Any:
    """Returns the CPUs its worker thread may run on and its process id."""
    return lambda x: {"cpus": sorted(os.sched_getaffinity(0)), "pid": os.getpid(), "x": x}


def refuses_once_flagged(ctx: Any) -> Any:
    """Echo, built only while the file named by APPORTION_TEST_REFUSE_FLAG does not exist: a
    re-placement after the test creates it fails to build."""
    flag = os.environ.get("APPORTION_TEST_REFUSE_FLAG")
    if flag and os.path.exists(flag):
        raise RuntimeError("refusing to build: flagged")
    return lambda x: x


def never_builds(ctx: Any) -> Any:
    """A factory that does not return (for a minute)."""
    time.sleep(60)
    return lambda x: x


def builds_slowly_flagged(ctx: Any) -> Any:
    """Echo (as :func:`echo`), whose build takes 8 s while a file named
    ``apportion-test-slow-<model>`` exists in the system's temporary directory: a re-placement
    after the test creates it is slow. (By model name: an environment variable set by the test
    does not reach the worker processes of nodes started before it.)"""
    import tempfile

    if os.path.exists(os.path.join(tempfile.gettempdir(), f"apportion-test-slow-{ctx.model}")):
        time.sleep(8.0)
    return echo(ctx)


def exits_while_building(ctx: Any) -> Any:
    """A factory that ends its process (as a crashing native library would)."""
    os._exit(3)
