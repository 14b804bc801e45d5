"""A question's requests all go to one rollout replica (the one that served its grounding pass).

verl 0.9.1's own ``AgentLoopWorker.generate_sequences`` (our worker, built from the composed smoke
recipe; the tiny checkpoint's processor, real SLAKE rows) talks through verl's real
``LLMServerClient`` to verl's real ``GlobalRequestLoadBalancer`` (a plain object behind a
Ray-like ``.remote`` facade: calls run at once, in order, as the single-threaded actor runs them)
and three fake vLLM servers. The grounding batch (``n_g`` samples per question) spreads the
questions over the servers; the reasoning batch (pruned prompts, ``n_g * n_r`` per question)
lands each question on its grounding server; vLLM sees a fresh request id per call and the
balancer's in-flight counts return to zero.
"""

from __future__ import annotations

import asyncio
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from vitos_verl.rollout.agent_loop import ROUTE_PREFIX, _RoutedServer, routing_key

ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = 78400  # the smoke recipe's budget
REPLY = "<box>[10, 10, 60, 60]</box>"


def _encode(cells: torch.Tensor) -> str:
    """The keep mask's text form (``vitos_keep``)."""
    from vitos_verl.pruning import KeepMask

    return KeepMask(cells).encode()


class _Done:
    """An already-computed awaitable (what ``ray.get`` of a finished call gives)."""

    def __init__(self, value):
        self.value = value

    def __await__(self):
        return self.value
        yield  # noqa: unreachable (makes this a generator)


