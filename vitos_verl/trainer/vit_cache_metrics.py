"""The rollout replicas' ViT-cache hit rate as per-step training metrics.

The vLLM model keeps cumulative ViT-cache counters per worker
(:func:`vitos_verl.rollout.vllm_model.vit_cache_stats`: ``hits``, ``misses``, ``recomputes``,
``pixelless``), and the plugin gives vLLM's ``Worker`` a method
:data:`~vitos_verl.rollout.vllm_model.RPC_STATS` (``"vitos_vit_cache_stats"``) that an engine's
``collective_rpc`` calls by name. :func:`vit_cache_step_metrics` (called by the trainer after each
step's rollouts) asks every replica for them and returns the change since its previous call:

* ``rollout/vit_cache/hits``, ``.../misses``, ``.../recomputes``, ``.../pixelless``: summed over
  the replicas; ``rollout/vit_cache/hit_rate`` = hits / (hits + misses) of those deltas (absent
  when the step encoded no image). The first call counts from 0; a counter that went down (a
  restarted engine) counts from 0 again. A validation run between two steps is in the next step's
  delta.
* Per replica ``i`` (verl's replica order): ``rollout/replica_<i>/image_items`` (pruned image
  items it served: hits + misses) and ``rollout/replica_<i>/images`` (distinct images among them:
  the keys of the worker's ``images`` map that are new or whose count grew), and
  ``rollout/vit_cache/split_images``: images that more than one replica served in the step. The
  trainer routes every request of one question to one replica (:mod:`vitos_verl.rollout.agent_loop`,
  "Routing"), so it is 0 unless two questions of the step share an image and landed on different
  replicas; each split image costs one more ViT pass.
* Within one replica the workers reached by ``collective_rpc`` (its tensor- and pipeline-parallel
  ranks) see the same requests, so a replica's counters are the maximum over its workers, not
  their sum (a TP=4 replica would count every image four times). vLLM's ``collective_rpc``
  reaches one data-parallel shard of an engine, so with ``data_parallel_size > 1`` inside a
  replica the counters are those of that shard.

How the trainer reaches the engines (verl 0.9.1, private behaviour relied on): the trainer's
``llm_server_manager.get_replicas()`` (else ``checkpoint_manager.replicas``) lists the
``vLLMReplica`` objects; each has ``servers``, Ray handles of ``vLLMHttpServer``
(``verl/workers/rollout/vllm_rollout/vllm_async_server.py``), whose node-rank-0 actor holds the
``AsyncLLM`` as ``engine``. Its own ``collective_rpc`` method awaits the engine's but drops the
result, so this module runs :func:`_server_vit_stats` in the server actor through Ray's
``__ray_call__``: Ray 2.60 runs that (synchronous) call outside the actor's asyncio loop, and
:func:`_server_vit_stats` submits ``engine.collective_rpc(RPC_STATS)`` to that loop (the loop of
the engine's ``output_handler`` task) and waits for the result with a time limit.

It never stops training: any failure (no replicas, an engine without the plugin's method, a
time-out, an unexpected shape) is logged once as a warning, the metrics are omitted, and the
replicas are not asked again in this run (a hanging query would otherwise cost its time limit
every step).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vitos_verl.compat import verl_0_9, vllm_0_24

logger = logging.getLogger(__name__)

PREFIX = "rollout/vit_cache/"
COUNTERS = ("hits", "misses", "recomputes", "pixelless")
RPC_STATS = "vitos_vit_cache_stats"  # vitos_verl.rollout.vllm_model.RPC_STATS (not imported: that module needs vLLM)
#: Seconds the engine gets for the RPC; the driver waits a little longer for the Ray call.
RPC_TIMEOUT_S = 30.0
_STATE_ATTR = "_vitos_vit_cache_state"


# ---------------------------------------------------------------------------- pure logic
def replica_counters(worker_stats: Sequence[Mapping[str, Any]] | None) -> dict[str, int]:
    """One replica's counters from its workers' :func:`vit_cache_stats` dicts: the maximum per
    counter (TP/PP ranks see the same requests; module doc). Missing counters count 0.

    Raises:
        TypeError / ValueError: a result that is not a list of mappings of numbers.
    """
    out = dict.fromkeys(COUNTERS, 0)
    for stats in worker_stats or ():
        if not isinstance(stats, Mapping):
            raise TypeError(f"expected a dict of ViT-cache counters per worker, got {type(stats).__name__}")
        for k in COUNTERS:
            out[k] = max(out[k], int(stats.get(k, 0)))
    return out


def replica_images(worker_stats: Sequence[Mapping[str, Any]] | None) -> dict[str, int]:
    """One replica's ``{image key: pruned items served}`` (cumulative): the maximum per key over its
    workers' ``images`` maps (TP/PP ranks see the same requests). Workers without the map: ``{}``."""
    out: dict[str, int] = {}
    for stats in worker_stats or ():
        for k, n in (stats.get("images") or {}).items():
            out[k] = max(out.get(k, 0), int(n))
    return out


