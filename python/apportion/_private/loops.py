"""The event loops the server (``apportion.serve``) runs on, named without importing the
server's dependencies (the CLI lists them)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..errors import QuotaError

__all__ = ["LOOPS", "loop_factory", "loop_name"]

LOOPS = ("auto", "uvloop", "asyncio")
"""``uvloop`` (libuv), ``asyncio`` (the standard library's) or ``auto`` (uvloop where it is
installed, else asyncio)."""


def loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory of the event loop named ``loop`` (one of ``LOOPS``): ValueError for another
    name, ImportError naming the package for ``uvloop`` when it is not installed."""
    if loop not in LOOPS:
        raise QuotaError(f"Server: loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    if loop == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise ImportError("Server: loop='uvloop' needs the uvloop package "
                              "(pip install 'apportion[serve]')") from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def loop_name(factory: Callable[[], asyncio.AbstractEventLoop]) -> str:
    """``"asyncio"`` or ``"uvloop"``: which loop ``factory`` (from loop_factory) makes."""
    return "asyncio" if factory is asyncio.new_event_loop else "uvloop"
