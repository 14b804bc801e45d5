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
    assert got == digest, (
        f"{where}: source changed since verl {verl_0_9.VERL_VERSION}; review vitos_verl.compat.verl_0_9"
    )


# The verl symbols behind the other hooks of docs/upstream.md's verl table (V4 to V23: overrides
# and calls of private methods in the agent loop, the trainer, the worker, the dataset, the
# metrics and the loggers), each pinned the same way, keyed by the row it belongs to.
# hook (docs/upstream.md) -> [(module, qualname, signature, sha256 of inspect.getsource)] in verl 0.9.1
PINNED_HOOKS = {
    ("V4", "verl.experimental.agent_loop.single_turn_agent_loop", "SingleTurnAgentLoop.run"): (
        "(self, sampling_params: dict[str, typing.Any], priority: int = 0, **kwargs) -> verl.experimental.agent_loop.agent_loop.AgentLoopOutput",
        "1baec41cee2de25f2e48b522671d11196619aa08736250e883365c9be6c6a7e0",
    ),
    ("V5", "verl.experimental.agent_loop.agent_loop", "AgentLoopBase._get_mm_processor_kwargs"): (
        "(self, audio_data: Optional[list[Any]] = None) -> dict[str, typing.Any]",
        "ca9b5cb2adaadf0f5c40aeae97e080e37431bf5838148e360c278bb7502b5d50",
    ),
    ("V6", "verl.experimental.agent_loop.agent_loop", "AgentLoopWorker._compute_multi_modal_inputs"): (
        "(self, output, input_ids) -> dict[str, torch.Tensor]",
        "c1bf0d04b7399d10ea9cbc6a6e0beb7f708a40e90ee8ee19d2b582cae235f410",
    ),
    ("V7", "verl.experimental.agent_loop.agent_loop", "AgentLoopWorker._compute_position_ids"): (
        "(self, input_ids, attention_mask, multi_modal_inputs, mm_processor_kwargs: Optional[dict[str, Any]] = None) -> torch.Tensor",
        "f5bb787c5f984d37b32b9b59975df54d13520ed4573c7ca990cf911499d55f44",
    ),
    ("V8", "verl.experimental.agent_loop.agent_loop", "AgentLoopWorker._run_agent_loop"): (
        "(self, sampling_params: dict[str, typing.Any], trajectory: dict[str, typing.Any], *, agent_name: str, trace: bool = True, **kwargs) -> verl.experimental.agent_loop.agent_loop._InternalAgentLoopOutput",
        "32c3d607c5d4c9fa124c9d53a476689b63aeb2662f28c9cc1933fc6ec3e9e989",
    ),
    ("V8", "verl.experimental.agent_loop.agent_loop", "AgentLoopWorker._agent_loop_postprocess"): (
        "(self, output, validate, **kwargs) -> verl.experimental.agent_loop.agent_loop._InternalAgentLoopOutput",
        "0673c29ea3dbbbecc8b42274244afb73f7befd9d6d605654eaf4c149b4259bf6",
    ),
    ("V8", "verl.experimental.agent_loop.agent_loop", "AgentLoopWorker.generate_sequences"): (
        "(self, batch: verl.protocol.DataProto) -> verl.protocol.DataProto",
        "3b359e9034375860464368b4990e7d2178dde9bbd35d7513652d295820b53f65",
    ),
    ("V9", "verl.experimental.agent_loop.agent_loop", "AgentLoopWorker._compute_score"): (
        "(self, outputs: list[verl.experimental.agent_loop.agent_loop.AgentLoopOutput], kwargs: dict) -> None",
        "cf4b57719ad3c1b236e49fb99dddc4f6cf05bc0fb125e1475ce5c2534af2b742",
    ),
    ("V10", "verl.experimental.agent_loop.agent_loop", "AgentLoopWorker._postprocess"): (
        "(self, inputs: list[verl.experimental.agent_loop.agent_loop._InternalAgentLoopOutput], input_non_tensor_batch: dict | None = None, validate: bool = False) -> verl.protocol.DataProto",
        "d55eabeea2dc52a69666bfccaeee1c2c381d732ee8cd183e57cd6744733f12bf",
    ),
    ("V11", "verl.experimental.agent_loop.agent_loop", "AgentLoopManager.__init__"): (
        "(self, config: omegaconf.dictconfig.DictConfig, llm_client: verl.workers.rollout.llm_server.LLMServerClient, teacher_client: dict[str, verl.workers.rollout.llm_server.LLMServerClient] = None, reward_loop_worker_handles: list[ray.actor.ActorHandle] = None)",
        "f121655cb484a19c2e2e0d08c4e1221ec09c77e6f832ab006624366666500f04",
    ),
    ("V12", "verl.workers.engine_workers", "ActorRolloutRefWorker.update_actor"): (
        "(self, data: tensordict._td.TensorDict) -> tensordict._td.TensorDict",
        "c33d5103077466664a5a44a8936e739e510c28857c0a4295317590c1a90c3e6e",
    ),
    ("V13", "verl.workers.engine.fsdp.transformer_impl", "FSDPEngine.lr_scheduler_step"): (
        "(self)",
        "5df166dad20babd5eaa348deeca595b1eddadf65176a888dc7781aeac10e9442",
    ),
    ("V13", "verl.workers.engine_workers", "TrainingWorker.train_batch"): (
        "(self, data: tensordict._td.TensorDict) -> tensordict._td.TensorDict",
        "9107065b72b67cfcfdf662ea4c511a1ef91a8313eac91abdc0e0be1b3ebd84da",
    ),
    ("V13", "verl.workers.engine_workers", "TrainingWorker.train_mini_batch"): (
        "(self, data: tensordict._td.TensorDict) -> tensordict._td.TensorDict",
        "02b50b03fe7d8d29596ccbd41e5d3907d80a566666dc0106fbf54fc886d6601a",
    ),
    ("V14", "verl.trainer.main_ppo_v0", "TaskRunner.run"): (
        "(self, config, *, _ray_trace_ctx=None)",
        "95ebfb4a9286d46aef2897e244e0f6ca9bdee241c94b0c5c032960ff4b9bfe82",
    ),
    ("V14", "verl.trainer.main_ppo_v0", "BaseTaskRunner.add_actor_rollout_worker"): (
        "(self, config, *, _ray_trace_ctx=None)",
        "8aee2196c23a1a7d89f782c6cba20c093dd1a3800eb7a38b0ddbed035715d607",
    ),
    ("V15", "verl.trainer.ppo.ray_trainer", "RayPPOTrainer.fit"): (
        "(self)",
        "2cd5b737f76215aad3a1be94404c7a7d1d6a4cf9d6c16f44bc4841b871498ed7",
    ),
    ("V15", "verl.trainer.ppo.ray_trainer", "RayPPOTrainer._validate"): (
        "(self, merged: bool = False)",
        "61b7f39d3b0584058fa6c53a557d1b26532313723acd7f6d67a36de7e2a7ebae",
    ),
    ("V16", "verl.trainer.ppo.ray_trainer", "RayPPOTrainer._balance_batch"): (
        "(self, batch: verl.protocol.DataProto, metrics, logging_prefix='global_seqlen', keep_minibatch=False)",
        "6722e2666ebda71ee945207f823bf3e2da3f6aa97342f940c27acbc7368aebd8",
    ),
    ("V17", "verl.trainer.ppo.ray_trainer", "RayPPOTrainer._compute_old_log_prob"): (
        "(self, batch: verl.protocol.DataProto)",
        "70d1750e0c3ec43af30234c2ed518a45f9b5558022be9bda250a15f4ff295fd0",
    ),
    ("V17", "verl.trainer.ppo.ray_trainer", "RayPPOTrainer._compute_ref_log_prob"): (
        "(self, batch: verl.protocol.DataProto) -> verl.protocol.DataProto",
        "12d5f8bbf9e4ffc977e74e8ebc793ac69b054ac533422536ad0667667d6613ea",
    ),
    ("V18", "verl.trainer.ppo.ray_trainer", "RayPPOTrainer._update_actor"): (
        "(self, batch: verl.protocol.DataProto) -> verl.protocol.DataProto",
        "95f80caf7cbafdcf404ddbcff48561b520d78802f2f21ab2b620f93daf213625",
    ),
    ("V19", "verl.trainer.ppo.ray_trainer", "RayPPOTrainer._save_checkpoint"): (
        "(self)",
        "1f2ec4c96769f4a993e0a8ca8880d82e46132a2436c2ab0010384a23cdfd5b16",
    ),
    ("V20", "verl.trainer.ppo.ray_trainer", "RayPPOTrainer._load_checkpoint"): (
        "(self)",
        "23626f03573e151c9bb4fdd52c867e5bfed93568ff5a9dc29bb38d6e1fb52757",
    ),
    ("V20", "verl.utils.checkpoint.checkpoint_manager", "find_latest_ckpt_path"): (
        "(path, directory_format='global_step_{}')",
        "ef7c06afc10f04da2592de51bb84e3e778ea045cbe433b41d267f42ec9ce110c",
    ),
    ("V21", "verl.utils.dataset.rl_dataset", "RLHFDataset._build_messages"): (
        "(self, example: dict, key: str)",
        "227d9e77181d5c79e40cc58fa6fc4087ebb5039646833d52464528bf35e28f22",
    ),
    ("V21", "verl.utils.dataset.rl_dataset", "RLHFDataset.__getitem__"): (
        "(self, item)",
        "c0ba8f285fe78055846ce8751c5bbed3617776d68e795c961d8e664fe682d609",
    ),
    ("V22", "verl.workers.rollout.llm_server", "LLMServerManager.get_replicas"): (
        "(self) -> list[verl.workers.rollout.replica.RolloutReplica]",
        "bb9b442031f42d6ad4ab59d187b046bbb5d7832d08168340a2a9571c53c166ac",
    ),
    ("V23", "verl.utils.tracking", "Tracking.__init__"): (
        "(self, project_name, experiment_name, default_backend: str | list[str] = 'console', config=None)",
        "dfd601439125b449fa05fe7b9ed27175535489c5a9bf8d940b64d7f81fc6171c",
    ),
}