def total_counters(replicas: Iterable[Sequence[Mapping[str, Any]] | None]) -> dict[str, Any]:
    """Counters summed over replicas (each one :func:`replica_counters` of its workers' dicts),
    and under ``"replicas"`` each replica's own counters plus its ``"images"``
    (:func:`replica_images`), in the given order."""
    total: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    per_replica = []
    for workers in replicas:
        own = replica_counters(workers)
        for k, v in own.items():
            total[k] += v
        per_replica.append({**own, "images": replica_images(workers)})
    total["replicas"] = per_replica
    return total


def replica_step_metrics(current: Sequence[Mapping[str, Any]] | None,
                         previous: Sequence[Mapping[str, Any]] | None) -> dict[str, float]:
    """The per-replica metrics of one step (module doc) from two :func:`total_counters`
    ``"replicas"`` lists; a replica absent before counts from 0 (as does a counter that went down).
    ``{}`` when ``current`` is empty or ``None``."""
    if not current:
        return {}
    previous = list(previous or ())
    out: dict[str, float] = {}
    served: dict[str, int] = {}  # image key -> replicas that served it this step
    for i, now in enumerate(current):
        before = previous[i] if i < len(previous) else {}
        items = sum(int(now.get(k, 0)) for k in ("hits", "misses"))
        items_before = sum(int(before.get(k, 0)) for k in ("hits", "misses"))
        out[f"rollout/replica_{i}/image_items"] = float(items - items_before if items >= items_before else items)
        old = before.get("images") or {}
        fresh = [k for k, n in (now.get("images") or {}).items() if n != old.get(k, 0)]
        out[f"rollout/replica_{i}/images"] = float(len(fresh))
        for k in fresh:
            served[k] = served.get(k, 0) + 1
    out[f"{PREFIX}split_images"] = float(sum(n > 1 for n in served.values()))
    return out


def step_delta(current: Mapping[str, int], previous: Mapping[str, int] | None) -> dict[str, float]:
    """The metrics of one step: per-counter change since ``previous`` (``None``: since 0), and
    the hit rate of that change when it holds any image (module doc)."""
    out: dict[str, float] = {}
    for k in COUNTERS:
        now, before = int(current.get(k, 0)), int((previous or {}).get(k, 0))
        out[f"{PREFIX}{k}"] = float(now - before if now >= before else now)  # went down: a restarted engine
    seen = out[f"{PREFIX}hits"] + out[f"{PREFIX}misses"]
    if seen > 0:
        out[f"{PREFIX}hit_rate"] = out[f"{PREFIX}hits"] / seen
    return out


# ---------------------------------------------------------------------------- server side
def _server_vit_stats(server: Any, timeout: float = RPC_TIMEOUT_S) -> list[dict] | None:
    """Runs in a ``vLLMHttpServer`` actor (``__ray_call__``): its engine's
    ``collective_rpc(RPC_STATS)``, one dict per worker; ``None`` on a server without an engine
    (the other node ranks of a multi-node replica).

    Raises:
        RuntimeError: the engine's asyncio loop cannot be found (no ``output_handler`` task).
        Whatever the RPC raises (e.g. a worker without the plugin's method), or a time-out.
    """
    engine = getattr(server, "engine", None)
    if engine is None:
        return None
    loop = vllm_0_24.engine_event_loop(engine)
    coro = engine.collective_rpc(RPC_STATS, timeout=timeout)
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if in_loop:  # never block the loop the engine runs on
        coro.close()
        raise RuntimeError("called on a running event loop: cannot wait for the engine's RPC there")
    return list(asyncio.run_coroutine_threadsafe(coro, loop).result(timeout + 5.0))


# ---------------------------------------------------------------------------- driver side
def query_replicas(trainer: Any, timeout: float = RPC_TIMEOUT_S) -> dict[str, int]:
    """Cumulative counters of all replicas now, summed and per replica (:func:`total_counters`).

    Raises:
        Any failure of the Ray calls or the RPC (the caller catches it).
    """
    import ray

    per_replica = verl_0_9.rollout_server_handles(trainer)
    refs = [[h.__ray_call__.remote(_server_vit_stats, timeout) for h in handles] for handles in per_replica]
    flat = ray.get([r for rs in refs for r in rs], timeout=timeout + 15.0)
    it = iter(flat)
    replicas = []
    for rs in refs:
        workers = [w for res in (next(it) for _ in rs) if res is not None for w in res]
        replicas.append(workers)
    return total_counters(replicas)


def vit_cache_step_metrics(trainer: Any, query=query_replicas) -> dict[str, float]:
    """This step's ``rollout/vit_cache/*`` metrics (module doc); ``{}`` on any failure.

    State (the previous counters, a disabled flag) lives on ``trainer`` as
    ``_vitos_vit_cache_state``. ``query(trainer)`` returns the cumulative counters (a parameter
    for tests).
    """
    state = trainer.__dict__.setdefault(_STATE_ATTR, {"previous": None, "disabled": False})
    if state["disabled"]:
        return {}
    try:
        current = query(trainer)
        out = step_delta(current, state["previous"])
        out.update(replica_step_metrics(current.get("replicas"), (state["previous"] or {}).get("replicas")))
    except Exception as exc:  # never fail a training step for a metric
        state["disabled"] = True
        logger.warning(
            "ViT-cache metrics (%s*) are off for this run: asking the rollout replicas failed (%s: %s)",
            PREFIX, type(exc).__name__, exc,
        )
        return {}
    state["previous"] = dict(current)
    return out
