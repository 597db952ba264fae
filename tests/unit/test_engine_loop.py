"""EngineLoop.create: the engine is built on the thread that steps it, so a worker's
torch kernels all run on one thread (one OpenMP team; see worker/engine_loop.py)."""

import asyncio
import threading
import time

import pytest

from engine.sampling_params import SamplingParams
from tests.unit.conftest import tiny_engine
from worker.engine_loop import EngineLoop


def test_the_engine_is_built_and_stepped_on_the_same_thread():
    built_on, stepped_on = [], set()

    def build():
        built_on.append(threading.get_ident())
        return tiny_engine(kv_cache_tokens=256, seed=1)

    async def scenario():
        loop = await EngineLoop.create(build)
        loop.step_observers.append(lambda seconds, outputs:
                                   stepped_on.add(threading.get_ident()))
        loop.start()
        try:
            queue = loop.subscribe("r1")
            params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
            await loop.call(lambda e: e.add_request("r1", [5, 6, 7, 8], params))
            while not (await asyncio.wait_for(queue.get(), 30)).finished:
                pass
            assert loop.engine.blocks.num_free_blocks == loop.engine.blocks.num_blocks
        finally:
            loop.stop()

    asyncio.run(scenario())
    assert built_on and built_on[0] != threading.get_ident()
    assert stepped_on == {built_on[0]}


def test_a_build_that_fails_raises_from_create_and_leaves_no_thread():
    def build():
        raise RuntimeError("no such model: nowhere")

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="no such model: nowhere"):
        asyncio.run(EngineLoop.create(build))
    deadline = time.monotonic() + 10  # the thread ends just after handing the error over
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_a_loop_stopped_before_it_started_ends_its_thread():
    async def scenario():
        loop = await EngineLoop.create(lambda: tiny_engine(kv_cache_tokens=256, seed=1))
        loop.stop()
        return loop._thread

    thread = asyncio.run(scenario())
    assert not thread.is_alive()


def test_a_decode_worker_records_its_graphs_before_it_serves():
    # Where decode steps replay graphs (without pdserve's kernels), the decode worker's
    # engine has every size recorded when it is built: nothing is left to record while a
    # request could wait for it.
    from decode_worker.server import build_engine
    from tests.unit.conftest import tiny_config

    engine = build_engine(tiny_config(native_kernels=False))
    assert engine.runner.decode_graphs.recorded == list(range(1, 4))  # float32: GEMMs from 4
    native = build_engine(tiny_config())
    assert native.runner.decode_graphs is None or not native.record_decode_graphs()
