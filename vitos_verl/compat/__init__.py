"""Overrides of upstream code, one module per pinned upstream: ``verl_0_9`` (verl 0.9.1),
``vllm_0_24`` (vLLM 0.24.0), ``transformers_5`` (transformers 5.10.4), ``torch_2_11`` (torch 2.11.0).

Each hook names the version it was written against and is pinned by a test
(``tests/test_compat.py`` for verl, transformers and torch, ``tests/test_compat_vllm.py`` for vLLM:
the signature and a hash of the upstream function's source), so an upgrade fails on the hook that
needs a look, not somewhere downstream. The list, with what each hook is for and what upstream API
would remove it: docs/upstream.md. This package imports nothing else of ``vitos_verl`` (the bottom
layer, ``tests/test_layers.py``).
"""
