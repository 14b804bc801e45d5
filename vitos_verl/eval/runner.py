"""Evaluate a checkpoint on medical VQA benchmarks, two-pass and every baseline (docs/design.md section 8).

    python -m vitos_verl.eval model.path=outputs/runs/smoke_cpu/global_step_3 \
        --config-path $PWD/recipes --config-name eval_cpu

For each benchmark (converted once by its ``data_prep`` converter into verl parquet under
``<out_dir>/data/<benchmark>/``) and each method of :mod:`vitos_verl.eval.methods`, greedy
answers are generated with vLLM (this package's plugin prunes the visual tokens per request)
and appended, one JSON line per question, to
``<out_dir>/predictions/<model>/<benchmark>/<method>.jsonl``. A rerun skips the questions whose
line is there, so an interrupted evaluation resumes where it stopped. Each line carries the
prediction, the grounding output, the boxes (resized and original pixels, and as the model wrote
them: ``box_raw`` in ``box_format``), the keep mask,
token counts, the wall time attributed to the question and the verdicts under both scoring
protocols (:func:`vitos_verl.eval.protocols.judge_both`); :mod:`vitos_verl.eval.report` turns
the folder into the paper's tables, plots and an HTML page.

Timings are fair between methods: prefix caching and vLLM's multimodal processor cache are off
by default (``engine`` block) and every cache, this plugin's ViT cache included, is emptied
before each method, so no method reuses another's work. Within ``vitos`` the answering pass
reuses the grounding pass's vision features, as deployment would.

The grounding pass asks for the box as the trained recipe did: the ``vitos`` block's
``box_format`` (the coordinates of the prompt and of the parser) and ``w_acc`` (above 0 the
prompt asks for the answer after the box too); the grounding chat is rendered from each row's
record with them (:func:`vitos_verl.data.prompts.row_chat`).
"""

from __future__ import annotations

import io
import json
import logging
import random
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from vitos_verl.data.prompts import GroundingPrompt, row_chat, to_content_list
from vitos_verl.eval.methods import MATCHED, METHODS, TWO_PASS, center_mask, matched_count, random_mask, topk_mask
from vitos_verl.eval.protocols import CHOICE_DATASETS, DATASETS, judge_both
from vitos_verl.export import actor_dir, export, is_hf_dir
from vitos_verl.pruning import KEEP_KWARG, ImageGeometry, KeepMask, box_to_original, box_to_resized, grounding_budget
from vitos_verl.pruning.boxes import best_iou, union_box
from vitos_verl.pruning.plan import Frames, PlanConfig, plan, reasoning_input, resolve_frames

log = logging.getLogger("vitos_verl.eval")


class EvalError(ValueError):
    """A wrong evaluation config or input (the message names the key or file)."""


# --------------------------------------------------------------------------- benchmarks


def converter(benchmark: str):
    """The ``data_prep`` module of a benchmark (``main(argv)`` writes ``<out>/<split>.parquet``)."""
    import importlib

    if benchmark not in DATASETS:
        raise EvalError(f"benchmarks.{benchmark}: unknown benchmark; known: {list(DATASETS)}")
    try:
        return importlib.import_module(f"data_prep.{benchmark}")
    except ModuleNotFoundError as e:
        raise EvalError(f"benchmarks.{benchmark}: no converter data_prep/{benchmark}.py") from e


