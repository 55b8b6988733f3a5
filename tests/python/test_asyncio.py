"""asyncio: infer() awaits without blocking the loop; errors and cancellation carry over."""

from __future__ import annotations

import asyncio
import threading

import pytest

import apportion as ap


def test_infer_returns_result(rt: ap.Runtime) -> None:
    rt.add_model("m", model=lambda x: x + 1)
    rt.start()

    async def main():
        return await asyncio.gather(*(rt.infer("m", i) for i in range(50)))

    assert asyncio.run(main()) == [i + 1 for i in range(50)]


def test_infer_never_blocks_the_loop(rt: ap.Runtime) -> None:
    release = threading.Event()
    rt.add_model("slow", model=lambda x: release.wait(10) and x)
    rt.start()

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            for _ in range(20):
                ticks += 1
                await asyncio.sleep(0.002)
            release.set()

        result, _ = await asyncio.gather(rt.infer("slow", "done"), ticker())
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result == "done"
    assert ticks == 20  # the loop kept running while the request was in flight


def test_infer_propagates_model_exception_and_admission_errors(rt: ap.Runtime) -> None:
    def model(x):
        raise KeyError(x)

    rt.add_model("m", model=model)
    rt.start()

    async def main():
        with pytest.raises(KeyError):
            await rt.infer("m", "k")
        with pytest.raises(ap.ModelNotFound):
            await rt.infer("missing", 1)

    asyncio.run(main())


def test_infer_deadline(rt: ap.Runtime, gate) -> None:
    rt.add_model("m", model=gate)
    rt.start()

    async def main():
        first = asyncio.ensure_future(rt.infer("m", "first"))
        await asyncio.sleep(0.01)
        late = asyncio.ensure_future(rt.infer("m", "late", timeout_ms=1))
        await asyncio.sleep(0.02)
        gate.release.set()
        assert await first == "first"
        with pytest.raises(ap.DeadlineExceeded):
            await late

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_queued_request(rt: ap.Runtime, gate) -> None:
    rt.add_model("m", model=gate)
    rt.start()

    async def main():
        first = asyncio.ensure_future(rt.infer("m", "first"))
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(rt.infer("m", "queued"))
        await asyncio.sleep(0.01)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        gate.release.set()
        assert await first == "first"

    asyncio.run(main())
    assert "queued" not in gate.calls
    assert rt.stats()["m"].cancelled == 1
