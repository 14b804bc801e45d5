"""The upstream hooks of ``vitos_verl.compat``: each pinned by the signature and a hash of the
upstream function's source (an upgrade fails here, naming the hook), and each shown to fix what
it is for on real-shaped data."""

from __future__ import annotations

import hashlib
import inspect

import pytest
import torch

from vitos_verl.compat import verl_0_9

# (module, function) -> (signature, sha256 of inspect.getsource) in verl 0.9.1
PINNED = {
    ("verl.workers.utils.padding", "left_right_2_no_padding"): (
        "(data: tensordict._td.TensorDict) -> tensordict._td.TensorDict",
        "8b09e2ef9bb544fa95661223f7d002e6cd8ec76b250b0ca6335916d5082acf87",
    ),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.prepare_model_inputs"): (
        "(self, micro_batch: tensordict._td.TensorDict)",
        "e7a30a3b61b58c8bdc281fd900bf03e82d07517b38953c03cc15e93da7950858",
    ),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.prepare_model_outputs"): (
        "(self, output, output_args, micro_batch: tensordict._td.TensorDict, logits_processor_func)",
        "5239f536e8f617e3538cc0aa2c4aaf7d4d27e59877abb40abe635e6a2d46c7ce",
    ),
    ("verl.models.transformers.qwen2_vl", "forward_with_normal_backend"): (
        "(self: transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VLForConditionalGeneration, "
        "input_ids: torch.LongTensor = None, labels: Optional[torch.LongTensor] = None, temperature: float = 1.0, "
        "**kwargs) -> 'Qwen2VLCausalLMOutputWithPast'",
        "18d07bd343e2e2c0b755869486f61d03652414119f269bc1752c5b8117668a98",
    ),
}


@pytest.mark.parametrize("where", sorted(PINNED))
def test_upstream_functions_are_the_pinned_ones(where):
    import importlib

    import verl

    fn = importlib.import_module(where[0])
    for part in where[1].split("."):
        fn = getattr(fn, part)
    fn = inspect.unwrap(fn)
    signature, digest = PINNED[where]
    assert verl.__version__ == verl_0_9.VERL_VERSION
    assert str(inspect.signature(fn)) == signature, f"{where}: signature changed; review vitos_verl.compat.verl_0_9"
    got = hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
    assert got == digest, f"{where}: source changed since verl {verl_0_9.VERL_VERSION}; review vitos_verl.compat.verl_0_9"


