"""Rollouts you can look at: per-stream JSONL of every training step and validation, and a table
of validation samples through verl's tracking.

verl 0.9.1 does this in ``verl/trainer/ppo/ray_trainer.py`` (``RayPPOTrainer._log_rollout_data``,
``_dump_generations`` / ``_write_generations``: one ``<dir>/<step>.jsonl`` per step with
``input``, ``output``, ``gts``, ``score``, ``step`` and the reward's extra keys, written with
``json.dumps(ensure_ascii=False, default=str)``; ``_maybe_log_val_generations``: N validation
samples, the same ones every time, to ``verl.utils.tracking.ValidationGenerationsLogger``). The
ViToS trainer replaces ``fit()`` and ``_validate()``, which call them, so this module does the
same per stream, keeping verl's field names and adding what the two streams need:

* ``trainer.rollout_data_dir``: ``<dir>/<step>_grounding.jsonl`` and ``<dir>/<step>_reasoning.jsonl``
  after each training step (a resumed run rewrites the steps after its checkpoint);
* ``trainer.validation_data_dir``: ``<dir>/val_<step>_grounding.jsonl`` and
  ``val_<step>_reasoning.jsonl`` for each validation (step 0: before training);
* ``trainer.log_val_generations = N > 0``: a table of N validation samples per validation
  (:func:`log_generations`).

Each folder also gets ``data_files.json`` (``{"train_files": [...], "val_files": [...]}``, the
parquet files of ``data.*``): the JSONL carries no image bytes, and
``python -m vitos_verl.eval.overlay --rollouts FILE`` finds each line's image there by
``(data_source, split, record_id)``.

One JSON object per sample, keys :data:`FIELDS`:

* ``step``, ``stream`` (``grounding`` | ``reasoning``);
* ``data_source``, ``split``, ``record_id``, ``index`` (the row's ``extra_info``; ``index`` is the
  row in its split's parquet), ``uid`` (the question's GRPO group in this step), ``box_index``
  (the grounding sample, numbered within the step, whose box this sample is or answered from);
* ``image``: the image's path as the parquet stores it (relative to the dataset's image folder);
* ``question``, ``input`` (the decoded prompt, special tokens such as the image pads dropped, as
  verl decodes it), ``output`` (the decoded response), ``gts`` (the ground-truth answer);
* the reward dict as the trainer computed it, not recomputed (:data:`vitos_verl.rewards.score.SCORE_KEYS`:
  ``score``, ``acc``, ``format``, ``iou``, ``keep_ratio``, ``feedback``, ``recall``, ``f1``,
  ``has_gt_box``, ``parsed``, ``answer_acc``; for grounding, ``acc`` = ``feedback`` = the
  cross-feedback, the mean accuracy of the answers made from its box, and ``answer_acc`` the
  accuracy of its own answer (``vitos.w_acc``); in validation the grounding stream is scored by
  verl's reward loop, without feedback);
* ``advantage``: the sample's GRPO advantage (mean over its response tokens; null in validation);
* ``failed`` (0/1) and ``error``: a rollout or reward that failed (:mod:`vitos_verl.trainer.faults`);
* ``box``: the parsed box (the union of the output's boxes) ``[x1, y1, x2, y2]`` in **resized**
  pixels of the grounding frame (the image the model saw), ``box_original`` the same in
  **original** pixels (:attr:`vitos_verl.pruning.plan.Plan.box_grounding` and ``box_original``),
  whatever format the model wrote; ``box_format`` (``vitos.box_format``: ``abs``, ``norm1``,
  ``norm1000``) and ``box_raw``, the same box in the model's own coordinates (clipped to the
  image; :attr:`~vitos_verl.pruning.plan.Plan.box_raw`); null where the output held no box on
  the image; a reasoning sample has its grounding sample's box;
* ``gt_boxes`` (original pixels, from the data) and ``gt_boxes_resized`` (resized pixels);
* ``image_size`` (original ``[W, H]``), ``resized_size`` (``[W, H]``), ``grid_thw`` (the
  processor's ``[t, h, w]`` in 14-pixel patches; cells are 2x2 patches);
* ``keep_mask``: :meth:`vitos_verl.pruning.KeepMask.encode` text (``"<rows>x<cols>:<hex>"``) of
  the cells the box's reasoning samples see, from the reasoning plan
  (:attr:`vitos_verl.pruning.plan.Plan.keep_mask`); on both streams' lines, every cell when
  unpruned. For reasoning lines ``keep_ratio`` is its fraction of the cells. The mask is over the
  reasoning frame's cells: the grid of ``grid_thw`` (the grounding frame, that of ``box``) unless
  low-resolution grounding is on (``vitos.grounding_max_pixels``), when ``R x C`` of the text
  are the full-budget grid (:func:`vitos_verl.pruning.map_box` maps ``box`` onto it).

Writing never stops training: an exception while building or writing a file is logged and
counted, and the counts are logged as ``dump/errors`` (and ``dump/rows`` written) with each
step's metrics. Files are written synchronously (verl uses a thread); a step's lines are small.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from vitos_verl.compat import verl_0_9
from vitos_verl.data.parquet_rows import open_image
from vitos_verl.pruning import KeepMask, box_to_original, box_to_resized, geometry_from_grid
from vitos_verl.pruning.boxes import from_box_format
from vitos_verl.pruning.draw import draw_rollout
from vitos_verl.records import DATA_FILES, ERROR_KEY, FAILED_KEY, STREAMS
from vitos_verl.rewards.score import SCORE_KEYS
from vitos_verl.trainer.dual_stream import sample_grids

logger = logging.getLogger(__name__)

#: Keys of every JSONL line (module doc).
FIELDS = (
    "step", "stream", "data_source", "split", "record_id", "index", "uid", "box_index", "image", "question",
    "input", "output", "gts", *SCORE_KEYS, "advantage", "failed", "error", "box", "box_original", "box_format", "box_raw", "gt_boxes",
    "gt_boxes_resized", "image_size", "resized_size", "grid_thw", "keep_mask",
)  # fmt: skip
#: Text columns of the validation table (:func:`log_generations`); image backends add ``image``.
TABLE_COLUMNS = (
    "step", "data_source", "record_id", "question", "gts", "grounding", "box", "iou", "keep_ratio", "reasoning",
    "acc", "format", "score",
)  # fmt: skip
TABLE_KEY = "val/generations"
#: Longest side in pixels of a logged overlay image.
TABLE_IMAGE_PX = 512


def dump_file(directory: str | Path, step: int, stream: str, validation: bool = False) -> Path:
    """``<dir>/<step>_<stream>.jsonl`` (training) or ``<dir>/val_<step>_<stream>.jsonl`` (validation)."""
    return Path(directory) / f"{'val_' if validation else ''}{step}_{stream}.jsonl"


def image_part(messages: Sequence[Mapping[str, Any]] | None) -> Mapping[str, Any] | None:
    """The first image part of a chat built by verl's dataset (``{"type": "image", "bytes", "path", "image"}``)."""
    for m in messages if messages is not None else ():
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "image":
                    return part
    return None