@pytest.mark.parametrize(
    "where", sorted(PINNED_HOOKS, key=lambda k: (int(k[0][1:]), k[1], k[2])), ids=lambda k: f"{k[0]}-{k[2]}"
)
def test_verl_symbols_behind_each_hook_are_the_pinned_ones(where):
    import importlib

    import verl

    hook, module, name = where
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    fn = inspect.unwrap(fn)
    signature, digest = PINNED_HOOKS[where]
    assert verl.__version__ == verl_0_9.VERL_VERSION
    review = f"{module}.{name} changed since verl {verl_0_9.VERL_VERSION}: review hook {hook} of docs/upstream.md"
    assert str(inspect.signature(fn)) == signature, review
    assert hashlib.sha256(inspect.getsource(fn).encode()).hexdigest() == digest, review


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
    model = build_tiny_checkpoint(
        root / "outputs" / "test-cache" / "tiny-qwen2.5-vl-224px", replace(SIZES["tiny"], max_pixels=50176)
    )
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
    model = build_tiny_checkpoint(
        root / "outputs" / "test-cache" / "tiny-qwen2.5-vl-224px", replace(SIZES["tiny"], max_pixels=50176)
    )
    sparse_evidence.generate(tmp_path / "task", seed=0, n_train=8, n_val=2)
    sft.main(
        [
            "--out",
            str(tmp_path / "sft.parquet"),
            "--max-pixels",
            "50176",
            "--inputs",
            str(tmp_path / "task" / "train.parquet"),
        ]
    )
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


