"""Pruned Qwen2.5-VL inputs for a transformers forward (actor, reference, checks).

The same cell maths as the vLLM plugin, from :mod:`vitos_verl.pruning`: a pruned prompt
keeps ``K`` of an image's ``rows * cols`` ``<|image_pad|>`` tokens, their embeddings are the
kept rows of the full-image vision-encoder output (raster order), and their M-RoPE
positions are the original ``(t, h, w)`` (:func:`vitos_verl.pruning.mrope_position_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitos_verl.pruning import MERGE_SIZE, kept_token_indices


def kept_rows(
    image_embeds: torch.Tensor, image_grid_thw: torch.Tensor, keep_masks: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """Rows of the merged vision-encoder output that the keep masks keep.

    Args:
        image_embeds: ``(sum_i N_i, D)`` float, the images' LLM visual tokens concatenated
            (``N_i = t * h * w / 4`` for ``image_grid_thw[i] = (t, h, w)``), as returned by
            Qwen2.5-VL's ``get_image_features``.
        image_grid_thw: ``(num_images, 3)`` long, patches.
        keep_masks: per image a bool ``(rows, cols)`` mask, or None to keep all.

    Returns:
        ``(sum_i K_i, D)``, same dtype/device as ``image_embeds``.

    Raises:
        ValueError: sizes that do not add up.
    """
    sizes = (image_grid_thw.prod(-1) // (MERGE_SIZE * MERGE_SIZE)).tolist()
    if sum(sizes) != image_embeds.shape[0]:
        raise ValueError(f"{image_embeds.shape[0]} embedding rows for grids totalling {sum(sizes)} tokens")
    if len(keep_masks) != len(sizes):
        raise ValueError(f"{len(keep_masks)} keep masks for {len(sizes)} images")
    parts = []
    for emb, mask in zip(image_embeds.split(sizes), keep_masks):
        parts.append(emb if mask is None else emb[kept_token_indices(mask).to(emb.device)])
    return torch.cat(parts) if parts else image_embeds[:0]


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
        if mask is not None:
            keep[s : s + n] = mask.flatten().repeat(grid[0]).to(keep.device)
    return input_ids[keep]


def split_keep_mask(flat: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Per-image ``(rows, cols)`` masks from the flat concatenation carried in ``multi_modal_inputs``.

    Args:
        flat: bool ``(sum_i rows_i * cols_i,)`` (``vitos_keep_mask``), images in prompt order.
        image_grid_thw: ``(num_images, 3)`` patches.

    Raises:
        ValueError: the mask length does not match the grids.
    """
    shapes = [(int(h) // MERGE_SIZE, int(w) // MERGE_SIZE) for _, h, w in image_grid_thw.tolist()]
    sizes = [r * c for r, c in shapes]
    if flat.numel() != sum(sizes):
        raise ValueError(f"vitos_keep_mask has {flat.numel()} cells, the images' grids have {sum(sizes)}")
    return [m.view(shape).bool() for m, shape in zip(flat.flatten().split(sizes), shapes)]


def pruned_inputs_embeds(
    model, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, keep_masks
) -> torch.Tensor:
    """``(B, L, D)`` input embeddings of pruned prompts for a transformers Qwen2.5-VL.

    Runs the vision encoder once on the full images, keeps the masked rows, and scatters them
    into the token embeddings at the ``<|image_pad|>`` positions of ``input_ids``
    (``(L,)`` or ``(B, L)``, already pruned; images in row-major order of the batch).

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration`` or its inner ``Qwen2_5_VLModel``.
        pixel_values: ``(sum_i t*h*w, C)`` float, the processor's patches of the full images.
        keep_masks: per image a bool ``(rows, cols)`` mask or None.

    Raises:
        ValueError: "Image features and image tokens do not match" when the number of
            ``<|image_pad|>`` tokens differs from the kept rows.
    """
    inner = model if hasattr(model, "visual") else model.model
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    out = inner.visual(pixel_values.type(inner.visual.dtype), grid_thw=image_grid_thw)
    feats = getattr(out, "pooler_output", out)
    rows = kept_rows(feats, image_grid_thw, keep_masks)
    embeds = inner.get_input_embeddings()(ids)
    where = ids == inner.config.image_token_id
    if int(where.sum()) != rows.shape[0]:
        raise ValueError(f"Image features and image tokens do not match: {int(where.sum())} tokens, {rows.shape[0]} rows")
    return embeds.masked_scatter(where.unsqueeze(-1).expand_as(embeds), rows.to(embeds.device, embeds.dtype))
