"""Overrides of upstream code, one module per pinned upstream (``verl_0_9``: verl 0.9.1).

Each hook names the version it was written against and has a signature test
(``tests/test_compat.py``: the signature and a hash of the upstream function's source), so an
upgrade fails on the hook that needs a look, not somewhere downstream.
"""