def prepare_benchmark(benchmark: str, spec: Mapping[str, Any], data_root: Path) -> tuple[Path, dict]:
    """The benchmark's parquet (converted once) and the converter's accounting of its split.

    Args:
        spec: ``{src, split, args}`` (release or Hugging Face layout under ``src``; extra converter
            arguments, e.g. ``[--lang, all]``) or ``{parquet: FILE}`` for a prepared file.
        data_root: ``<out_dir>/data``.

    Returns:
        The parquet path and ``{rows_in, rows_out, skipped, filtered, ...}`` of the split (from the
        converter's ``summary.json``; missing images are counted there, never a crash).

    Raises:
        EvalError: no ``src``/``parquet``, or a source the converter refuses (its message).
    """
    if spec.get("parquet"):
        path = Path(spec["parquet"])
        if not path.is_file():
            raise EvalError(f"benchmarks.{benchmark}.parquet: {path} does not exist")
        summary = path.parent / "summary.json"
        split = path.stem
        report = json.loads(summary.read_text())["splits"].get(split, {}) if summary.is_file() else {}
        return path, report
    if not spec.get("src"):
        raise EvalError(f"benchmarks.{benchmark}: give src (the release or HF layout) or parquet")
    split = str(spec.get("split", "test"))
    out = data_root / benchmark
    argv = ["--src", str(spec["src"]), "--out", str(out), "--splits", split, *[str(a) for a in spec.get("args") or []]]
    stamp = out / "vitos_eval_argv.json"
    if not ((out / f"{split}.parquet").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == argv):
        mod = converter(benchmark)
        try:
            mod.main(argv)
        except (ValueError, FileNotFoundError) as e:  # DataPrepError is a ValueError
            raise EvalError(f"benchmarks.{benchmark}: {e}") from e
        stamp.write_text(json.dumps(argv) + "\n")
    summary = json.loads((out / "summary.json").read_text())
    return out / f"{split}.parquet", summary["splits"][split]


def row_uid(row: Mapping[str, Any]) -> str:
    """A question's id within its benchmark: the release's record id, else the row index."""
    e = row["extra_info"]
    return str(e.get("record_id") or f"row{e['index']}")


def medevalkit_choices(
    dataset: str, options: Sequence[Mapping[str, str]], raw: Sequence[str] | None = None
) -> list[str] | None:
    """The option list MedEvalKit's judge sees for a multiple-choice row (None for VQA datasets).

    ``raw``: the converter's ``extra_info.choices`` (the strings MedEvalKit builds, as read from
    the release), used as they are when present; otherwise rebuilt from ``options``:
    ``"A. text"`` for OmniMedVQA and MedXpertQA, PMC-VQA's raw ``"A:text"`` strings, the bare
    option texts for MMMU (see :func:`vitos_verl.eval.protocols.judge`).
    """
    if dataset not in CHOICE_DATASETS or not options:
        return None
    if raw:
        return list(raw)
    if dataset == "mmmu_med":
        return [o["content"] for o in options]
    if dataset == "pmc_vqa":
        return [f"{o['letter']}:{o['content']}" for o in options]
    return [f"{o['letter']}. {o['content']}" for o in options]


# --------------------------------------------------------------------------- predictions files


