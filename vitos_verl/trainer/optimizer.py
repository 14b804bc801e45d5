"""AdamW with the token embedding at its own learning rate, through verl's optimizer extension point.

verl 0.9.1 builds the actor's optimizer as ``getattr(import_module(optim.optimizer_impl),
optim.optimizer)(module.parameters(), lr=..., weight_decay=..., betas=...,
**optim.override_optimizer_config)`` (``verl/workers/config/optimizer.py::build_optimizer``), so a
recipe selects this class with::

    actor_rollout_ref.actor.optim.optimizer_impl: vitos_verl.trainer.optimizer
    actor_rollout_ref.actor.optim.optimizer: AdamW
    actor_rollout_ref.actor.optim.override_optimizer_config: {embedding_lr_scale: 0.0}

Why (docs/learning.md section 3): in a small policy the token embedding, tied to the LM head in
Qwen2.5-VL's small sizes, is most of the parameters (151,669 x 128 of the 10M ``learn`` policy).
Adam normalises each coordinate's step, so the rows of tokens the task never samples, whose
gradient is only the softmax's small ``p_v h``, move as far per step as the rows that matter, all
in the direction of the batch's advantage-weighted mass: after 30 GRPO steps they had moved 9e-4
per coordinate against 1.1e-3 for the task's rows, and the updates that broke the output format
filled it with unrelated vocabulary. A smaller rate (0 freezes them) keeps those rows where the
warm start left them while the transformer learns.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

EMBEDDING_MIN_ROWS = 32768
"""A 2-D parameter with at least this many rows is taken for the token embedding (or an untied LM
head): every Qwen2.5-VL vocabulary has 151,665+ rows, no other weight of the model has 32,768."""


def split_embedding(params: Iterable[torch.nn.Parameter], min_rows: int = EMBEDDING_MIN_ROWS):
    """Split ``params`` into (token embedding and LM head, the rest), by shape.

    Args:
        params: the module's parameters (FSDP2 DTensors report the global shape).
        min_rows: a 2-D parameter with ``shape[0] >= min_rows`` is an embedding.

    Returns:
        ``(embedding, rest)``: two lists of parameters, in ``params``' order.
    """
    embedding, rest = [], []
    for p in params:
        (embedding if p.ndim == 2 and p.shape[0] >= min_rows else rest).append(p)
    return embedding, rest


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (torch 2.11) with two parameter groups: the rest of the model at
    ``lr`` (the first group, whose rate verl logs and schedules, ``transformer_impl.py:841``) and
    the token embedding / LM head at ``lr * embedding_lr_scale``. verl's LR schedulers are
    ``LambdaLR``s, which scale each group's own initial rate, so the ratio holds through warm-up
    and decay; checkpoints save both groups as ``torch.optim`` does.

    Args:
        params: the parameters verl passes (``module.parameters()``).
        lr: the learning rate of the rest of the model (``optim.lr``).
        embedding_lr_scale: the embedding's rate as a fraction of ``lr``; 0 freezes it (its
            gradient still counts in the clipped norm). 1.0 is plain AdamW.
        embedding_min_rows: see :func:`split_embedding`.
        **kwargs: ``torch.optim.AdamW``'s (``betas``, ``weight_decay``, ``eps``, ...).

    Raises:
        ValueError: ``embedding_lr_scale`` is negative, or is not 1.0 and no parameter has the
            embedding's shape (e.g. FSDP1 flat parameters without ``use_orig_params``).
    """

    def __init__(self, params, lr: float = 1e-3, *, embedding_lr_scale: float = 1.0,
                 embedding_min_rows: int = EMBEDDING_MIN_ROWS, **kwargs):  # fmt: skip
        if embedding_lr_scale < 0:
            raise ValueError(f"embedding_lr_scale must be >= 0, got {embedding_lr_scale}")
        embedding, rest = split_embedding(params, embedding_min_rows)
        if embedding_lr_scale != 1.0 and not embedding:
            raise ValueError(
                f"embedding_lr_scale={embedding_lr_scale} but no 2-D parameter has >= {embedding_min_rows} rows: "
                "flattened FSDP1 parameters hide the shapes (use strategy fsdp2 or use_orig_params=true)"
            )
        groups = [{"params": rest, "name": "model"}]
        if embedding:
            groups.append({"params": embedding, "lr": lr * embedding_lr_scale, "name": "embedding"})
        super().__init__(groups, lr=lr, **kwargs)
        self.embedding_lr_scale = embedding_lr_scale
