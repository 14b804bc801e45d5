"""vitos_verl.trainer.optimizer: AdamW with the token embedding at its own rate, built the way
verl 0.9.1 builds the actor's optimizer (``verl.workers.config.optimizer.build_optimizer``)."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer
from verl.utils.torch_functional import get_constant_schedule_with_warmup
from verl.workers.config.optimizer import FSDPOptimizerConfig, build_optimizer

from vitos_verl.trainer.optimizer import AdamW, split_embedding


@pytest.fixture()
def policy(tiny_ckpt):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_ckpt, dtype=torch.float32)  # fp32: AVX2 hosts too
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    ids = tok(["<answer>red</answer> the disc is red", "<box>[0, 0, 112, 112]</box>"], return_tensors="pt",
              padding=True).input_ids  # fmt: skip
    return model, ids


def _step(model, optimizer, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _config(**override):
    return FSDPOptimizerConfig(lr=1e-3, weight_decay=0.0, optimizer_impl="vitos_verl.trainer.optimizer",
                               optimizer="AdamW", override_optimizer_config=override or None)  # fmt: skip


def test_split_finds_the_tied_embedding_only(policy):
    model, _ = policy
    embedding, rest = split_embedding(model.parameters())
    emb = model.get_input_embeddings().weight
    assert len(embedding) == 1 and embedding[0] is emb
    assert model.get_output_embeddings().weight is emb  # tied in the tiny sizes, as in Qwen2.5-VL-3B
    assert len(rest) == len(list(model.parameters())) - 1


def test_frozen_embedding_stays_while_the_model_moves(policy):
    model, ids = policy
    optimizer = build_optimizer(model.parameters(), _config(embedding_lr_scale=0.0))
    assert isinstance(optimizer, AdamW)
    emb = model.get_input_embeddings().weight
    before_emb = emb.detach().clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(input_ids=ids, labels=ids).loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0  # it has a gradient: only its rate is 0
    optimizer.zero_grad()
    for _ in range(2):
        _step(model, optimizer, ids)
    assert torch.equal(emb, before_emb)
    moved = [n for n, p in model.named_parameters() if p is not emb and not torch.equal(p, before[n])]
    assert any("language_model.layers" in n for n in moved) and any("visual" not in n for n in moved)


def test_scale_one_is_plain_adamw(policy, tiny_ckpt):
    model, ids = policy
    twin = AutoModelForImageTextToText.from_pretrained(tiny_ckpt, dtype=torch.float32)
    twin.load_state_dict(model.state_dict())
    ours = build_optimizer(model.parameters(), _config())
    plain = build_optimizer(twin.parameters(), FSDPOptimizerConfig(lr=1e-3, weight_decay=0.0))
    for _ in range(2):
        _step(model, ours, ids)
        _step(twin, plain, ids)
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_scaled_rate_holds_through_verls_warmup(policy):
    model, ids = policy
    optimizer = build_optimizer(model.parameters(), _config(embedding_lr_scale=0.1))
    sched = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=4)
    for _ in range(3):
        _step(model, optimizer, ids)
        sched.step()
        model_lr, emb_lr = (g["lr"] for g in optimizer.param_groups)
        assert model_lr > 0 and emb_lr == pytest.approx(0.1 * model_lr)
    assert sched.get_last_lr()[0] == optimizer.param_groups[0]["lr"]  # the rate verl logs is the model's


def test_refuses_what_it_cannot_honour(policy):
    model, _ = policy
    with pytest.raises(ValueError, match=">= 0"):
        AdamW(model.parameters(), lr=1e-3, embedding_lr_scale=-1.0)
    flat = [torch.nn.Parameter(torch.cat([p.detach().flatten() for p in model.parameters()]))]  # FSDP1's flat params
    with pytest.raises(ValueError, match="use_orig_params"):
        AdamW(flat, lr=1e-3, embedding_lr_scale=0.0)
    assert len(AdamW(flat, lr=1e-3).param_groups) == 1