@pytest.mark.parametrize(
    "mixin, base",
    [
        ("AgentLoopHooks", "verl.experimental.agent_loop.agent_loop:AgentLoopBase"),
        ("AgentLoopWorkerHooks", "verl.experimental.agent_loop.agent_loop:AgentLoopWorker"),
        ("AgentLoopManagerHooks", "verl.experimental.agent_loop.agent_loop:AgentLoopManager"),
        ("TrainerHooks", "verl.trainer.ppo.ray_trainer:RayPPOTrainer"),
        ("DatasetHooks", "verl.utils.dataset.rl_dataset:RLHFDataset"),
    ],
)
def test_hook_mixins_override_only_pinned_methods_and_shadow_nothing(mixin, base):
    """A mixin's private names are verl methods pinned above (an upgrade that renames one fails
    here, not as a silently unused override); its public names are new to verl's class (an
    upgrade that adds one of them would be shadowed)."""
    import importlib

    module, cls_name = base.split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    pinned = {(m, name) for _, m, name in PINNED_HOOKS}
    names = [n for n in vars(getattr(verl_0_9, mixin)) if n == "__init__" or not n.startswith("__")]
    private = [n for n in names if n.startswith("_")]
    public = [n for n in names if not n.startswith("_")]
    assert private, mixin
    for n in private:
        owner = next(k for k in cls.__mro__ if n in vars(k))
        assert (owner.__module__, f"{owner.__name__}.{n}") in pinned, f"{mixin}.{n} overrides an unpinned verl method"
    import re

    sources = "".join(inspect.getsource(k) for k in cls.__mro__ if k.__module__.startswith("verl."))
    for n in public:  # neither a class attribute nor an instance attribute verl sets
        assert not hasattr(cls, n), f"{mixin}.{n} shadows verl's {cls_name}.{n}"
        assert not re.search(rf"self\.{n}\s*=", sources), f"{mixin}.{n} shadows an attribute verl's {cls_name} sets"