def _batch(lengths: list[int], width: int = 12):
    """verl's left-right padded layout of M-RoPE samples: (B, width) ids and masks, (B, 4, width) positions."""
    from tensordict import TensorDict

    b = len(lengths)
    attention = torch.zeros(b, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        attention[i, width - n - 2 : width - 2] = 1  # left-padded prompt, then a 2-token response slot
    positions = torch.arange(width).repeat(b, 4, 1) * 10 + torch.arange(4).view(1, 4, 1)
    return TensorDict(
        {"input_ids": torch.arange(b * width).view(b, width), "attention_mask": attention,
         "response_mask": attention[:, -4:], "position_ids": positions},
        batch_size=b,
    )  # fmt: skip


@pytest.mark.parametrize("lengths", [[5, 5, 5], [7], [4, 6]])
def test_driver_keeps_mrope_tokens_ragged_for_equal_lengths(lengths):
    """verl 0.9.1 turns equal-length 3-D position ids into a layout its workers cannot index (the
    "split_with_sizes" crash of a step whose samples all have one length); after install() the
    driver's conversion gives (4, L_i) per sample whatever the lengths, as verl's workers index it."""
    import verl.trainer.ppo.ray_trainer as verl_ray_trainer
    from verl.utils.tensordict_utils import index_select_tensor_dict, maybe_fix_3d_position_ids

    def select_all(convert):
        td = convert(_batch(lengths))
        maybe_fix_3d_position_ids(td)  # what verl's workers do first
        return index_select_tensor_dict(td, list(range(len(lengths))))["position_ids"].unbind()

    original = inspect.unwrap(verl_ray_trainer.left_right_2_no_padding)
    if len(set(lengths)) == 1:
        with pytest.raises(RuntimeError):  # "split_with_sizes expects ..." in a training step
            select_all(original)
    verl_0_9.install()
    verl_0_9.install()  # idempotent
    assert inspect.unwrap(verl_ray_trainer.left_right_2_no_padding) is original
    rows = select_all(verl_ray_trainer.left_right_2_no_padding)
    padded = _batch(lengths)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        assert row.shape == (4, n)
        assert torch.equal(row, padded["position_ids"][i][:, padded["attention_mask"][i].bool()])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_response_only_lm_head_gives_verls_log_probs(dtype, tmp_path):
    """verl 0.9.1 without remove-padding computes the LM head, log-softmax and entropy at every
    prompt position and drops them; the worker hook computes them from the first response position
    on. On one step's two streams through the real actor worker (a 64-token image for grounding,
    the pruned one for reasoning, answers of two lengths), the response log-probs and entropies
    equal verl's, and the hook is not slower."""
    import json
    import os
    import subprocess
    import sys
    from dataclasses import replace
    from pathlib import Path

    from data_prep import sparse_evidence
    from vitos_verl.models.tiny import SIZES, build_tiny_checkpoint
    from vitos_verl.platform import precision

    if dtype == "bfloat16" and not precision.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX-512-BF16): the bf16 path is not what it runs")
    root = Path(__file__).resolve().parents[1]
    model = build_tiny_checkpoint(root / "outputs" / "test-cache" / "tiny-qwen2.5-vl-224px", replace(SIZES["tiny"], max_pixels=50176))
    sparse_evidence.generate(tmp_path / "task", seed=0, n_train=8, n_val=2)
    out = tmp_path / "logits.json"
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_ENGINE_DEVICE": "cuda", "VERL_ENGINE_VENDOR": "nvidia",
           precision.ENV: dtype, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    cmd = [sys.executable, str(root / "tests" / "_inprocess.py"), "logits", str(out), str(tmp_path / "task"), str(model),
           "data.train_batch_size=4", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8"]  # fmt: skip
    run = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    res = json.loads(out.read_text())
    tol = 1e-5 if dtype == "float32" else 2e-2
    for stream in ("grounding", "reasoning"):
        s = res[stream]
        assert s["tokens"] > 100 and not s["all_zero"], s
        assert s["mean_log_prob"] < -1.0, s  # a random policy: far from certain, so a 0 fill would show
        assert s["max_abs_diff_log_probs"] <= tol and s["max_abs_diff_entropy"] <= tol, s
        # a guard against blow-ups only (bench/ holds the measured speed-up)
        assert s["seconds"]["response_only"] < 2 * s["seconds"]["verl"] + 1.0, s


def test_sft_warmstart_lm_head_from_the_loss_gives_verls_loss(tmp_path):
    """verl's SFT trainer (no remove-padding) computes the LM head at every prompt position;
    ``vitos_verl.trainer.sft_warmstart`` computes it from the loss mask's first token. Two steps of
    the same data, seed and tiny policy (fp32, both streams' examples, a 64-token image) through
    verl's entrypoint and ours: the losses and gradient norms agree, and the hook was used."""
    import json
    import os
    import subprocess
    import sys
    from dataclasses import replace
    from pathlib import Path

    from data_prep import sparse_evidence
    from vitos_verl.data import sft
    from vitos_verl.models.tiny import SIZES, build_tiny_checkpoint
    from vitos_verl.platform import precision

    root = Path(__file__).resolve().parents[1]
    model = build_tiny_checkpoint(root / "outputs" / "test-cache" / "tiny-qwen2.5-vl-224px", replace(SIZES["tiny"], max_pixels=50176))
    sparse_evidence.generate(tmp_path / "task", seed=0, n_train=8, n_val=2)
    sft.main(["--out", str(tmp_path / "sft.parquet"), "--max-pixels", "50176", "--inputs", str(tmp_path / "task" / "train.parquet")])
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_ENGINE_DEVICE": "cuda", "VERL_ENGINE_VENDOR": "nvidia",
           precision.ENV: "float32", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    torchrun = Path(sys.executable).parent / "torchrun"
    losses = {}
    for name, module in (("verl", "verl.trainer.sft_trainer"), ("vitos", "vitos_verl.trainer.sft_warmstart")):
        run = tmp_path / name
        run.mkdir()
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", "1", "-m", module, "--config-path", str(root / "recipes"),
               "--config-name", "sft_warmstart_cpu", f"outputs_dir={tmp_path}", f"model.path={model}",
               f"data.train_files={tmp_path / 'sft.parquet'}", "data.train_batch_size=8", "data.micro_batch_size_per_gpu=4",
               "data.max_length=256", "trainer.total_training_steps=2", "trainer.seed=0", "trainer.logger=[file]",
               f"trainer.default_local_dir={run}", "checkpoint.save_contents=[model]"]  # fmt: skip
        proc = subprocess.run(cmd, env={**env, "VERL_FILE_LOGGER_PATH": str(run / "metrics.jsonl")}, cwd=root,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert ("vitos_verl: SFT LM head from position" in proc.stdout) == (name == "vitos"), proc.stdout[-2000:]
        rows = [json.loads(line)["data"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [(r["train/loss"], r["train/grad_norm"]) for r in rows if "train/loss" in r]
    assert len(losses["verl"]) == 2, losses
    for (loss_a, grad_a), (loss_b, grad_b) in zip(losses["verl"], losses["vitos"]):
        assert loss_a > 1.0 and abs(loss_a - loss_b) <= 1e-4 * loss_a, losses  # a random policy's loss, equal
        assert abs(grad_a - grad_b) <= 1e-3 * grad_a, losses
