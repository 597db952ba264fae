"""Bounded admission: the in-flight limit, FIFO order, 429s, and no slot ever leaked."""

import asyncio

import pytest

from server.admission import Admission, QueueFull


def test_never_more_than_max_inflight_and_fifo():
    async def main():
        adm = Admission(max_inflight=3, max_queue=100)
        peak, order = 0, []

        async def job(i):
            nonlocal peak
            async with adm.slot():
                order.append(i)
                peak = max(peak, adm.running)
                await asyncio.sleep(0.001)

        await asyncio.gather(*(job(i) for i in range(50)))
        return adm, peak, order

    adm, peak, order = asyncio.run(main())
    assert peak == 3 and order == list(range(50))
    assert (adm.running, adm.waiting) == (0, 0)


def test_queue_full_rejects_at_once_with_retry_after():
    async def main():
        adm = Admission(max_inflight=1, max_queue=1)
        first = adm.slot()
        await first.__aenter__()
        waiter = asyncio.create_task(adm.slot().__aenter__())
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await adm.slot().__aenter__()
        assert info.value.retry_after >= 1 and adm.waiting == 1
        await first.__aexit__(None, None, None)
        await first.__aexit__(None, None, None)  # a second exit releases nothing more
        await waiter
        return adm

    adm = asyncio.run(main())
    assert (adm.running, adm.waiting) == (1, 0)


def test_zero_queue_rejects_when_all_slots_are_busy():
    async def main():
        adm = Admission(max_inflight=1, max_queue=0)
        async with adm.slot():
            with pytest.raises(QueueFull):
                await adm.slot().__aenter__()
        async with adm.slot() as ticket:
            assert ticket.queue_seconds == 0.0
        return adm

    assert asyncio.run(main()).running == 0


@pytest.mark.parametrize("granted_first", [False, True])
def test_cancelled_waiter_leaks_no_slot(granted_first):
    async def main():
        adm = Admission(max_inflight=1, max_queue=5)
        holder = adm.slot()
        await holder.__aenter__()
        waiter = asyncio.create_task(adm.slot().__aenter__())
        await asyncio.sleep(0)
        if granted_first:  # the slot is handed over, then the waiter is cancelled
            await holder.__aexit__(None, None, None)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        if not granted_first:
            await holder.__aexit__(None, None, None)
        async with adm.slot():
            pass
        return adm

    adm = asyncio.run(main())
    assert (adm.running, adm.waiting) == (0, 0)


def test_an_exception_inside_releases_the_slot():
    async def main():
        adm = Admission(max_inflight=1, max_queue=0)
        with pytest.raises(RuntimeError):
            async with adm.slot():
                raise RuntimeError("boom")
        return adm

    assert asyncio.run(main()).running == 0


def test_waiter_cancelled_just_before_the_release_is_skipped():
    # The cancelled future is still queued when the holder releases; the release must pass
    # over it, and the waiter must see CancelledError (not a ValueError from its cleanup).
    async def main():
        adm = Admission(max_inflight=1, max_queue=5)
        holder = adm.slot()
        await holder.__aenter__()
        cancelled = asyncio.create_task(adm.slot().__aenter__())
        second = adm.slot()
        behind = asyncio.create_task(second.__aenter__())
        await asyncio.sleep(0)
        assert adm.waiting == 2
        cancelled.cancel()
        await holder.__aexit__(None, None, None)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await behind  # got the slot the cancelled waiter would have had
        assert (adm.running, adm.waiting) == (1, 0)
        await second.__aexit__(None, None, None)
        return adm

    adm = asyncio.run(main())
    assert (adm.running, adm.waiting) == (0, 0)


def test_queue_seconds_measures_the_wait():
    async def main():
        adm = Admission(max_inflight=1, max_queue=1)
        holder = adm.slot()
        await holder.__aenter__()
        waiter = asyncio.create_task(adm.slot().__aenter__())
        await asyncio.sleep(0.05)
        await holder.__aexit__(None, None, None)
        return await waiter

    assert asyncio.run(main()).queue_seconds >= 0.04


def test_rejects_nonsense_limits():
    with pytest.raises(ValueError):
        Admission(max_inflight=0, max_queue=1)
