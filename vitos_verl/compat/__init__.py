"""Overrides of upstream code, one module per pinned upstream (``verl_0_9``: verl 0.9.1;
``vllm_0_24``: vLLM 0.24.0).

Each hook names the version it was written against and has a signature test
(``tests/test_compat.py`` for verl, ``tests/test_compat_vllm.py`` for vLLM: the signature and a
hash of the upstream function's source), so an upgrade fails on the hook that needs a look, not
somewhere downstream.
"""