def read_done(paths: Sequence[Path]) -> dict[str, dict]:
    """``{uid: record}`` of the prediction lines in ``paths`` (unreadable lines are skipped and
    logged: their questions are evaluated again)."""
    done: dict[str, dict] = {}
    for path in paths:
        if not path.is_file():
            continue
        bad = 0
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[str(rec["uid"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1
        if bad:
            log.warning("%s: %d unreadable line(s); those questions are evaluated again", path, bad)
    return done


def open_for_append(path: Path):
    """Open a JSONL file for appending, first cutting a torn last line (a crash mid-write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(path, "r+b") as f:
                f.truncate(cut)
            log.warning("%s: cut a torn last line (%d bytes)", path, len(data) - cut)
    return open(path, "a", encoding="utf-8")


# --------------------------------------------------------------------------- the evaluator


def checkpoint_tag(path: Path) -> str:
    """A model's name in tables: ``<run>-step<N>`` for a verl checkpoint (``.../<run>/[ckpt/]global_step_N[/actor]``),
    else the folder's name.

    >>> checkpoint_tag(Path("outputs/runs/smoke_cpu/ckpt/global_step_3/actor")), checkpoint_tag(Path("models/Lingshu-7B"))
    ('smoke_cpu-step3', 'Lingshu-7B')
    """
    p = path.parent if path.name == "actor" else path
    if p.name.startswith("global_step_"):
        run = p.parent.parent if p.parent.name in ("ckpt", "checkpoints") else p.parent
        return f"{run.name}-step{p.name.removeprefix('global_step_')}"
    return p.name


class Refused:
    """Stands in for the ``RequestOutput`` of a request vLLM refused (``error`` says why)."""

    def __init__(self, error: str):
        self.error = error
        self.prompt_token_ids: list[int] = []
        self.outputs = [type("Empty", (), {"text": "", "token_ids": []})()]


def _mask_fields(mask: KeepMask, always: bool = False) -> dict[str, Any]:
    """A record's mask fields: ``keep_mask`` (:meth:`KeepMask.encode`, None when every cell is kept
    unless ``always``), ``keep_ratio``, ``kept_tokens``, ``pruned``."""
    return {"keep_mask": mask.encode() if (always or not mask.keeps_all) else None, "keep_ratio": mask.ratio,
            "kept_tokens": mask.num_kept, "pruned": not mask.keeps_all}


@dataclass
class Item:
    """One question as the methods see it.

    Attributes:
        frames: the grounding and answering passes' frames of its (first) image, resolved once
            (:func:`vitos_verl.pruning.plan.resolve_frames`).
    """

    row: dict
    uid: str
    images: list[Image.Image]
    frames: Frames

    @property
    def geom(self) -> ImageGeometry:
        """The answering pass's frame (the processor's budget): masks are over its cells."""
        return self.frames.reasoning

    @property
    def extra(self) -> dict:
        return self.row["extra_info"]

    @property
    def single_image(self) -> bool:
        return len(self.images) == 1


class Evaluator:
    """Runs the configured methods on the configured benchmarks (see ``vitos_verl/eval/conf/eval.yaml``).

    Raises:
        EvalError: unknown method or benchmark, ``keep_ratio: match`` without ``vitos``, a model
            path that is neither an HF directory nor a verl checkpoint, a ``vitos.grounding_max_pixels``
            outside the processor's budget.
    """

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        methods = list(cfg.methods)
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise EvalError(f"methods: unknown {unknown}; known: {list(METHODS)}")
        needs_vitos = [m for m in methods if m == "crop" or (m in MATCHED and cfg.keep_ratio == "match")]
        if needs_vitos and "vitos" not in methods:
            raise EvalError(f"methods {needs_vitos} use the vitos method's boxes (keep_ratio: match / crop): add vitos")
        self.methods = [m for m in METHODS if m in methods]  # vitos before the methods matched to it
        self.out = Path(cfg.out_dir)
        self.model_dir = self._model_dir()
        self.tag = str(cfg.model.tag or self._auto_tag)
        g = cfg.vitos.get("grounding_max_pixels")
        if g is not None:  # low-resolution grounding: its predictions never mix with the paper method's
            self.tag += f"-ground{int(g)}px"
        from transformers import AutoProcessor

        from vitos_verl.data.dataset import processor_pixel_budget

        self.processor = AutoProcessor.from_pretrained(str(self.model_dir))
        self.min_pixels, self.max_pixels = processor_pixel_budget(self.processor)
        self.grounding_max_pixels = None if g is None else int(g)
        try:
            grounding_budget(self.min_pixels, self.max_pixels, self.grounding_max_pixels)
        except ValueError as e:
            raise EvalError(f"vitos.grounding_max_pixels: {e}") from e
        try:  # the grounding prompt of the trained recipe (module doc)
            self.grounding_prompt = GroundingPrompt.of(cfg.vitos.get("box_format"), cfg.vitos.get("w_acc"))
        except ValueError as e:
            raise EvalError(f"vitos.box_format: {e}") from e
        self._llm = None
        self._fastv = None
        self._vitos_ref: dict[str, dict] = {}

    # ---------------------------------------------------------------- set-up

    def _model_dir(self) -> Path:
        path = Path(str(self.cfg.model.path))
        if is_hf_dir(path):
            self._auto_tag = path.name
            return path
        actor = actor_dir(path)
        self._auto_tag = checkpoint_tag(actor if actor is not None else path)
        try:
            return export(path, self.out / "models" / self._auto_tag)
        except Exception as e:
            raise EvalError(f"model.path={path}: {e}") from e

    @property
    def llm(self):
        """The vLLM engine with this package's pruning model, built on first use and warmed up by
        one request on a blank image (not timed, not recorded)."""
        if self._llm is None:
            from vllm import LLM

            from vitos_verl.rollout.vllm_plugin import hf_overrides

            kwargs = {k: v for k, v in OmegaConf.to_container(self.cfg.engine, resolve=True).items() if v is not None}
            self._llm = LLM(
                model=str(self.model_dir),
                hf_overrides=hf_overrides(),
                limit_mm_per_prompt={"image": int(self.cfg.max_images)},
                **kwargs,
            )
            from vllm import SamplingParams

            blank = Image.new("RGB", (224, 224))
            warm = {"prompt": self._text([{"role": "user", "content": "<image>warm-up"}]), "multi_modal_data": {"image": blank}}
            self._llm.generate([warm], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
        return self._llm

    def _reset_caches(self) -> None:
        """Empty vLLM's prefix, multimodal and encoder caches (and so the plugin's ViT cache)."""
        if self._llm is None:
            return
        self._llm.reset_prefix_cache()
        self._llm.reset_mm_cache()
        self._llm.llm_engine.engine_core.reset_encoder_cache()

    # ---------------------------------------------------------------- items and requests

    def _item(self, row: dict) -> Item:
        images = [Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in row["images"]]
        frames = resolve_frames(row["extra_info"]["image_size"], self.min_pixels, self.max_pixels, self.grounding_max_pixels)
        return Item(row, row_uid(row), images, frames)

    def _text(self, messages) -> str:
        return self.processor.apply_chat_template(to_content_list(messages), add_generation_prompt=True, tokenize=False)

    def _request(self, item: Item, stream: str, image: Image.Image | None = None, keep: str = "") -> dict:
        chat = row_chat(item.row, "grounding", self.grounding_prompt) if stream == "grounding" else item.row["reasoning_prompt"]
        images = [image] if image is not None else item.images
        req: dict[str, Any] = {"prompt": self._text(chat), "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}
        if keep:
            req["mm_processor_kwargs"] = {KEEP_KWARG: keep}
        return req

    def _generate(self, requests: list[dict], max_tokens: int) -> tuple[list[Any], float]:
        """Greedy outputs of ``requests`` (vLLM ``RequestOutput``), and the wall seconds.

        A request vLLM refuses (e.g. a prompt longer than ``max_model_len``) gets a
        :class:`Refused` in its place instead of failing the batch: the others are generated one
        by one, and the refused question is recorded with its ``error`` (wrong under both protocols).
        """
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=int(max_tokens), seed=int(self.cfg.seed))
        llm = self.llm  # built (and warmed up) outside the timed region
        t0 = time.perf_counter()
        try:
            outs = llm.generate(requests, params, use_tqdm=False)
        except ValueError:
            outs = []
            for req in requests:
                try:
                    outs.extend(llm.generate([req], params, use_tqdm=False))
                except ValueError as e:
                    log.warning("vLLM refused a request: %s", e)
                    outs.append(Refused(str(e)))
        return outs, time.perf_counter() - t0

    # ---------------------------------------------------------------- methods

    def _keep(self, method: str, item: Item, vitos: Mapping[str, dict]) -> tuple[dict, dict]:
        """The answering request's pruning for one question, and the record fields it implies."""
        geom = item.geom
        rows, cols = geom.cell_grid
        fields: dict[str, Any] = {}
        if method == "full" or not item.single_image:
            return {}, {"keep_mask": None, "keep_ratio": 1.0, "kept_tokens": geom.num_tokens, "pruned": False}
        if method == "crop":
            ref = vitos[item.uid]
            box = ref["box_resized"]
            ri = reasoning_input("crop", item.images[0], geom, box, **self._box_rule())
            fields = {"box_format": ref.get("box_format"), "box_raw": ref.get("box_raw"),
                      "box_resized": box, "box_original": ref["box_original"], "iou": ref["iou"],
                      "grounding_output": ref["grounding_output"], "grounding_prompt_tokens": ref["grounding_prompt_tokens"],
                      # the grounding pass crop shares with vitos: its output tokens and batch too
                      "grounding_output_tokens": ref.get("grounding_output_tokens", 0), "grounding_batch": ref.get("grounding_batch", 0)}
            return {"image": ri.image}, {**fields, **_mask_fields(ri.keep_mask, always=True)}
        if method == "oracle":
            gt = [box_to_resized(b, geom) for b in item.extra.get("gt_boxes") or []]
            if not gt:
                return {}, {"keep_mask": None, "keep_ratio": 1.0, "kept_tokens": geom.num_tokens, "pruned": False,
                            "note": "no_gt_box"}
            mask = reasoning_input("tokens", item.images[0], geom, union_box(gt), **self._box_rule()).keep_mask
        else:
            k = matched_count(rows * cols, self.cfg.keep_ratio, (vitos.get(item.uid) or {}).get("kept_tokens"))
            if method == "random":
                mask = KeepMask(random_mask((rows, cols), k, item.uid, int(self.cfg.seed)))
            elif method == "center":
                mask = KeepMask(center_mask((rows, cols), k))
            else:  # fastv
                scores, seconds = self.fastv.scores(self._text(item.row["reasoning_prompt"]), item.images[0])
                mask = KeepMask(topk_mask(scores, k))
                fields["score_time_s"] = seconds
        return ({"keep": mask.request_value()} if not mask.keeps_all else {}), {**fields, **_mask_fields(mask)}

    def _box_rule(self) -> dict:
        v = self.cfg.vitos
        return {"margin_cells": int(v.margin_cells), "min_keep_ratio": float(v.min_keep_ratio), "unparsed_box": str(v.unparsed_box)}

    def _plan_config(self) -> PlanConfig:
        """The trained recipe's box rule (``vitos`` block), token pruning: the ``vitos`` method."""
        return PlanConfig(prune_mode="tokens", box_format=str(self.cfg.vitos.box_format), **self._box_rule())

    @property
    def fastv(self):
        if self._fastv is None:
            from vitos_verl.eval.fastv import FastVScorer

            device = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                self._fastv = FastVScorer(str(self.model_dir), int(self.cfg.fastv.layer), str(self.cfg.fastv.dtype), device)
            except ValueError as e:
                raise EvalError(str(e)) from e
        return self._fastv

    def _ground(self, items: list[Item]) -> list[dict]:
        """The grounding pass of ``vitos``: each question's box, keep mask and pass statistics.

        Under low-resolution grounding the request carries the image resized to its grounding
        frame (so vLLM's processor leaves it as is), and the box is mapped onto the answering
        pass's frame (:func:`vitos_verl.pruning.map_box`); ``box_resized`` is recorded in that frame.
        ``box_raw`` is the box as the model wrote it (``box_format`` coordinates of the grounding
        frame's resized image, clipped to it; the union of its boxes), ``box_format`` the format.
        """
        single = [it for it in items if it.single_image]
        lowres = self.grounding_max_pixels is not None
        images = [it.images[0].resize(it.frames.grounding.resized_size, Image.BICUBIC) if lowres else None for it in single]
        requests = [self._request(it, "grounding", im) for it, im in zip(single, images)]
        outs, seconds = self._generate(requests, self.cfg.generation.grounding_max_tokens)
        by_uid = {}
        rule = self._plan_config()
        for it, out in zip(single, outs):
            text = out.outputs[0].text
            geom = it.geom
            p = plan(text, it.frames, rule)
            box = p.box_reasoning
            gt = [box_to_resized(b, geom) for b in it.extra.get("gt_boxes") or []]
            by_uid[it.uid] = {
                **({"error": f"grounding: {out.error}"} if isinstance(out, Refused) else {}),
                "grounding_output": text,
                "box_format": rule.box_format,
                "box_raw": p.box_raw,
                "box_resized": box,
                "box_original": None if box is None else [float(x) for x in box_to_original(box, geom)],
                "iou": best_iou(box, gt, str(self.cfg.vitos.iou_mode)) if (box is not None and gt) else None,
                "keep": p.vitos_keep,
                **_mask_fields(p.keep_mask),
                "grounding_prompt_tokens": len(out.prompt_token_ids),
                "grounding_output_tokens": len(out.outputs[0].token_ids),
                "grounding_time_s": seconds / max(len(single), 1),
                "grounding_batch": len(single),
            }
        return [by_uid.get(it.uid) for it in items]

    def _batch(self, benchmark: str, method: str, items: list[Item], vitos: Mapping[str, dict]) -> list[dict]:
        plans = []
        if method == "vitos":
            for it, g in zip(items, self._ground(items)):
                if g is None:  # several images: answered unpruned
                    plans.append(({}, {"keep_mask": None, "keep_ratio": 1.0, "kept_tokens": it.geom.num_tokens, "pruned": False}))
                else:
                    keep = g.pop("keep")
                    plans.append(({"keep": keep} if keep else {}, g))
        else:
            plans = [self._keep(method, it, vitos) for it in items]
        requests = [self._request(it, "reasoning", p.get("image"), p.get("keep", "")) for it, (p, _) in zip(items, plans)]
        outs, seconds = self._generate(requests, self.cfg.generation.answer_max_tokens)
        share = seconds / max(len(items), 1)
        for _, f in plans:
            f["answer_batch"] = len(items)
        return [self._record(benchmark, method, it, f, out, share) for it, (_, f), out in zip(items, plans, outs)]

    def _record(self, benchmark: str, method: str, it: Item, fields: dict, out, share: float) -> dict:
        e = it.extra
        prediction = out.outputs[0].text
        choices = medevalkit_choices(benchmark, e.get("options") or [], e.get("choices"))
        rng = random.Random(zlib.crc32(f"{self.cfg.seed}:{it.uid}".encode()))
        answer = it.row["reward_model"]["ground_truth"]
        grounding_time = float(fields.pop("grounding_time_s", 0.0))
        if method == "crop":
            grounding_time = float(self._vitos_ref.get(it.uid, {}).get("grounding_time_s", 0.0))
        rec = {
            "model": self.tag, "benchmark": benchmark, "method": method, "uid": it.uid, "index": int(e["index"]),
            "question": e["question"], "answer": answer, "answer_type": e["answer_type"], "choices": choices,
            "lang": e.get("lang", ""), "image_path": it.row["images"][0]["path"], "image_size": list(it.geom.orig_size),
            "num_images": len(it.images), "prediction": prediction, "grounding_output": None, "box_format": None, "box_raw": None, "box_resized": None,
            "box_original": None, "gt_boxes": [list(b) for b in e.get("gt_boxes") or []], "iou": None,
            "visual_tokens": it.geom.num_tokens, "grounding_prompt_tokens": 0, "grounding_output_tokens": 0,
            "grounding_batch": 0,
            **fields,
            "answer_output_tokens": len(out.outputs[0].token_ids),
            "prompt_tokens": len(out.prompt_token_ids),
            "output_tokens": len(out.outputs[0].token_ids) + int(fields.get("grounding_output_tokens", 0)),
            "answer_time_s": share, "grounding_time_s": grounding_time, "time_s": share + grounding_time,
            "correct": judge_both(benchmark, prediction, answer, e["answer_type"], choices=choices, rng=rng),
            "error": fields.get("error"),
        }
        if isinstance(out, Refused):
            rec["error"] = f"{rec['error']}; answer: {out.error}" if rec["error"] else f"answer: {out.error}"
            rec["correct"] = {k: False for k in rec["correct"]}
        return rec

    # ---------------------------------------------------------------- driver

    def _shard(self, rows: list[dict]) -> list[dict]:
        n, i = int(self.cfg.shard.count), int(self.cfg.shard.index)
        if n < 1 or not 0 <= i < n:
            raise EvalError(f"shard.index={i}, shard.count={n}: need 0 <= index < count")
        return [r for k, r in enumerate(rows) if k % n == i]

    def _file(self, benchmark: str, method: str) -> Path:
        n, i = int(self.cfg.shard.count), int(self.cfg.shard.index)
        name = f"{method}.jsonl" if n == 1 else f"{method}.shard{i}of{n}.jsonl"
        return self.out / "predictions" / self.tag / benchmark / name

    def rows(self, benchmark: str, spec: Mapping[str, Any]) -> list[dict]:
        """The benchmark's rows this shard evaluates (``limit`` first rows), its ``load_report.json`` written."""
        parquet, report = prepare_benchmark(benchmark, spec, self.out / "data")
        rows = pq.read_table(parquet).to_pylist()
        if self.cfg.limit:
            rows = rows[: int(self.cfg.limit)]
        bad = [r["data_source"] for r in rows if r["data_source"] != benchmark]
        if bad:
            raise EvalError(f"benchmarks.{benchmark}: {parquet} holds data_source {bad[0]!r} rows")
        dest = self.out / "predictions" / self.tag / benchmark / "load_report.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps({"parquet": str(parquet), "evaluated": len(rows), **report}, indent=2, default=str) + "\n")
        skipped = sum((report.get("skipped") or {}).values())
        if skipped:
            log.warning("%s: %d source rows skipped by the converter (%s): see %s", benchmark, skipped, report.get("skipped"), dest)
        return self._shard(rows)

    def run_method(self, benchmark: str, method: str, rows: list[dict]) -> int:
        """Evaluate ``method`` on the rows not yet in its predictions file; returns how many were new."""
        path = self._file(benchmark, method)
        done = read_done([path])
        todo = [r for r in rows if row_uid(r) not in done]
        self._vitos_ref = read_done(sorted(path.parent.glob("vitos*.jsonl"))) if method != "vitos" else {}
        if method in TWO_PASS[1:] or (method in MATCHED and self.cfg.keep_ratio == "match"):
            missing = [row_uid(r) for r in todo if row_uid(r) not in self._vitos_ref]
            if missing:
                raise EvalError(f"{benchmark}/{method}: no vitos prediction for {len(missing)} question(s), e.g. {missing[:3]}")
        if not todo:
            return 0
        self._reset_caches()
        bs = int(self.cfg.batch_size)
        with open_for_append(path) as f, tqdm(total=len(todo), desc=f"{self.tag} {benchmark}/{method}", unit="q") as bar:
            for start in range(0, len(todo), bs):
                items = [self._item(r) for r in todo[start : start + bs]]
                for rec in self._batch(benchmark, method, items, self._vitos_ref):
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(items))
        if method == "fastv" and self._fastv is not None:
            self._fastv = None
        return len(todo)

    def run(self) -> dict[str, dict[str, int]]:
        """Every benchmark x method; returns ``{benchmark: {method: questions newly evaluated}}``."""
        counts: dict[str, dict[str, int]] = {}
        for benchmark, spec in self.cfg.benchmarks.items():
            if spec is None:
                continue
            rows = self.rows(str(benchmark), spec)
            counts[str(benchmark)] = {m: self.run_method(str(benchmark), m, rows) for m in self.methods}
        return counts

