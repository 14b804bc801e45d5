"""verl dataset extension: one pixel budget for data, vLLM and the actor.

verl's ``RLHFDataset`` hands image parts to ``qwen_vl_utils.fetch_image``, which resizes with
its own budget (4 to 16,384 cells) before the processor resizes again with the model's
(``size.shortest_edge`` / ``size.longest_edge``). The two-stage result differs from the
processor's own grid for about 1 image size in 5 at a 200k-pixel budget, and then boxes,
keep masks and rewards would be computed on another grid than the model saw. This class
puts the budget in every image part, so ``fetch_image`` resizes once, to exactly
``vitos_verl.pruning.smart_resize(W, H, min_pixels, max_pixels)``, and the processor and
vLLM leave the size alone.

Config (``data.*``): ``min_pixels`` / ``max_pixels`` (default: the processor's);
``grounding_max_pixels`` (default None: ``max_pixels``; low-resolution grounding,
docs/design.md section 1e: the grounding chat's image parts get this smaller budget, the reasoning chat's keep
``max_pixels``); ``reasoning_prompt_key`` (default ``reasoning_prompt``): the column of the reasoning stream's
chat, returned as ``raw_reasoning_prompt`` next to verl's ``raw_prompt`` (the grounding chat)
when the row has it, so one row feeds both streams of the dual-stream trainer.

The grounding chat is rendered again from the row's record with the run's grounding variables
(:func:`vitos_verl.data.prompts.row_chat`): ``data.box_format`` (the coordinates the prompt asks
the box in; default ``abs``) and ``data.w_acc`` (above 0 the prompt asks for the answer too;
default 0). ``vitos_trainer.yaml`` sets both from the ``vitos`` block
(``${vitos.box_format}``, ``${vitos.w_acc}``), the one place a run sets them, and
:func:`vitos_verl.trainer.checks.check_grounding_prompt` refuses a config whose two copies differ.
"""

from __future__ import annotations

from verl.utils.dataset.rl_dataset import RLHFDataset

from vitos_verl.compat import verl_0_9
from vitos_verl.data.prompts import GroundingPrompt, row_chat
from vitos_verl.pruning import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, grounding_budget


def processor_pixel_budget(processor) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` the processor resizes to (transformers 5: ``size`` edges)."""
    ip = getattr(processor, "image_processor", None)
    size = getattr(ip, "size", None) or {}
    lo = size.get("shortest_edge") or getattr(ip, "min_pixels", None) or DEFAULT_MIN_PIXELS
    hi = size.get("longest_edge") or getattr(ip, "max_pixels", None) or DEFAULT_MAX_PIXELS
    return int(lo), int(hi)


class ViToSDataset(verl_0_9.DatasetHooks, RLHFDataset):
    """``RLHFDataset`` whose image parts carry the model's pixel budget (see module doc)."""

    def __init__(self, data_files, tokenizer, config, processor=None, max_samples: int = -1):
        lo, hi = processor_pixel_budget(processor) if processor is not None else (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
        self.min_pixels = int(config.get("min_pixels") or lo)
        self.max_pixels = int(config.get("max_pixels") or hi)
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        g = config.get("grounding_max_pixels")
        # the grounding chat's budget: (min_pixels, max_pixels) unless low-resolution grounding is on
        self.grounding_min_pixels, self.grounding_max_pixels = grounding_budget(
            self.min_pixels, self.max_pixels, None if g is None else int(g)
        )
        self.reasoning_prompt_key = str(config.get("reasoning_prompt_key") or "reasoning_prompt")
        # the grounding template's run variables (module doc); ValueError for an unknown box format
        self.grounding_prompt = GroundingPrompt.of(config.get("box_format"), config.get("w_acc"))
        super().__init__(data_files, tokenizer, config, processor, max_samples)

    def __getitem__(self, item):
        out = super().__getitem__(item)
        out.pop(self.reasoning_prompt_key, None)
        return out

    def build_messages(self, example: dict, key: str):
        """verl's chat, rendered from the record for the grounding stream, with the pixel budget in every image part."""
        grounding = key == self.prompt_key != self.reasoning_prompt_key
        if grounding:  # the run's grounding prompt, from the row's record (module doc)
            example[key] = row_chat(example, "grounding", self.grounding_prompt)
        messages = super().build_messages(example, key)
        lo, hi = self.min_pixels, self.max_pixels
        if grounding:
            lo, hi = self.grounding_min_pixels, self.grounding_max_pixels
        for m in messages:
            if isinstance(m.get("content"), list):
                for part in m["content"]:
                    if part.get("type") == "image":
                        part.setdefault("min_pixels", lo)
                        part.setdefault("max_pixels", hi)
        # the reasoning chat rides along with verl's raw_prompt, from the same row
        if key == self.prompt_key != self.reasoning_prompt_key and example.get(self.reasoning_prompt_key) is not None:
            example["raw_reasoning_prompt"] = self.build_messages(example, self.reasoning_prompt_key)
        return messages
