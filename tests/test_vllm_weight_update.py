"""A weight update reaches the pruned path's vision features (no stale ViT cache), fp32, CPU.

verl's weight sync calls the vLLM model's ``load_weights`` once per bucket, then resets vLLM's
prefix, multimodal and encoder caches (verl 0.9.1 ``vLLMHttpServer.clear_kv_cache``). After it,
a pruned request on an image seen before must give the transformers forward's log-probs under
the *new* weights, not features the plugin cached with the old ones. The engine, the
transformers model, the SLAKE cases and the helpers are those of ``test_vllm_parity.py``; this
module gets its own engine and model (module-scoped fixtures), whose weights it changes.
"""

from __future__ import annotations

import pytest
import torch

from tests import test_vllm_parity as parity
from tests.test_vllm_parity import _actor_logprobs, _request, _vit_counts

pytestmark = pytest.mark.vllm
llm, hf_model, cases = parity.llm, parity.hf_model, parity.cases  # the fixtures (module scope: this module's own)
WEIGHT = "model.visual.merger.mlp.2.weight"  # the HF name verl's sync sends; vLLM maps it to visual.*
ATOL = 1e-4  # fp32 on any CPU kernel set: 1e-6 measured; a stale feature is off by 1e-2 or more


@pytest.fixture(scope="module", autouse=True)
def _linear_weights_in_place():
    """vLLM-CPU keeps Linear weights writable, as under verl's CPU platform, for this module's engine."""
    from vllm.model_executor.layers import utils

    from vitos_verl.rollout.vllm_plugin import keep_cpu_linear_weights

    orig = utils.dispatch_cpu_unquantized_gemm
    keep_cpu_linear_weights()
    yield
    utils.dispatch_cpu_unquantized_gemm = orig


def _update_vision_weight(llm, hf_model, seed: int) -> None:
    """Perturb one vision weight in both models: into vLLM through the model's ``load_weights``."""
    param = dict(hf_model.named_parameters())[WEIGHT]
    g = torch.Generator().manual_seed(seed)
    new = param.detach() + torch.randn(param.shape, generator=g) * param.detach().std()
    loaded = llm.apply_model(lambda m: sorted(m.load_weights([(WEIGHT, new.clone())])))[0]
    assert loaded == ["visual.merger.mlp.2.weight"]
    with torch.no_grad():
        param.copy_(new)


def _clear_caches_like_verl(llm) -> None:
    """verl 0.9.1's post-sync ``clear_kv_cache``: prefix, multimodal and encoder caches of the engine."""
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()


def _sample(llm, case, mask, seed: int) -> tuple[list[int], torch.Tensor]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=seed, logprobs=0, ignore_eos=True)
    out = llm.generate([_request(case, mask)], sp, use_tqdm=False)[0].outputs[0]
    response = list(out.token_ids)
    return response, torch.tensor([lps[t].logprob for t, lps in zip(response, out.logprobs)])


def _check_fresh(llm, hf_model, case, mask, seed: int) -> tuple[list[int], torch.Tensor]:
    """Sample after an update: vLLM's log-probs are the transformers forward's under the new weights."""
    response, vllm_lp = _sample(llm, case, mask, seed)
    new_lp = _actor_logprobs(hf_model, case["enc"], mask, response)
    diff = float((vllm_lp - new_lp).abs().max())
    print(f"K={int(mask.sum())} after update: max|dlogp| vs new weights {diff:.2e}")
    assert diff <= ATOL, (vllm_lp, new_lp)
    return response, vllm_lp


def test_same_pruned_request_after_weight_sync(llm, hf_model, cases):
    """verl's sequence: ``load_weights`` of a vision weight, then its cache resets; same request, same image."""
    case = cases[0]
    response, before = _sample(llm, case, case["mask"], seed=1)
    old_lp = _actor_logprobs(hf_model, case["enc"], case["mask"], response)
    assert float((before - old_lp).abs().max()) <= ATOL
    _, miss0 = _vit_counts(llm)
    _update_vision_weight(llm, hf_model, seed=0)
    _clear_caches_like_verl(llm)
    new_lp = _actor_logprobs(hf_model, case["enc"], case["mask"], response)
    assert float((new_lp - old_lp).abs().max()) > 1e-2, "the update does not change the log-probs"
    after_response, after = _check_fresh(llm, hf_model, case, case["mask"], seed=1)
    if after_response == response:
        assert float((after - before).abs().max()) > 1e-2
    assert _vit_counts(llm)[1] == miss0 + 1, "the ViT did not run again on the new weights"


def test_load_weights_alone_invalidates(llm, hf_model, cases):
    """A partial ``load_weights`` (one tensor) with no cache reset at all: a new box on a seen image,
    which vLLM's own prefix and encoder caches cannot serve, uses features of the new weights."""
    case = cases[1]
    _sample(llm, case, case["mask"], seed=2)  # the image's features are cached now
    _update_vision_weight(llm, hf_model, seed=1)
    assert llm.apply_model(lambda m: len(m._vit_cache))[0] == 0
    other = case["mask"].clone()
    other[0, :] = True  # another box: another vitos_keep, so another prompt and multimodal hash
    assert not torch.equal(other, case["mask"])
    _check_fresh(llm, hf_model, case, other, seed=2)