def test_transformers_forward_the_actor_wraps_is_the_pinned_one():
    """T1: ``Qwen2_5_VLModel.forward`` as transformers 5.10.4's source defines it (read from the
    class's source file, so verl's or our runtime replacement does not hide an upgrade)."""
    import ast
    import textwrap

    import transformers
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    from vitos_verl.compat import transformers_5

    assert transformers.__version__ == transformers_5.TRANSFORMERS_VERSION
    src = textwrap.dedent(inspect.getsource(m.Qwen2_5_VLModel))
    fn = next(n for n in ast.parse(src).body[0].body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    digest = hashlib.sha256(ast.get_source_segment(src, fn).encode()).hexdigest()
    assert digest == "d764dce9b80680b76b5a868edf2b95ba4b7c7bd33504554ed7c6bfbb291c804c", (
        "Qwen2_5_VLModel.forward changed: review vitos_verl.compat.transformers_5 and rollout/actor_patch.py (row T1)"
    )
    assert {"pixel_values", "image_grid_thw", "position_ids", "mm_token_type_ids"} <= {a.arg for a in fn.args.args}


def test_torch_symbols_the_cpu_platform_replaces_are_the_pinned_ones():
    """P1 to P3: the torch 2.11.0 functions the CPU platform replaces or calls."""
    import torch
    import torch.distributed as dist

    from vitos_verl.compat import torch_2_11

    assert torch.__version__.split("+")[0] == torch_2_11.TORCH_VERSION
    assert callable(torch.Tensor.pin_memory)  # P1
    params = list(inspect.signature(inspect.unwrap(dist.init_process_group)).parameters)  # P2
    assert params[0] == "backend", f"init_process_group({params}): review vitos_verl.compat.torch_2_11 (row P2)"
    assert torch_2_11.cpu_reports_native_bf16() is not None, "torch.cpu's bf16 helpers are gone (row P3)"
