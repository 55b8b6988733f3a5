"""The HTTP front's alarms: many requests' deadlines (the body timeout, the start of the
disconnect watch) on one loop timer."""

from __future__ import annotations

import asyncio
import threading

from apportion.serve._frontend import Alarms


def test_each_key_fires_once_after_its_delay_unless_cancelled() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        alarms = Alarms(0.2)
        fired: list[tuple[str, float]] = []
        start = loop.time()
        for key in ("a", "b", "c"):
            alarms.set(key, lambda k: fired.append((k, loop.time() - start)), key)
        alarms.cancel("b")
        alarms.cancel("never set")  # nothing to forget: no error
        await asyncio.sleep(0.1)
        assert fired == []  # not before its delay
        await asyncio.sleep(0.5)
        assert [k for k, _ in fired] == ["a", "c"]
        assert all(0.2 <= t < 0.2 + 0.05 + 0.2 for _, t in fired), fired  # at most a quarter late (+ a slow VM)

    asyncio.run(main())


def test_keys_set_after_the_first_one_fire_at_their_own_deadlines() -> None:
    # The timer is armed for the first key; a later key waits for the next firing, which the
    # first one's firing arms for the later key's deadline (or a quarter of the delay on).
    async def main() -> None:
        loop = asyncio.get_running_loop()
        alarms = Alarms(0.4)
        fired: dict[str, float] = {}
        start = loop.time()
        alarms.set("early", lambda: fired.setdefault("early", loop.time() - start))
        alarms.cancel("early")  # answered in time, as almost every request is
        await asyncio.sleep(0.2)
        alarms.set("late", lambda: fired.setdefault("late", loop.time() - start))
        await asyncio.sleep(0.3)  # the first firing (0.4 s) finds "late" not due yet
        assert fired == {}
        await asyncio.sleep(0.6)
        assert set(fired) == {"late"}
        assert 0.6 <= fired["late"] < 0.6 + 0.1 + 0.2, fired

    asyncio.run(main())


def test_each_event_loop_has_its_own_timer_and_calls_run_on_their_loop() -> None:
    alarms = Alarms(0.05)
    threads_seen: dict[str, str] = {}
    done = threading.Barrier(2, timeout=30)

    def serve(name: str) -> None:
        async def main() -> None:
            fired = asyncio.Event()
            alarms.set(name, lambda: (threads_seen.__setitem__(name, threading.current_thread().name),
                                      fired.set()))
            await asyncio.to_thread(done.wait)  # both loops run, each with its key set
            await asyncio.wait_for(fired.wait(), 10)

        asyncio.run(main())

    threads = [threading.Thread(target=serve, args=(n,), name=f"loop-{n}") for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert threads_seen == {"x": "loop-x", "y": "loop-y"}

    # A later loop forgets the closed ones (and whatever they left set).
    async def again() -> None:
        alarms.set("z", lambda: None)
        alarms.cancel("z")

    asyncio.run(again())
    assert len(alarms._loops) == 1
