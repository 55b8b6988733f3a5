"""
GPU layer: driver status, devices, plans, partitions
"""
from __future__ import annotations
import collections.abc
import typing
__all__: list[str] = ['DeviceGpuPlan', 'DeviceInfo', 'GpuPartition', 'GpuPlan', 'ModelGpuPlan', 'ModelStreams', 'SpinBuffer', 'SpinFlood', 'describe_devices', 'described_device', 'described_device_names', 'driver_status', 'launch_spin', 'plan_gpus', 'spin_available', 'stream_synchronize', 'time_spins']
class DeviceInfo:
    """
    One GPU, live or described.
    """
    green_contexts: bool
    name: str
    def __init__(self) -> None:
        ...
    def __repr__(self) -> str:
        ...
    def __str__(self) -> str:
        ...
    @property
    def cc_major(self) -> int:
        ...
    @cc_major.setter
    def cc_major(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def cc_minor(self) -> int:
        ...
    @cc_minor.setter
    def cc_minor(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def driver_version(self) -> int:
        ...
    @driver_version.setter
    def driver_version(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def free_memory(self) -> int:
        ...
    @free_memory.setter
    def free_memory(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def min_sm_partition(self) -> int:
        ...
    @min_sm_partition.setter
    def min_sm_partition(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def ordinal(self) -> int:
        ...
    @ordinal.setter
    def ordinal(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def priority_greatest(self) -> int:
        ...
    @priority_greatest.setter
    def priority_greatest(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def priority_least(self) -> int:
        ...
    @priority_least.setter
    def priority_least(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def sm_alignment(self) -> int:
        ...
    @sm_alignment.setter
    def sm_alignment(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def sm_count(self) -> int:
        ...
    @sm_count.setter
    def sm_count(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def sm_granularity(self) -> int:
        ...
    @property
    def sm_units(self) -> int:
        ...
    @property
    def total_memory(self) -> int:
        ...
    @total_memory.setter
    def total_memory(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
class ModelGpuPlan:
    @property
    def allow_overlap(self) -> bool:
        ...
    @property
    def device(self) -> int:
        ...
    @property
    def memory(self) -> int:
        ...
    @property
    def model(self) -> str:
        ...
    @property
    def priority(self) -> int:
        ...
    @property
    def priority_asked(self) -> str:
        ...
    @property
    def priority_clamped(self) -> bool:
        ...
    @property
    def sm_asked(self) -> int:
        ...
    @property
    def sm_count(self) -> int:
        ...
    @property
    def sm_overlaps(self) -> bool:
        ...
    @property
    def sm_rounded(self) -> bool:
        ...
    @property
    def sm_units(self) -> list[int]:
        ...
    @property
    def streams(self) -> int:
        ...
    @property
    def strict(self) -> bool:
        ...
class DeviceGpuPlan:
    @property
    def granularity(self) -> int:
        ...
    @property
    def info(self) -> DeviceInfo:
        ...
    @property
    def memory_assigned(self) -> int:
        ...
    @property
    def memory_capacity(self) -> int:
        ...
    @property
    def sm_grouped(self) -> int:
        ...
    @property
    def sm_unassigned(self) -> int:
        ...
    @property
    def units(self) -> int:
        ...
class GpuPlan:
    def __str__(self) -> str:
        ...
    def find(self, model: str) -> typing.Any:
        ...
    def without(self, models: collections.abc.Sequence[str]) -> GpuPlan:
        """
        A copy without `models` (those that left a running runtime); the others keep their
        streams, units and budgets as planned (and realised).
        """
    @property
    def devices(self) -> list[DeviceGpuPlan]:
        ...
    @property
    def models(self) -> list[ModelGpuPlan]:
        ...
    @property
    def notes(self) -> list[str]:
        ...
class ModelStreams:
    @property
    def context(self) -> int:
        ...
    @property
    def device(self) -> int:
        ...
    @property
    def green_context(self) -> bool:
        ...
    @property
    def memory(self) -> int:
        ...
    @property
    def model(self) -> str:
        ...
    @property
    def priority(self) -> int:
        ...
    @property
    def sm_count(self) -> int:
        ...
    @property
    def streams(self) -> list[int]:
        ...
class GpuPartition:
    """
    Streams and green contexts of a plan on the live driver; close() destroys them.
    """
    def __init__(self, plan: GpuPlan) -> None:
        ...
    def close(self) -> None:
        ...
    def find(self, model: str) -> typing.Any:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def models(self) -> list[ModelStreams]:
        ...
    @property
    def plan(self) -> GpuPlan:
        """
        A copy of the plan as the driver realised it (its SM counts, fallbacks in notes).
        """
    @property
    def warnings(self) -> list[str]:
        ...
class SpinBuffer:
    """
    Zeroed device ints, freed with the object.
    """
    def __init__(self, count: typing.SupportsInt | typing.SupportsIndex, device: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
        ...
    def __len__(self) -> int:
        ...
    def clear(self) -> None:
        ...
    def read(self) -> list[int]:
        ...
    @property
    def ptr(self) -> int:
        ...
class SpinFlood:
    """
    Keeps a stream saturated with spin kernels from a C++ thread.
    """
    def __init__(self, stream_ptr: typing.SupportsInt | typing.SupportsIndex, micros: typing.SupportsFloat | typing.SupportsIndex, blocks: typing.SupportsInt | typing.SupportsIndex, threads: typing.SupportsInt | typing.SupportsIndex = 1024, device: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
        ...
    def sm_ids(self) -> list[int]:
        ...
    def stop(self) -> None:
        ...
    @property
    def kernels(self) -> int:
        ...
def describe_devices() -> list[DeviceInfo]:
    """
    The live devices; [] when the driver is unavailable.
    """
def described_device(name: str, ordinal: typing.SupportsInt | typing.SupportsIndex = 0) -> DeviceInfo:
    ...
def described_device_names() -> list[str]:
    ...
def driver_status() -> dict:
    """
    What loading libcuda.so.1 found (loaded once per process; never raises).
    """
def launch_spin(stream_ptr: typing.SupportsInt | typing.SupportsIndex, micros: typing.SupportsFloat | typing.SupportsIndex, blocks: typing.SupportsInt | typing.SupportsIndex, sm_ids_ptr: typing.SupportsInt | typing.SupportsIndex = 0, threads: typing.SupportsInt | typing.SupportsIndex = 32, device: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
    """
    Queue a spin kernel (blocks x threads, micros each) on the stream; asynchronous. Block b writes its SM id to the int at sm_ids_ptr[b] when sm_ids_ptr (a device pointer) is set.
    """
def plan_gpus(quotas: list, devices: collections.abc.Sequence[DeviceInfo]) -> GpuPlan:
    """
    Plan dict quotas {model, device, streams, priority, sm_share, sm_count, memory, allow_overlap, strict} over devices. Raises apportion.errors.QuotaError / PlacementError with .model (and .field).
    """
def spin_available() -> bool:
    """
    True when built with CUDA and the CUDA runtime sees a device.
    """
def stream_synchronize(stream_ptr: typing.SupportsInt | typing.SupportsIndex, device: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
    ...
def time_spins(stream_ptr: typing.SupportsInt | typing.SupportsIndex, micros: typing.SupportsFloat | typing.SupportsIndex, blocks: typing.SupportsInt | typing.SupportsIndex, threads: typing.SupportsInt | typing.SupportsIndex = 32, iterations: typing.SupportsInt | typing.SupportsIndex = 100, device: typing.SupportsInt | typing.SupportsIndex = 0) -> tuple[list[float], list[int]]:
    """
    Run spin kernels one after another; returns (latency of each in us, SM ids used).
    """