class _Actor:
    """``handle.method.remote(...)`` on a plain object, run at once (a Ray actor's serial order)."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        fn = getattr(self._obj, name)
        return SimpleNamespace(remote=lambda *a, **k: _Done(fn(*a, **k)))


class _FakeVLLM:
    """A vLLM server: records each call, answers REPLY after a short wait (requests overlap)."""

    def __init__(self, name: str, tokenizer, log: list):
        self.name, self.tok, self.log = name, tokenizer, log
        self.generate = SimpleNamespace(remote=self._generate)

    async def _generate(self, *, request_id, prompt_ids, sampling_params, mm_processor_kwargs=None, **_):
        from verl.workers.rollout.replica import TokenOutput

        self.log.append({"server": self.name, "vllm_id": request_id, "keep": (mm_processor_kwargs or {}).get("vitos_keep", "")})
        await asyncio.sleep(0.05)
        return TokenOutput(token_ids=self.tok.encode(REPLY) + [self.tok.eos_token_id], extra_fields={})


# ------------------------------------------------------------------ the key
def test_routing_key_and_fallbacks():
    assert routing_key("q-1") == f"{ROUTE_PREFIX}q-1" == routing_key("q-1", OmegaConf.create({"full_determinism": False}))
    for uid in (None, "", float("nan")):
        assert routing_key(uid) is None
    assert routing_key("q-1", OmegaConf.create({"full_determinism": True})) is None
    assert routing_key("q-1", OmegaConf.create({"router_config_path": "my_router.yaml"})) is None
    assert routing_key("q-1", OmegaConf.create({"router_config_path": None})) == "vitos-q-1"

    calls = []

    class Inner:
        other = 3

        async def generate(self, request_id, **kw):
            calls.append((request_id, kw))
            return "ok"

    proxy = _RoutedServer(Inner(), "vitos-q")
    assert asyncio.run(proxy.generate(request_id="abc", prompt_ids=[1])) == "ok"
    assert calls == [("vitos-q", {"prompt_ids": [1]})] and proxy.other == 3


# ------------------------------------------------------------------ through verl's worker, client and balancer
@pytest.fixture(scope="module")
def cfg(tiny_ckpt, tmp_path_factory):
    from hydra import compose, initialize_config_dir

    os.environ["VITOS_OUTPUTS"] = str(tmp_path_factory.mktemp("outputs"))
    overrides = [f"actor_rollout_ref.model.path={tiny_ckpt}", "data.max_prompt_length=1024", "data.max_response_length=32"]
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base=None):
        c = compose(config_name="smoke_cpu", overrides=overrides)
    OmegaConf.resolve(c)
    return c


def _batch(rows, chats, uids, keeps, meta_info):
    from verl import DataProto

    from vitos_verl.rollout.agent_loop import AGENT_NAME

    n = len(chats)
    raw = np.empty(n, dtype=object)
    raw[:] = chats
    return DataProto.from_dict(
        tensors={"dummy_tensor": torch.zeros(n, 1, dtype=torch.uint8)},
        non_tensors={
            "raw_prompt": raw, "agent_name": np.array([AGENT_NAME] * n, dtype=object),
            "vitos_keep": np.array(keeps, dtype=object), "index": np.arange(n),
            "uid": np.array(uids, dtype=object),
            "data_source": np.array([r["data_source"] for r in rows], dtype=object),
            "reward_model": np.array([r["reward_model"] for r in rows], dtype=object),
            "extra_info": np.array([r["extra_info"] for r in rows], dtype=object),
        },
        meta_info=meta_info,
    )


@pytest.mark.parametrize("validate", [False, True])
def test_reasoning_requests_follow_their_question_to_its_grounding_replica(cfg, slake_dataset, validate):
    from verl.workers.rollout.llm_server import LLMServerClient
    from verl.workers.rollout.router import GlobalRequestLoadBalancer

    from vitos_verl.pruning import MERGE_SIZE
    from vitos_verl.rollout.agent_loop import ViToSAgentLoopWorker

    ds = slake_dataset(MAX_PIXELS)
    # 6 questions; through pickle as through Ray (loads the lazily decoded images the samples share)
    questions = pickle.loads(pickle.dumps([ds[i] for i in range(0, 240, 40)]))
    n_g, n_r = 2, 2
    uids = [f"q{i}-{validate}" for i in range(len(questions))]

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = ViToSAgentLoopWorker(cfg, llm_client=None)
    log: list[dict] = []
    servers = {f"10.0.0.{i}:8000": _FakeVLLM(f"s{i}", worker.tokenizer, log) for i in range(3)}
    balancer = GlobalRequestLoadBalancer(servers)  # verl's real class, no Ray
    worker.llm_client = LLMServerClient(cfg, load_balancer_handle=_Actor(balancer))
    worker.reward_loop_worker_handles = None
    meta = {"global_steps": 3, "validate": validate}

    acquired: list[tuple[str, str]] = []  # (routing key, server) of every acquire, in order
    acquire = balancer.acquire_server

    def logged_acquire(request_id):
        sid, handle = acquire(request_id)
        acquired.append((request_id, handle.name))
        return sid, handle

    balancer.acquire_server = logged_acquire

    # grounding: n_g samples per question, full image
    g_rows = [q for q in questions for _ in range(n_g)]
    g = loop.run_until_complete(
        worker.generate_sequences(_batch(g_rows, [q["raw_prompt"] for q in g_rows], np.repeat(uids, n_g), [""] * len(g_rows), meta))
    )
    grounding = log[:]
    assert len(grounding) == len(g_rows) and not any(c["keep"] for c in grounding)
    assert sorted(k for k, _ in acquired) == sorted(f"{ROUTE_PREFIX}{u}" for u in np.repeat(uids, n_g))
    g_server = {}
    for key, server in acquired:
        assert g_server.setdefault(key, server) == server, f"{key}: grounding requests on two replicas"
    assert len(set(g_server.values())) >= 2, f"questions did not spread over the replicas: {g_server}"
    assert sorted(c["server"] for c in grounding) == sorted(s for _, s in acquired)

    # reasoning: n_g * n_r pruned samples per question (a keep mask on its own image grid)
    grids = g.non_tensor_batch["multi_modal_inputs"]
    r_rows, r_chats, r_uids, r_keeps = [], [], [], []
    for j, q in enumerate(g_rows):
        grid = grids[j]["image_grid_thw"][0]
        mask = torch.zeros(int(grid[1]) // MERGE_SIZE, int(grid[2]) // MERGE_SIZE, dtype=torch.bool)
        mask[: mask.shape[0] // 2 + 1, : mask.shape[1] // 2 + 1] = True
        for _ in range(n_r):
            r_rows.append(q)
            r_chats.append(q["raw_reasoning_prompt"])
            r_uids.append(uids[j // n_g])
            r_keeps.append(_encode(mask))
    log.clear()
    acquired.clear()
    loop.run_until_complete(worker.generate_sequences(_batch(r_rows, r_chats, r_uids, r_keeps, meta)))
    assert len(log) == len(r_rows) and all(c["keep"] for c in log)
    assert sorted(k for k, _ in acquired) == sorted(f"{ROUTE_PREFIX}{u}" for u in r_uids)
    for key, server in acquired:  # every reasoning request on its question's grounding replica
        assert server == g_server[key], f"{key}: reasoning on {server}, grounding on {g_server[key]}"
    assert sorted(c["server"] for c in log) == sorted(s for _, s in acquired)
    # vLLM never sees the shared key; the balancer's counts are back to zero
    ids = [c["vllm_id"] for c in grounding + log]
    assert len(set(ids)) == len(ids) and not any(i.startswith(ROUTE_PREFIX) for i in ids)
    assert balancer.get_total_inflight() == 0
    loop.close()