def _other_mask(case, row: int = -1):
    """The case's mask with one more row of cells kept: another box, so another ``vitos_keep``,
    prompt and multimodal hash (vLLM's own prefix and encoder caches cannot serve it)."""
    other = case["mask"].clone()
    rows = [r for r in range(other.shape[0]) if not bool(other[r].all())]
    other[rows[row], :] = True
    assert not torch.equal(other, case["mask"])
    return other


def test_encoder_cache_reset_keeps_features_of_unchanged_vision_weights(llm, hf_model, cases):
    """vLLM's ``reset_encoder_cache`` (verl calls it after every sync and hybrid sleep) with the
    vision weights unchanged: the image is not encoded again, and the request is still exact."""
    case = cases[1]
    _sample(llm, case, case["mask"], seed=3)
    hits0, miss0 = _vit_counts(llm)
    kept, clears = llm.apply_model(lambda m: (m.vit_cache_kept, m.vit_cache_clears))[0]
    _clear_caches_like_verl(llm)
    _check_fresh(llm, hf_model, case, _other_mask(case), seed=3)
    assert _vit_counts(llm) == (hits0 + 1, miss0), "the ViT ran again on unchanged weights"
    assert llm.apply_model(lambda m: (m.vit_cache_kept, m.vit_cache_clears))[0] == (kept + 1, clears)


def test_vision_change_that_bypasses_load_weights_is_caught_after_a_reset(llm, hf_model, cases):
    """A vision weight written in place (as ``reload_weights``' kernel-format branch does), then
    ``reset_encoder_cache``: the next request re-encodes the image with the new weights."""
    case = cases[1]
    _sample(llm, case, case["mask"], seed=6)
    _, miss0 = _vit_counts(llm)
    clears = llm.apply_model(lambda m: m.vit_cache_clears)[0]
    param = dict(hf_model.named_parameters())[WEIGHT]
    delta = torch.randn(param.shape, generator=torch.Generator().manual_seed(7)) * param.detach().std()

    def write(m):
        with torch.no_grad():
            dict(m.named_parameters())["visual.merger.mlp.2.weight"].add_(delta)

    llm.apply_model(write)
    with torch.no_grad():
        param.add_(delta)
    _clear_caches_like_verl(llm)
    _check_fresh(llm, hf_model, case, _other_mask(case), seed=6)
    assert _vit_counts(llm)[1] == miss0 + 1 and llm.apply_model(lambda m: m.vit_cache_clears)[0] == clears + 1


def test_frozen_tower_sync_encodes_each_image_once(llm, hf_model, cases):
    """verl's sync with a frozen vision tower: every vision weight re-sent unchanged and a language
    weight changed, then the caches reset. The images are not encoded again; the answers follow
    the new language weights."""
    for case in cases:
        _sample(llm, case, case["mask"], seed=8)
    _, miss0 = _vit_counts(llm)
    visual = [(n, p.detach().clone()) for n, p in hf_model.named_parameters() if "visual" in n]
    name, param = next((n, p) for n, p in hf_model.named_parameters() if n.endswith("layers.0.mlp.down_proj.weight"))
    new = param.detach() + torch.randn(param.shape, generator=torch.Generator().manual_seed(9)) * param.detach().std()
    llm.apply_model(lambda m: m.load_weights(visual))
    llm.apply_model(lambda m: m.load_weights([(name, new.clone())]))
    with torch.no_grad():
        param.copy_(new)
    _clear_caches_like_verl(llm)
    for k, case in enumerate(cases):
        _check_fresh(llm, hf_model, case, _other_mask(case), seed=10 + k)
    assert _vit_counts(llm)[1] == miss0, "a frozen tower's images were encoded again"


def test_vit_cache_is_a_bounded_lru(llm, cases):
    """At most ``vit_cache_max_items`` images and ``vit_cache_max_bytes`` of features stay cached."""

    def set_bounds(items: int, nbytes: int):
        def f(m):
            old = (m.vit_cache_max_items, m.vit_cache_max_bytes)
            m.vit_cache_max_items, m.vit_cache_max_bytes = items, nbytes
            return old

        return llm.apply_model(f)[0]

    def state(m):
        return len(m._vit_cache), m._vit_cache.nbytes, sum(f.numel() * f.element_size() for f in m._vit_cache.values())

    old = set_bounds(1, 1 << 40)
    try:
        _clear_caches_like_verl(llm)  # no prefix-cache hit may skip the vision encoder
        for case in cases:
            _sample(llm, case, case["mask"], seed=4)
        n, nbytes, actual = llm.apply_model(state)[0]
        assert n == 1 and nbytes == actual > 0
        set_bounds(8, 1)  # below any image's features: nothing stays, the request still works
        _clear_caches_like_verl(llm)
        _sample(llm, cases[0], cases[0]["mask"], seed=5)
        assert llm.apply_model(state)[0] == (0, 0, 0)
    finally:
        set_bounds(*old)
