"""Pruned Qwen2.5-VL inputs for a transformers forward (actor, reference, checks).

The same cell maths as the vLLM plugin, from :mod:`vitos_verl.pruning`: a pruned prompt
keeps ``K`` of an image's ``rows * cols`` ``<|image_pad|>`` tokens, their embeddings are the
kept rows of the full-image vision-encoder output (raster order), and their M-RoPE
positions are the original ``(t, h, w)`` (:func:`vitos_verl.pruning.mrope_position_ids`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from vitos_verl.pruning import MERGE_SIZE

DEDUP_ENV = "VITOS_ACTOR_VIT_DEDUP"


def prune_input_ids(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor, keep_masks: Sequence[torch.Tensor | None], image_token_id: int
) -> torch.Tensor:
    """Drop the unkept ``<|image_pad|>`` tokens of a full-image prompt.

    Args:
        input_ids: ``(L,)`` long, one prompt with every image fully expanded.

    Returns:
        ``(L - sum_i (N_i - K_i),)`` long.
    """
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    runs = (input_ids == image_token_id).nonzero().squeeze(1).tolist()
    # group consecutive indices into one run per image
    starts = [i for k, i in enumerate(runs) if k == 0 or runs[k - 1] != i - 1]
    if len(starts) != len(keep_masks):
        raise ValueError(f"{len(starts)} image-token runs but {len(keep_masks)} keep masks")
    for s, grid, mask in zip(starts, image_grid_thw.tolist(), keep_masks):
        n = grid[0] * (grid[1] // MERGE_SIZE) * (grid[2] // MERGE_SIZE)
        mask = getattr(mask, "cells", mask)  # a KeepMask or its bool grid
        if mask is not None:
            keep[s : s + n] = mask.flatten().repeat(grid[0]).to(keep.device)
    return input_ids[keep]


def vit_dedup_enabled() -> bool:
    """Whether :func:`pruned_inputs_embeds` shares one ViT pass between copies of an image.

    On unless the environment sets ``VITOS_ACTOR_VIT_DEDUP=0`` (the per-sample path, kept for
    benchmarks and checks: bench/actor_forward.py).
    """
    return os.environ.get(DEDUP_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def distinct_images(pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> list[int]:
    """For each image, the index of the first image of the batch with the same grid and pixels.

    Exact equality (``torch.equal`` on the tensors' device, no hashing), compared only within
    images of one grid; an image is first compared with the latest distinct image of its grid
    (the samples of one question are usually adjacent), then, if different, with the other
    distinct images of its grid at once: at most two host syncs per image.

    Args:
        pixel_values: ``(sum_i t_i * h_i * w_i, C)`` the processor's patches, images concatenated.
        grids: per image ``(t, h, w)``, ints.

    Returns:
        ``owner``: ``owner[i] == i`` for the first occurrence, else the index of that occurrence.

    Raises:
        ValueError: the grids do not add up to the rows of ``pixel_values``.
    """
    sizes = [t * h * w for t, h, w in grids]
    if sum(sizes) != pixel_values.shape[0]:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patch rows, the images' grids have {sum(sizes)}")
    images = pixel_values.split(sizes)
    reps: dict[tuple[int, int, int], list[int]] = {}
    owner: list[int] = []
    for i, grid in enumerate(grids):
        seen = reps.setdefault(tuple(grid), [])
        match = None
        if seen and torch.equal(images[i], images[seen[-1]]):
            match = seen[-1]
        elif len(seen) > 1:
            hits = torch.stack([(images[i] == images[r]).all() for r in seen[:-1]]).tolist()
            match = next((r for r, hit in zip(seen[:-1], hits) if hit), None)
        if match is None:
            seen.append(i)
            owner.append(i)
        else:
            owner.append(match)
    return owner


def _flat_keep(keep_masks, grids: list[tuple[int, int, int]], device) -> torch.Tensor | None:
    """Bool ``(sum_i t_i * rows_i * cols_i,)`` over the images' LLM visual tokens, or None (keep all).

    ``keep_masks`` is the flat ``vitos_keep_mask`` (one ``rows * cols`` block per image) or a
    sequence of per-image ``(rows, cols)`` masks / None. A mask applies to every frame (``t``).
    """
    shapes = [(h // MERGE_SIZE, w // MERGE_SIZE) for _, h, w in grids]
    if isinstance(keep_masks, torch.Tensor):
        flat = keep_masks.flatten().to(device=device, dtype=torch.bool)
        if flat.numel() != sum(r * c for r, c in shapes):
            raise ValueError(
                f"vitos_keep_mask has {flat.numel()} cells, the images' grids have {sum(r * c for r, c in shapes)}"
            )
        if all(t == 1 for t, _, _ in grids):
            return flat
        keep_masks = [m.view(shape) for m, shape in zip(flat.split([r * c for r, c in shapes]), shapes)]
    if len(keep_masks) != len(grids):
        raise ValueError(f"{len(keep_masks)} keep masks for {len(grids)} images")
    if all(m is None for m in keep_masks):
        return None
    parts = []
    for (t, _, _), (r, c), mask in zip(grids, shapes, keep_masks):
        mask = getattr(mask, "cells", mask)  # a KeepMask or its bool grid
        if mask is None:
            parts.append(torch.ones(t * r * c, dtype=torch.bool, device=device))
            continue
        if mask.numel() != r * c:
            raise ValueError(f"keep mask of shape {tuple(mask.shape)} for an image of {r}x{c} cells")
        parts.append(mask.flatten().to(device=device, dtype=torch.bool).repeat(t))
    return torch.cat(parts)


def pruned_inputs_embeds(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    keep_masks,
    *,
    dedup: bool | None = None,
) -> torch.Tensor:
    """``(B, L, D)`` input embeddings of pruned prompts for a transformers Qwen2.5-VL.

    What it replaces: ``Qwen2_5_VLModel.forward``'s image branch in transformers 5.10
    (``get_image_features`` = ``visual(pixel_values, grid_thw)`` split per image, then
    ``inputs_embeds.masked_scatter`` at the ``<|image_pad|>`` positions) and verl 0.9.1's
    ``qwen2_vl._get_input_embeds`` (the same maths). verl's FSDP engine
    (``prepare_model_inputs``) concatenates a micro-batch's ``multi_modal_inputs``
    (``pixel_values``, ``image_grid_thw``, ``vitos_keep_mask``) in sample order, and with
    remove-padding packs the micro-batch into one ``(1, total)`` sequence, so every image of
    every sample arrives here and the samples of one question repeat the same image.

    Steps: (1) find the distinct images (same grid and bit-identical patch rows,
    :func:`distinct_images`; disabled by ``dedup=False`` or ``VITOS_ACTOR_VIT_DEDUP=0``, which
    runs the vision encoder on every copy, the former per-sample path); (2) run the vision
    encoder once on the distinct full images; (3) gather each image's kept rows from the
    shared output with one ``index_select`` (raster order; its backward sums the gradients of
    all samples into the one ViT pass); (4) scatter them into the token embeddings at the
    ``<|image_pad|>`` positions of ``input_ids`` (already pruned; images in row-major order
    of the batch). Outputs equal the per-sample path's (tests/test_actor_vit_dedup.py).

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration`` or its inner ``Qwen2_5_VLModel``.
        input_ids: ``(L,)`` or ``(B, L)`` long (``(1, total)`` when verl packs).
        pixel_values: ``(sum_i t*h*w, C)`` float (``C = 3 * 2 * 14 * 14``), the processor's
            patches of the full images; cast to the vision tower's dtype.
        image_grid_thw: ``(num_images, 3)`` long, patches per image.
        keep_masks: the flat bool ``vitos_keep_mask`` (``(sum_i rows_i * cols_i,)``), or per
            image a ``KeepMask``, a bool ``(rows, cols)`` mask or None (keep all).
        dedup: share one ViT pass between identical images; None reads
            :func:`vit_dedup_enabled`.

    Returns:
        ``(B, L, D)`` in the token embeddings' dtype and device.

    Raises:
        ValueError: "Image features and image tokens do not match" when the number of
            ``<|image_pad|>`` tokens differs from the kept rows; masks or pixel rows that do
            not match the grids.
    """
    inner = model if hasattr(model, "visual") else model.model
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    grids = [(int(t), int(h), int(w)) for t, h, w in image_grid_thw.tolist()]
    cells = [t * (h // MERGE_SIZE) * (w // MERGE_SIZE) for t, h, w in grids]
    keep = _flat_keep(keep_masks, grids, pixel_values.device)
    dedup = vit_dedup_enabled() if dedup is None else dedup
    owner = distinct_images(pixel_values, grids) if dedup and len(grids) > 1 else list(range(len(grids)))
    firsts = [i for i, o in enumerate(owner) if o == i]
    if len(firsts) < len(grids):
        images = pixel_values.split([t * h * w for t, h, w in grids])
        pixel_values = torch.cat([images[i] for i in firsts])
        image_grid_thw = image_grid_thw[torch.tensor(firsts, device=image_grid_thw.device)]
    out = inner.visual(pixel_values.type(inner.visual.dtype), grid_thw=image_grid_thw)
    feats = getattr(out, "pooler_output", out)  # (sum over distinct images of t*h*w/4, D)
    base, offset = {}, 0
    for i in firsts:
        base[i], offset = offset, offset + cells[i]
    if feats.shape[0] != offset:
        raise ValueError(f"{feats.shape[0]} embedding rows for grids totalling {offset} tokens")
    # source row in `feats` of every visual token of every image (None: the identity)
    src = None
    if len(firsts) < len(grids):
        src = torch.cat([torch.arange(base[o], base[o] + n) for o, n in zip(owner, cells)]).to(feats.device)

    embeds = inner.get_input_embeddings()(ids)
    where = ids == inner.config.image_token_id
    if keep is None:
        n_tokens, n_rows = int(where.sum()), sum(cells)
    else:
        n_tokens, n_rows = torch.stack([where.sum(), keep.sum().to(where.device)]).tolist()
    if n_tokens != n_rows:
        raise ValueError(f"Image features and image tokens do not match: {n_tokens} tokens, {n_rows} rows")
    if keep is not None and n_rows < keep.numel():
        keep = keep.to(feats.device)
        src = keep.nonzero().squeeze(1) if src is None else src[keep]
    rows = feats if src is None else feats.index_select(0, src)
    return embeds.masked_scatter(where.unsqueeze(-1).expand_as(embeds), rows.to(embeds.device, embeds.dtype))