def _float(v: Any) -> float:
    return float(np.asarray(v, dtype=np.float64))


def stream_rows(
    streams: Mapping[str, Any], plan: Any, tokenizer: Any, step: int, min_pixels: int, max_pixels: int
) -> tuple[dict[str, list[dict[str, Any]]], dict[int, Mapping[str, Any]]]:
    """The JSONL lines of one step's (or one validation batch's) two streams.

    Args:
        streams: ``{"grounding": g, "reasoning": r}``, verl ``DataProto`` batches as the trainer
            holds them (any sample order: each sample's ``box_index`` column names its
            grounding sample; the reward keys already set; ``advantages`` where computed).
        plan: the step's :class:`~vitos_verl.trainer.dual_stream.ReasoningPlan` (its ``plans``,
            :class:`vitos_verl.pruning.plan.Plan`, indexed by ``box_index``: the box in the
            grounding frame and in original pixels, the keep mask).
        tokenizer: decodes ``prompts`` and ``responses``.
        min_pixels, max_pixels: the pixel budget (the grid of a sample without image inputs).

    Returns:
        ``({stream: [line, ...]}, {box_index: image part of the grounding chat})``; lines follow
        the batch order and have the keys of :data:`FIELDS`.

    Raises:
        KeyError, IndexError, ValueError: a batch not laid out as the trainer's (the caller
            catches and counts them).
    """
    g = streams["grounding"]
    g_bi = np.asarray(g.non_tensor_batch.get("box_index", np.arange(len(g))), dtype=np.int64)
    g_info = g.non_tensor_batch["extra_info"]
    g_grids = sample_grids(g.non_tensor_batch["multi_modal_inputs"], [e["image_size"] for e in g_info], min_pixels, max_pixels)
    grid_of = {int(bi): grid for bi, grid in zip(g_bi, g_grids)}
    chats = g.non_tensor_batch.get("raw_prompt")
    parts = {int(bi): image_part(chat) for bi, chat in zip(g_bi, chats if chats is not None else [None] * len(g))}
    out: dict[str, list[dict[str, Any]]] = {}
    for stream in STREAMS:
        b = streams[stream]
        nt = b.non_tensor_batch
        n = len(b)
        bis = g_bi if stream == "grounding" else np.asarray(nt["box_index"], dtype=np.int64)
        mask = b.batch["response_mask"].bool()
        inputs = tokenizer.batch_decode(b.batch["prompts"], skip_special_tokens=True)
        outputs = tokenizer.batch_decode([ids[m] for ids, m in zip(b.batch["responses"], mask)], skip_special_tokens=True)
        if "advantages" in b.batch.keys():
            adv = ((b.batch["advantages"] * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
        else:
            adv = [None] * n
        rows = []
        for i in range(n):
            bi = int(bis[i])
            info = dict(nt["extra_info"][i] or {})
            size = [int(v) for v in info["image_size"]]
            grid = [int(v) for v in grid_of[bi]]
            geom = geometry_from_grid(grid, orig_size=tuple(size))
            p = plan.plans[bi]  # the box and mask as the planner made them (vitos_verl.pruning.plan)
            gt = [[float(v) for v in b_] for b_ in (info.get("gt_boxes") or []) if len(b_) == 4]
            part = parts.get(bi) or {}
            rm = nt["reward_model"][i] or {}
            row = {
                "step": int(step),
                "stream": stream,
                "data_source": str(nt["data_source"][i]),
                "split": info.get("split"),
                "record_id": info.get("record_id"),
                "index": info.get("index"),
                "uid": str(nt["uid"][i]) if "uid" in nt else None,
                "box_index": bi,
                "image": part.get("path"),
                "question": info.get("question"),
                "input": inputs[i],
                "output": outputs[i],
                "gts": rm.get("ground_truth"),
                **{k: _float(nt[k][i]) for k in SCORE_KEYS},
                "advantage": adv[i],
                "failed": int(nt[FAILED_KEY][i]) if FAILED_KEY in nt else 0,
                "error": str(nt[ERROR_KEY][i] or "") if ERROR_KEY in nt else "",
                "box": p.box_grounding,
                "box_original": p.box_original,
                "box_format": p.box_format,
                "box_raw": p.box_raw,
                "gt_boxes": gt,
                "gt_boxes_resized": [box_to_resized(b_, geom) for b_ in gt],
                "image_size": size,
                "resized_size": list(geom.resized_size),
                "grid_thw": grid,
                "keep_mask": p.keep_mask.encode(),
            }
            rows.append(row)
        out[stream] = rows
    return out, parts


def _table_row(r: Mapping[str, Any], g: Mapping[str, Any] | None) -> dict[str, Any]:
    g = g or {}
    return {
        "step": r["step"], "data_source": r["data_source"], "record_id": r["record_id"], "question": r["question"],
        "gts": r["gts"], "grounding": g.get("output"), "box": r["box"], "iou": g.get("iou"), "keep_ratio": r["keep_ratio"],
        "reasoning": r["output"], "acc": r["acc"], "format": r["format"], "score": r["score"],
    }  # fmt: skip


def _overlay(part: Mapping[str, Any] | None, row: Mapping[str, Any]) -> Image.Image | None:
    image = open_image(part)
    if image is None:
        return None
    return ImageOps.contain(draw_rollout(image, row), (TABLE_IMAGE_PX, TABLE_IMAGE_PX))


def log_generations(
    tracker: Any, step: int, samples: Sequence[tuple[dict[str, Any], Mapping[str, Any] | None, Mapping[str, Any]]], verl_logger: Any = None
) -> int:
    """A table of validation samples to each backend of verl's ``Tracking`` (``tracker.logger``).

    Args:
        tracker: verl 0.9.1's ``verl.utils.tracking.Tracking`` (its ``logger`` dict maps each
            configured backend to its module or adapter; a backend that is not installed is not
            there, since ``Tracking`` imports them at start).
        samples: ``(table row, image part, reasoning line)``: the :data:`TABLE_COLUMNS` of one
            sample, its chat's image part and its JSONL line (for the overlay:
            :func:`vitos_verl.pruning.draw.draw_rollout`, the box and the kept cells).
        verl_logger: verl's ``ValidationGenerationsLogger`` for the backends handled here by
            verl (swanlab, mlflow, clearml, trackio), given ``(question, answer, score)``.

    Backends: ``wandb`` / ``vemlp_wandb``: a ``wandb.Table`` under ``val/generations`` with an
    ``image`` column (``wandb.Image`` of the overlay); ``tensorboard``: the text table
    (``add_text``) and one ``add_image`` per sample; ``console``: the text columns, printed;
    ``file``: the text columns, one JSON line per sample, appended to ``val_generations.jsonl``
    beside the metrics file (the metrics file itself stays numeric for its readers).

    Returns:
        How many backends failed (each failure is logged; none raises).
    """
    loggers = verl_0_9.tracking_backends(tracker)
    rows = [s[0] for s in samples]
    overlays: list[Image.Image | None] | None = None
    errors = 0
    for name, backend in loggers.items():
        try:
            if name in ("wandb", "vemlp_wandb", "tensorboard") and overlays is None:
                overlays = [_overlay(part, line) for _, part, line in samples]
            if name in ("wandb", "vemlp_wandb"):
                table = backend.Table(columns=[*TABLE_COLUMNS, "image"])
                for row, img in zip(rows, overlays):
                    table.add_data(*[_cell(row[c]) for c in TABLE_COLUMNS], backend.Image(img) if img is not None else None)
                backend.log({TABLE_KEY: table}, step=step)
            elif name == "tensorboard":
                writer = verl_0_9.tensorboard_writer(backend)
                writer.add_text(TABLE_KEY, _markdown(rows), step)
                for k, (row, img) in enumerate(zip(rows, overlays)):
                    if img is not None:
                        writer.add_image(f"{TABLE_KEY}/{k}_{row['record_id']}", np.asarray(img.convert("RGB")), step, dataformats="HWC")
                writer.flush()
            elif name == "console":
                print(_console(rows, step), flush=True)
            elif name == "file":
                path = Path(verl_0_9.file_logger_path(backend)).with_name("val_generations.jsonl")
                with open(path, "a") as f:
                    for row in rows:
                        f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            elif verl_logger is not None:
                verl_logger.log([name], [(str(r["question"]), str(r["reasoning"]), r["score"]) for r in rows], step)
        except Exception as exc:  # a logging backend must not stop training
            errors += 1
            logger.warning("validation generations: backend %s failed at step %s: %s: %s", name, step, type(exc).__name__, exc)
    return errors


def _cell(v: Any) -> Any:
    return v if isinstance(v, (int, float, str)) or v is None else json.dumps(v)


def _markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    def esc(v: Any) -> str:
        return str(_cell(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(esc(r[c]) for c in TABLE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def _console(rows: Sequence[Mapping[str, Any]], step: int, width: int = 200) -> str:
    out = [f"validation generations at step {step} ({len(rows)} samples):"]
    for k, r in enumerate(rows):
        out.append(f"  [{k}] " + "  ".join(f"{c}={str(_cell(r[c])).replace(chr(10), ' ')[:width]}" for c in TABLE_COLUMNS if c != "step"))
    return "\n".join(out)


def _files(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(Path(value).absolute())]
    return [str(Path(v).absolute()) for v in value]


class GenerationDumps:
    """What the trainer writes per training step and per validation (module doc).

    Args:
        rollout_dir, validation_dir: ``trainer.rollout_data_dir`` / ``trainer.validation_data_dir``
            (None or "": off).
        n_table: ``trainer.log_val_generations`` (0: no table).
        data_files: ``{"train_files": [...], "val_files": [...]}`` (written as ``data_files.json``).
        tokenizer, min_pixels, max_pixels: as :func:`stream_rows` takes them.
        verl_logger: verl's ``ValidationGenerationsLogger`` (:func:`log_generations`).

    Attributes:
        errors: files, batches or table backends that failed so far.
        rows: lines written so far.
    """

    def __init__(self, rollout_dir, validation_dir, n_table, data_files, tokenizer, min_pixels, max_pixels, verl_logger=None):
        self.rollout_dir = str(rollout_dir) if rollout_dir else None
        self.validation_dir = str(validation_dir) if validation_dir else None
        self.n_table = max(int(n_table or 0), 0)
        self.data_files = {k: _files(v) for k, v in dict(data_files).items()}
        self.tokenizer, self.min_pixels, self.max_pixels = tokenizer, int(min_pixels), int(max_pixels)
        self.verl_logger = verl_logger
        self.errors = 0
        self.rows = 0
        self._val_rows: dict[str, list[dict]] = {s: [] for s in STREAMS}
        self._table: list[tuple[str, dict, Mapping | None, dict]] = []
        self._sidecars: set[str] = set()

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any, min_pixels: int, max_pixels: int, verl_logger: Any = None) -> GenerationDumps:
        """From the composed trainer config (``trainer.*`` and ``data.train_files`` / ``val_files``)."""
        t = config.trainer
        files = {"train_files": config.data.get("train_files"), "val_files": config.data.get("val_files")}
        return cls(t.get("rollout_data_dir"), t.get("validation_data_dir"), t.get("log_val_generations", 0), files, tokenizer,
                   min_pixels, max_pixels, verl_logger)  # fmt: skip

    @property
    def enabled(self) -> bool:
        return bool(self.rollout_dir or self.validation_dir or self.n_table)

    def metrics(self) -> dict[str, float]:
        """``dump/rows`` and ``dump/errors`` so far (empty when nothing is dumped)."""
        return {"dump/rows": float(self.rows), "dump/errors": float(self.errors)} if self.enabled else {}

    def _write(self, path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if str(path.parent) not in self._sidecars:
                (path.parent / DATA_FILES).write_text(json.dumps(self.data_files, indent=1) + "\n")
                self._sidecars.add(str(path.parent))
            with open(path, "w") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            self.rows += len(rows)
        except Exception as exc:
            self.errors += 1
            logger.warning("rollout dump: could not write %s: %s: %s (training goes on)", path, type(exc).__name__, exc)

    def _rows(self, streams, plan, step):
        try:
            return stream_rows(streams, plan, self.tokenizer, step, self.min_pixels, self.max_pixels)
        except Exception as exc:
            self.errors += 1
            logger.warning("rollout dump: step %s not dumped: %s: %s (training goes on)", step, type(exc).__name__, exc, exc_info=exc)
            return None, None

    def training_step(self, step: int, streams: Mapping[str, Any], plan: Any) -> None:
        """Write ``<rollout_dir>/<step>_<stream>.jsonl`` for both streams (no-op when off)."""
        if not self.rollout_dir:
            return
        rows, _ = self._rows(streams, plan, step)
        for stream in STREAMS if rows else ():
            self._write(dump_file(self.rollout_dir, step, stream), rows[stream])

    def validation_batch(self, step: int, streams: Mapping[str, Any], plan: Any) -> None:
        """Keep one validation batch's lines (and table candidates) until :meth:`validation_end`."""
        if not (self.validation_dir or self.n_table):
            return
        rows, parts = self._rows(streams, plan, step)
        if not rows:
            return
        if self.validation_dir:
            for s in STREAMS:
                self._val_rows[s].extend(rows[s])
        if self.n_table:
            # the same samples at every validation (verl: a fixed-seed shuffle): smallest hash of the row's id
            g_of = {r["box_index"]: r for r in rows["grounding"]}
            for r in rows["reasoning"]:
                key = hashlib.sha1(f"{r['data_source']}/{r['split']}/{r['record_id']}/{r['box_index']}".encode()).hexdigest()
                self._table.append((key, _table_row(r, g_of.get(r["box_index"])), parts.get(r["box_index"]), r))
            self._table = sorted(self._table, key=lambda t: t[0])[: self.n_table]

    def validation_end(self, step: int, tracker: Any = None) -> dict[str, float]:
        """Write the validation's JSONL and log its table; returns ``val/dump_errors`` (this validation's)."""
        before = self.errors
        if self.validation_dir:
            for s in STREAMS:
                self._write(dump_file(self.validation_dir, step, s, validation=True), self._val_rows[s])
        if self.n_table and self._table and tracker is not None:
            self.errors += log_generations(tracker, step, [(row, part, line) for _, row, part, line in self._table], self.verl_logger)
        self._val_rows = {s: [] for s in STREAMS}
        self._table = []
        return {"val/dump_errors": float(self.errors - before)} if self.enabled else {}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a dump file (for tests and tools)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def check_row(row: Mapping[str, Any]) -> None:
    """Consistency of one line: all :data:`FIELDS`, ``box_original`` = ``box`` mapped to original
    pixels, ``box_raw`` = ``box`` in ``box_format``, a mask over the image's cell grid, and unless the sample failed: for grounding lines
    ``parsed`` = a box is there, for reasoning lines ``keep_ratio`` = the mask's fraction of cells.

    Raises:
        AssertionError: the first inconsistency.
    """
    missing = [k for k in FIELDS if k not in row]
    assert not missing, f"missing keys {missing}"
    geom = geometry_from_grid(row["grid_thw"], orig_size=tuple(row["image_size"]))
    assert list(geom.resized_size) == row["resized_size"], (geom.resized_size, row["resized_size"])
    mask = KeepMask.decode(row["keep_mask"])
    if geom.cell_grid != mask.cell_grid:  # low-resolution grounding: the mask is on the larger reasoning grid
        assert all(m >= g for m, g in zip(mask.cell_grid, geom.cell_grid)), (mask.cell_grid, geom.cell_grid)
    if row["box"] is None:
        assert row["box_original"] is None and row["box_raw"] is None
    else:
        assert np.allclose(box_to_original(row["box"], geom), row["box_original"], atol=1e-6)
        assert np.allclose(from_box_format(row["box_raw"], row["box_format"], geom.resized_size), row["box"], atol=1e-6)
    if row["failed"]:
        return
    if row["stream"] == "grounding":
        assert bool(row["parsed"]) == (row["box"] is not None), (row["parsed"], row["box"])
    else:
        assert abs(mask.ratio - row["keep_ratio"]) < 1e-6, (row["keep_ratio"], mask.ratio)


__all__ = [
    "FIELDS",
    "TABLE_COLUMNS",
    "GenerationDumps",
    "check_row",
    "dump_file",
    "log_generations",
    "read_jsonl",
    "stream_rows",
]
