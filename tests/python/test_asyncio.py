"""asyncio: infer() awaits without blocking the loop; errors and cancellation carry over."""

from __future__ import annotations

import asyncio
import threading

import pytest

import apportion as ap


async def until(cond, what: str) -> None:
    """Polls ``cond()`` every 5 ms until it holds (at most 10 s): an order of events between
    threads, not a sleep that a loaded machine outlasts."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while not cond():
        assert loop.time() < end, f"never: {what}"
        await asyncio.sleep(0.005)


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


def test_a_request_the_runtime_cancels_is_request_cancelled_not_the_tasks_cancellation(rt: ap.Runtime,
                                                                                        gate) -> None:
    # remove_model(drain=False) reached `await rt.infer` as asyncio.CancelledError: the task
    # read as cancelled though nobody cancelled it, a TaskGroup dropped it silently, and a web
    # route catching ApportionError answered 500 with a traceback.
    import concurrent.futures

    rt.add_model("m", model=gate)
    rt.start()

    async def main() -> None:
        running = asyncio.ensure_future(rt.infer("m", "running"))
        assert await asyncio.to_thread(gate.entered.wait, 10)
        queued = [asyncio.ensure_future(rt.infer("m", i)) for i in range(3)]
        await until(lambda: rt.stats()["m"].queued == 3, "three requests queued")
        remove = asyncio.ensure_future(asyncio.to_thread(rt.remove_model, "m", drain=False))
        # The worker cancels the queued requests once the running call returns, if the removal
        # began by then: nothing shows that it did, so the gate opens half a second later.
        await asyncio.sleep(0.5)
        gate.release.set()
        await remove
        assert await running == "running"
        for t in queued:
            with pytest.raises(ap.RequestCancelled, match="'m': the request was cancelled before it ran") as e:
                await t
            assert not t.cancelled() and isinstance(e.value, (ap.ApportionError, concurrent.futures.CancelledError))
        # In a TaskGroup it is an error of the group, not a task silently gone.
        rt.add_model("g", model=gate)
        gate.release.clear()
        gate.entered.clear()
        with pytest.raises(ExceptionGroup) as group:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(rt.infer("g", "running"))
                assert await asyncio.to_thread(gate.entered.wait, 10)
                tg.create_task(rt.infer("g", "queued"))
                await until(lambda: rt.stats()["g"].queued == 1, "one request queued")
                remover = asyncio.ensure_future(asyncio.to_thread(rt.remove_model, "g", drain=False))
                await asyncio.sleep(0.5)
                gate.release.set()
                await remover
        assert [type(x) for x in group.value.exceptions] == [ap.RequestCancelled]
        # `await fut` on a future someone else cancelled: the same.
        gate.release.clear()
        gate.entered.clear()
        rt.add_model("f", model=gate)
        blocker = rt.submit("f", 0)
        assert await asyncio.to_thread(gate.entered.wait, 10)
        fut = rt.submit("f", 1)
        asyncio.get_running_loop().call_later(0.05, fut.cancel)
        with pytest.raises(ap.RequestCancelled, match="^model 'f': the request was cancelled before it ran"):
            await fut
        gate.release.set()
        assert await blocker == 0

    asyncio.run(main())
