"""vLLM-CPU keeps Linear weights in place under verl's CPU platform (verl's weight sync writes them)."""

from __future__ import annotations

import torch


def test_keep_cpu_linear_weights(monkeypatch):
    from vllm.model_executor.layers import utils

    monkeypatch.setattr(utils, "dispatch_cpu_unquantized_gemm", utils.dispatch_cpu_unquantized_gemm)  # restored after
    from vitos_verl.rollout.vllm_plugin import keep_cpu_linear_weights

    keep_cpu_linear_weights()
    keep_cpu_linear_weights()  # idempotent
    layer = torch.nn.Linear(64, 32)
    utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    assert layer.weight.shape == (32, 64)  # vLLM's default would leave torch.Size([0])
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64))  # what a weight sync does
        out = utils.cpu_unquantized_gemm(layer, x, layer.weight, layer.bias)
    assert torch.allclose(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
