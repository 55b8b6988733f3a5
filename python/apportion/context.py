"""What a model's factory learns about the instance it builds.

A leaf module (no apportion imports) so that every layer, including the process child, can
name the type without importing the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["InstanceContext"]


@dataclass(frozen=True, slots=True)
class InstanceContext:
    """What a factory learns about the instance it builds (passed as ``factory(ctx)``).

    The factory runs inside the instance's own worker thread, already pinned to ``cpus`` with
    its NUMA memory policy applied, so thread pools and memory it creates there belong to
    that instance.
    """

    model: str
    instance: int
    instances: int
    threads: int | None = None
    cpus: tuple[int, ...] | None = None
    memory_nodes: tuple[int, ...] = ()
    isolation: str = "shared"
    gpu: Any = None
    burst: bool = False
    """A burst instance of an exclusive model: it runs on the shared pool's CPUs, only while
    every own instance is busy (``burst=`` on add_model)."""
    own_cpus: bool = False
    """The instance's CPUs are its model's alone: an exclusive model's own instances, and a
    process-isolated model's given ``cores`` (whose ``isolation`` reads "process"); False on the
    shared pool. What a thread pool may spin on without taking time from another model."""
