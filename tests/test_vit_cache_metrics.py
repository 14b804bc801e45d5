"""The per-step ViT-cache metrics (``rollout/vit_cache/*``): the delta and aggregation logic, the
never-crash rule, and the path to the engines: Ray's ``__ray_call__`` on a real async Ray actor
shaped like verl 0.9.1's ``vLLMHttpServer`` (an ``engine`` whose ``collective_rpc`` is a coroutine
on the actor's loop), and the plugin's worker method through a real in-process vLLM engine."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from vitos_verl.compat import verl_0_9
from vitos_verl.trainer import vit_cache_metrics as vcm
from vitos_verl.trainer.vit_cache_metrics import (
    PREFIX,
    replica_counters,
    step_delta,
    total_counters,
    vit_cache_step_metrics,
)


def _w(hits=0, misses=0, recomputes=0, pixelless=0, **extra):
    return {"hits": hits, "misses": misses, "recomputes": recomputes, "pixelless": pixelless, "clears": 0,
            "hit_rate": 0.0, **extra}


def test_replica_is_max_over_its_workers_and_replicas_add_up():
    tp2 = [_w(10, 2, 1, 6), _w(10, 2, 1, 6)]  # two TP ranks of one replica: the same requests
    assert replica_counters(tp2) == {"hits": 10, "misses": 2, "recomputes": 1, "pixelless": 6}
    assert replica_counters([]) == replica_counters(None) == dict.fromkeys(vcm.COUNTERS, 0)
    assert replica_counters([{"hits": 3}]) == {"hits": 3, "misses": 0, "recomputes": 0, "pixelless": 0}
    total = total_counters([tp2, [_w(5, 3, 0, 2)], None])
    assert {k: total[k] for k in vcm.COUNTERS} == {"hits": 15, "misses": 5, "recomputes": 1, "pixelless": 8}
    assert [r["hits"] for r in total["replicas"]] == [10, 5, 0]  # each replica's own, in order
    with pytest.raises(TypeError):
        replica_counters([3])


def test_replica_metrics_count_items_images_and_split_images():
    """Per replica: pruned items and distinct images of the step; an image served by two replicas
    in one step counts once in split_images (a question's requests that left its replica)."""
    step1 = total_counters([
        [_w(3, 1, images={"aa": 4}), _w(3, 1, images={"aa": 4})],  # TP=2: the same image, not twice
        [_w(5, 2, images={"bb": 3, "cc": 4})],
    ])["replicas"]
    m1 = vcm.replica_step_metrics(step1, None)
    assert m1 == {"rollout/replica_0/image_items": 4.0, "rollout/replica_0/images": 1.0,
                  "rollout/replica_1/image_items": 7.0, "rollout/replica_1/images": 2.0,
                  f"{PREFIX}split_images": 0.0}
    # next step: replica 0 serves aa again and dd; replica 1 serves dd too (split), bb unchanged
    step2 = total_counters([[_w(6, 2, images={"aa": 6, "dd": 2})], [_w(6, 3, images={"bb": 3, "cc": 4, "dd": 2})]])["replicas"]
    m2 = vcm.replica_step_metrics(step2, step1)
    assert m2["rollout/replica_0/image_items"] == 4 and m2["rollout/replica_0/images"] == 2
    assert m2["rollout/replica_1/image_items"] == 2 and m2["rollout/replica_1/images"] == 1
    assert m2[f"{PREFIX}split_images"] == 1
    # a restarted engine (counters went down) counts from 0; no replicas: no metrics
    m3 = vcm.replica_step_metrics(total_counters([[_w(1, 1, images={"ee": 2})], [_w(6, 3, images={"bb": 3, "cc": 4, "dd": 2})]])["replicas"], step2)
    assert m3["rollout/replica_0/image_items"] == 2 and m3["rollout/replica_0/images"] == 1 and m3["rollout/replica_1/images"] == 0
    assert vcm.replica_step_metrics([], step2) == vcm.replica_step_metrics(None, None) == {}


def test_step_delta():
    first = step_delta({"hits": 6, "misses": 2, "recomputes": 0, "pixelless": 4}, None)
    assert first == {f"{PREFIX}hits": 6.0, f"{PREFIX}misses": 2.0, f"{PREFIX}recomputes": 0.0,
                     f"{PREFIX}pixelless": 4.0, f"{PREFIX}hit_rate": 0.75}
    second = step_delta({"hits": 9, "misses": 3, "recomputes": 1, "pixelless": 7}, {"hits": 6, "misses": 2, "recomputes": 0, "pixelless": 4})
    assert second[f"{PREFIX}hits"] == 3 and second[f"{PREFIX}misses"] == 1 and second[f"{PREFIX}hit_rate"] == 0.75
    idle = step_delta({"hits": 9, "misses": 3, "recomputes": 1, "pixelless": 7}, {"hits": 9, "misses": 3, "recomputes": 1, "pixelless": 7})
    assert f"{PREFIX}hit_rate" not in idle and idle[f"{PREFIX}hits"] == 0  # no image this step: no rate
    restarted = step_delta({"hits": 1, "misses": 1, "recomputes": 0, "pixelless": 0}, {"hits": 9, "misses": 3, "recomputes": 1, "pixelless": 7})
    assert restarted[f"{PREFIX}hits"] == 1 and restarted[f"{PREFIX}hit_rate"] == 0.5


def test_step_metrics_keep_state_and_never_raise(caplog):
    trainer = SimpleNamespace()
    counts = iter([{"hits": 2, "misses": 2, "recomputes": 0, "pixelless": 1}, {"hits": 8, "misses": 3, "recomputes": 0, "pixelless": 5}])
    assert vit_cache_step_metrics(trainer, query=lambda t: next(counts))[f"{PREFIX}hit_rate"] == 0.5
    m = vit_cache_step_metrics(trainer, query=lambda t: next(counts))
    assert m[f"{PREFIX}hits"] == 6 and m[f"{PREFIX}misses"] == 1 and m[f"{PREFIX}hit_rate"] == pytest.approx(6 / 7)

    calls = []

    def broken(t):
        calls.append(1)
        raise TimeoutError("replica hung")

    failing = SimpleNamespace()
    with caplog.at_level(logging.WARNING, logger=vcm.__name__):
        assert vit_cache_step_metrics(failing, query=broken) == {}
        assert vit_cache_step_metrics(failing, query=broken) == {}
    assert len(calls) == 1  # asked once, then off for the run
    assert sum("ViT-cache metrics" in r.message for r in caplog.records) == 1
    # a trainer without replicas (the real query): no metric, no exception
    assert vit_cache_step_metrics(SimpleNamespace(llm_server_manager=None, checkpoint_manager=None)) == {}


def test_rollout_servers_from_verl_replicas():
    a, b, c = object(), object(), object()
    trainer = SimpleNamespace(llm_server_manager=SimpleNamespace(get_replicas=lambda: [SimpleNamespace(servers=[a, b]),
                                                                                         SimpleNamespace(servers=[], _server_handle=c)]))
    assert verl_0_9.rollout_server_handles(trainer) == [[a, b], [c]]
    trainer = SimpleNamespace(checkpoint_manager=SimpleNamespace(replicas=[SimpleNamespace(servers=[a])]))
    assert verl_0_9.rollout_server_handles(trainer) == [[a]]


class _Engine:
    """verl's ``vLLMHttpServer.engine`` (vLLM's ``AsyncLLM``) as far as this module uses it."""

    def __init__(self, workers):
        self.workers = workers
        self.output_handler = asyncio.get_running_loop().create_task(asyncio.sleep(3600))

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == vcm.RPC_STATS
        await asyncio.sleep(0.01)
        return self.workers


class _Server:
    """An async Ray actor like verl's ``vLLMHttpServer``: the engine is made on the actor's loop."""

    def __init__(self, workers, has_engine=True):
        self._workers, self._has_engine = workers, has_engine

    async def launch_server(self):
        if self._has_engine:
            self.engine = _Engine(self._workers)

    async def ping(self):
        return True


def test_query_replicas_through_ray_call_on_async_actors():
    """Two replicas (one of two nodes: the second node's actor has no engine), real Ray actors."""
    ray = pytest.importorskip("ray")
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        Server = ray.remote(_Server)
        r0 = [Server.options(max_concurrency=100).remote([_w(4, 2, 0, 3), _w(4, 2, 0, 3)]),
              Server.options(max_concurrency=100).remote([], has_engine=False)]
        r1 = [Server.options(max_concurrency=100).remote([_w(1, 1, 1, 1)])]
        ray.get([s.launch_server.remote() for s in r0 + r1])
        trainer = SimpleNamespace(llm_server_manager=SimpleNamespace(
            get_replicas=lambda: [SimpleNamespace(servers=r0), SimpleNamespace(servers=r1)]))
        counts = vcm.query_replicas(trainer, timeout=10)
        assert {k: counts[k] for k in vcm.COUNTERS} == {"hits": 5, "misses": 3, "recomputes": 1, "pixelless": 4}
        assert [r["misses"] for r in counts["replicas"]] == [2, 1]  # per replica, in verl's order
        m = vit_cache_step_metrics(trainer)
        assert m[f"{PREFIX}hit_rate"] == pytest.approx(5 / 8) and m[f"{PREFIX}misses"] == 3
        assert m["rollout/replica_0/image_items"] == 6 and m["rollout/replica_1/image_items"] == 2
        assert ray.get(r0[0].ping.remote())  # the actor's loop is free after the call
    finally:
        ray.shutdown()


# ------------------------------------------------------------------ a real vLLM engine (the plugin's worker method)
from tests import test_vllm_parity as _parity  # noqa: E402

llm = _parity.llm  # the parity tests' in-process engine fixture (module scope: this module's own)


@pytest.mark.vllm
def test_step_metrics_from_a_real_engine(llm, tiny_processor):
    """The worker method by name through a real in-process engine, behind an ``engine`` object
    shaped like verl's (``AsyncLLM.collective_rpc`` on the server's loop, here a thread's): a
    request on a new image is a miss, a pruned request on it a pixel-less hit."""
    import threading

    import numpy as np
    import torch
    from PIL import Image
    from vllm import SamplingParams

    from vitos_verl.rollout.vllm_model import RPC_STATS

    assert vcm.RPC_STATS == RPC_STATS
    image = Image.fromarray(np.random.default_rng(77).integers(0, 255, (224, 280, 3), dtype=np.uint8))  # 8x10 cells
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the lesion?"}]}]
    text = tiny_processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    keep = torch.zeros(8, 10, dtype=torch.bool)
    keep[2:5, 3:7] = True
    requests = [{"prompt": text, "multi_modal_data": {"image": image}},
                {"prompt": text, "multi_modal_data": {"image": image}, "mm_processor_kwargs": {"vitos_keep": _encode(keep)}}]

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    class AsyncEngine:
        async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            return llm.collective_rpc(method, timeout=timeout)

    engine = AsyncEngine()
    engine.output_handler = asyncio.run_coroutine_threadsafe(_make_task(), loop).result()
    server = SimpleNamespace(engine=engine)
    trainer = SimpleNamespace()
    query = lambda t: total_counters([vcm._server_vit_stats(server, timeout=30)])  # noqa: E731
    try:
        vit_cache_step_metrics(trainer, query=query)  # the counters so far
        sp = SamplingParams(max_tokens=2, temperature=0.0)
        for request in requests:
            llm.generate([request], sp, use_tqdm=False)
        m = vit_cache_step_metrics(trainer, query=query)
    finally:
        loop.call_soon_threadsafe(loop.stop)
    assert m[f"{PREFIX}misses"] == 1 and m[f"{PREFIX}hits"] == 1 and m[f"{PREFIX}hit_rate"] == 0.5
    assert m[f"{PREFIX}pixelless"] == 1 and m[f"{PREFIX}recomputes"] == 0
    # the engine's own record of the images it served: one image, one pruned item, one replica
    assert m["rollout/replica_0/images"] == 1 and m["rollout/replica_0/image_items"] == 2
    assert m[f"{PREFIX}split_images"] == 0


async def _make_task():
    return asyncio.get_running_loop().create_task(asyncio.sleep(3600))


def _encode(cells) -> str:
    """The keep mask's text form (``vitos_keep``)."""
    from vitos_verl.pruning import KeepMask

    return KeepMask(cells).encode()
