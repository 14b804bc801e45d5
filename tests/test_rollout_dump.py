"""Rollouts you can look at: the trainer's per-stream JSONL of a training step
and a validation, the validation table through verl's tracking, and the overlay grid of a dump.

The batches are shaped as the trainer holds them after the advantage stage: real SLAKE rows read
through verl's dataset, prompts tokenised with the tiny checkpoint's processor, verl's agent-loop
layout, reward dicts from the reward functions, and the samples reordered (as verl's
``balance_batch`` does) so that the dump must follow ``box_index``, not the position.
"""

from __future__ import annotations

import asyncio
import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from verl import DataProto

from vitos_verl.eval.overlay import CAPTION_PX
from vitos_verl.eval.overlay import main as overlay_main
from vitos_verl.pruning import KeepMask, box_to_resized, image_geometry
from vitos_verl.records import DATA_FILES, ERROR_KEY, FAILED_KEY
from vitos_verl.rewards.score import SCORE_KEYS, compute_score
from vitos_verl.trainer.config import ViToSConfig
from vitos_verl.trainer.dual_stream import grounding_rewards, plan_reasoning, with_stream
from vitos_verl.trainer.rollout_dump import FIELDS, TABLE_COLUMNS, GenerationDumps, check_row, dump_file, read_jsonl

MIN_PIXELS, MAX_PIXELS = 3136, 28 * 28 * 64
B, N_G, N_R = 3, 2, 2
P_LEN, R_LEN = 400, 48


@pytest.fixture(scope="module")
def ds(slake_dataset):
    return slake_dataset(MAX_PIXELS)


def _objects(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _prompt_ids(ds, processor, chat) -> torch.Tensor:
    images, _ = asyncio.run(ds.process_vision_info(chat, ds.image_patch_size, ds.config))
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=images, return_tensors="pt")["input_ids"][0]


def _batch(prompts, responses, pad, advantages, non_tensors) -> DataProto:
    """verl's agent-loop layout (left-padded prompts, right-padded responses) plus advantages."""
    n = len(prompts)
    p_ids, r_ids = torch.full((n, P_LEN), pad), torch.full((n, R_LEN), pad)
    p_mask, r_mask = torch.zeros(n, P_LEN, dtype=torch.int64), torch.zeros(n, R_LEN, dtype=torch.int64)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        p_ids[i, P_LEN - len(p):], p_mask[i, P_LEN - len(p):] = p, 1
        r_ids[i, : len(r)], r_mask[i, : len(r)] = r, 1
    adv = torch.tensor(advantages, dtype=torch.float32)[:, None] * r_mask  # GRPO: one value per response
    tensors = {"prompts": p_ids, "responses": r_ids, "input_ids": torch.cat([p_ids, r_ids], -1),
               "attention_mask": torch.cat([p_mask, r_mask], -1), "response_mask": r_mask, "advantages": adv}
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


@pytest.fixture(scope="module")
def step(ds, tiny_processor):
    """One step's two streams: B questions with boxes, N_G outputs each (the resized gt box, then
    no box), N_R answers per box (right, then wrong), reordered; and the reasoning plan."""
    tok = tiny_processor.tokenizer
    rows = [r for r in (ds[i] for i in range(0, 400, 7)) if r["extra_info"]["gt_boxes"]][:B]
    cfg = ViToSConfig(n_g=N_G, n_r=N_R, margin_cells=1)
    idx = np.repeat(np.arange(B), N_G)
    geoms = [image_geometry(*rows[q]["extra_info"]["image_size"], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) for q in idx]
    texts = []
    for k, q in enumerate(idx):
        box = box_to_resized(rows[q]["extra_info"]["gt_boxes"][0], geoms[k])
        texts.append(f"<box>[{box[0]:.1f}, {box[1]:.1f}, {box[2]:.1f}, {box[3]:.1f}]</box>" if k % N_G == 0 else "I cannot see it")
    infos = [{**rows[q]["extra_info"], "resized_size": list(g.resized_size)} for q, g in zip(idx, geoms)]
    plan = plan_reasoning(texts, [list(g.grid_thw) for g in geoms], [i["image_size"] for i in infos],
                          [rows[q]["raw_reasoning_prompt"] for q in idx], cfg)
    # reasoning answers and their real reward dicts
    r_idx = idx[plan.box_index]
    gts = [rows[q]["reward_model"]["ground_truth"] for q in r_idx]
    r_texts = [f"<think>look</think><answer>{gt if j % 2 == 0 else 'zzz'}</answer>" for j, gt in enumerate(gts)]
    r_info = [{**infos[b], "stream": "reasoning", "keep_ratio": float(k)} for b, k in zip(plan.box_index, plan.keep_ratio)]
    r_scores = [compute_score("slake", t, gt, e) for t, gt, e in zip(r_texts, gts, r_info)]
    kw = cfg.reward_kwargs(MIN_PIXELS, MAX_PIXELS)
    g_scores = grounding_rewards(["slake"] * len(idx), texts, [rows[q]["reward_model"]["ground_truth"] for q in idx], infos,
                                 [s["acc"] for s in r_scores], plan.box_index, kw)
    prompt_g = {q: _prompt_ids(ds, tiny_processor, rows[q]["raw_prompt"]) for q in range(B)}
    prompt_r = {q: _prompt_ids(ds, tiny_processor, rows[q]["raw_reasoning_prompt"]) for q in range(B)}

    def common(qs, info, stream):
        n = len(qs)
        return {
            "uid": _objects([f"q{q}" for q in qs]), "data_source": _objects(["slake"] * n),
            "reward_model": _objects([rows[q]["reward_model"] for q in qs]), "extra_info": with_stream(info, stream),
            "multi_modal_inputs": _objects([{"image_grid_thw": torch.tensor([list(geoms[N_G * q].grid_thw)])} for q in qs]),
            FAILED_KEY: _objects([0] * n), ERROR_KEY: _objects([""] * n),
        }

    g_nt = {**common(idx, infos, "grounding"), "raw_prompt": _objects([rows[q]["raw_prompt"] for q in idx]),
            "box_index": np.arange(len(idx)), **{k: g_scores[k] for k in SCORE_KEYS}}
    g_adv = [0.5 + k for k in range(len(idx))]
    g = _batch([prompt_g[q] for q in idx], [torch.tensor(tok(t)["input_ids"]) for t in texts], tok.pad_token_id, g_adv, g_nt)
    r_nt = {**common(r_idx, r_info, "reasoning"), "raw_prompt": _objects(list(plan.raw_prompt)), "box_index": plan.box_index,
            **{k: np.array([s[k] for s in r_scores]) for k in SCORE_KEYS}}
    r_adv = [-1.0 + 0.1 * j for j in range(len(r_idx))]
    r = _batch([prompt_r[q] for q in r_idx], [torch.tensor(tok(t)["input_ids"]) for t in r_texts], tok.pad_token_id, r_adv, r_nt)
    # verl's balance_batch reorders each stream in place
    g.reorder(torch.tensor(np.random.RandomState(0).permutation(len(g))))
    r.reorder(torch.tensor(np.random.RandomState(1).permutation(len(r))))
    return SimpleNamespace(g=g, r=r, plan=plan, texts=texts, r_texts=r_texts, rows=rows, idx=idx, geoms=geoms,
                           g_scores=g_scores, r_scores=r_scores, g_adv=g_adv, r_adv=r_adv, tok=tok)


def _dumps(tmp_path, parquet, tok, **kw):
    args = {"rollout_dir": tmp_path / "rollouts", "validation_dir": tmp_path / "validation", "n_table": 0,
            "data_files": {"train_files": [str(parquet)], "val_files": [str(parquet)]}, "tokenizer": tok,
            "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, **kw}
    return GenerationDumps(**args)


def test_training_step_dump_reads_back(step, slake_test_parquet, tmp_path):
    dumps = _dumps(tmp_path, slake_test_parquet, step.tok)
    dumps.training_step(7, {"grounding": step.g, "reasoning": step.r}, step.plan)
    assert dumps.errors == 0 and dumps.metrics() == {"dump/rows": float(B * N_G * (1 + N_R)), "dump/errors": 0.0}
    g_rows = read_jsonl(dump_file(tmp_path / "rollouts", 7, "grounding"))
    r_rows = read_jsonl(dump_file(tmp_path / "rollouts", 7, "reasoning"))
    assert (tmp_path / "rollouts" / "7_grounding.jsonl").exists() and len(g_rows) == B * N_G and len(r_rows) == B * N_G * N_R
    assert json.loads((tmp_path / "rollouts" / DATA_FILES).read_text())["train_files"] == [str(slake_test_parquet)]
    for row in g_rows + r_rows:
        assert set(row) == set(FIELDS)
        check_row(row)
        bi = row["box_index"]
        q = step.idx[bi]
        info = step.rows[q]["extra_info"]
        assert row["step"] == 7 and row["data_source"] == "slake" and row["record_id"] == info["record_id"]
        assert row["split"] == "test" and row["index"] == info["index"] and row["uid"] == f"q{q}"
        assert row["image"] == step.rows[q]["raw_prompt"][0]["content"][0]["path"] and row["image"].endswith(".jpg")
        assert row["gts"] == step.rows[q]["reward_model"]["ground_truth"] and row["question"] == info["question"]
        assert row["gt_boxes"] == [[float(v) for v in b] for b in info["gt_boxes"]]
        assert row["image_size"] == list(info["image_size"]) and row["resized_size"] == list(step.geoms[bi].resized_size)
        assert "<box>" in row["input"] or "<answer>" in row["input"]
        assert torch.equal(KeepMask.decode(row["keep_mask"]).cells, step.plan.keep_masks[bi].cells)
        if bi % N_G == 0:  # the resized gt box: parsed back, mapped to the gt box in original pixels
            assert row["box"] == pytest.approx([round(v, 1) for v in box_to_resized(info["gt_boxes"][0], step.geoms[bi])])
            assert row["box_original"] == pytest.approx(info["gt_boxes"][0], abs=0.2)
        else:  # no box: every cell kept
            assert row["box"] is None and row["box_original"] is None and bool(KeepMask.decode(row["keep_mask"]).cells.all())
    for row in g_rows:  # the reward dicts as computed, the advantage of the sample
        bi = row["box_index"]
        assert row["output"] == step.texts[bi] and row["advantage"] == pytest.approx(step.g_adv[bi])
        assert {k: row[k] for k in SCORE_KEYS} == pytest.approx({k: step.g_scores[k][bi] for k in SCORE_KEYS})
        assert row["parsed"] == float(bi % N_G == 0) and (row["iou"] > 0.95) == (bi % N_G == 0)  # boxes written to 0.1 px
        # one right, one wrong answer per box; a sample without a box earns no feedback (no_feedback)
        assert row["feedback"] == row["acc"] == pytest.approx(0.5 if bi % N_G == 0 else 0.0)
    for row in r_rows:
        j = next(j for j, t in enumerate(step.r_texts) if t == row["output"] and step.plan.box_index[j] == row["box_index"])
        assert row["advantage"] == pytest.approx(step.r_adv[j])
        assert {k: row[k] for k in SCORE_KEYS} == pytest.approx(step.r_scores[j])
        assert row["keep_ratio"] == pytest.approx(step.plan.keep_ratio[j])
        if row["box"] is None:
            assert row["keep_ratio"] == 1.0


@pytest.mark.parametrize("fmt", ["norm1", "norm1000"])
def test_dump_records_pixels_whatever_the_box_format(step, fmt):
    """The same boxes written as [0, 1] fractions (0-1000 integers) and planned in that format: the
    lines record the same box in pixels, the same mask and the same overlay; ``box_format`` and
    ``box_raw`` record what the model wrote."""
    from vitos_verl.pruning.boxes import parse_boxes, to_box_format
    from vitos_verl.pruning.draw import draw_rollout
    from vitos_verl.trainer.rollout_dump import stream_rows

    texts = []
    for text, geom in zip(step.texts, step.geoms):
        boxes = parse_boxes(text, "abs", geom.resized_size)
        raw = to_box_format(boxes[0], fmt, geom.resized_size) if boxes else None
        texts.append("<box>[" + ", ".join(repr(v) for v in raw) + "]</box>" if raw else text)
    infos = [{**step.rows[q]["extra_info"]} for q in step.idx]
    plan = plan_reasoning(texts, [list(g.grid_thw) for g in step.geoms], [i["image_size"] for i in infos],
                          [step.rows[q]["raw_reasoning_prompt"] for q in step.idx], ViToSConfig(n_g=N_G, n_r=N_R, margin_cells=1,
                                                                                               box_format=fmt))  # fmt: skip
    streams = {"grounding": step.g, "reasoning": step.r}
    ref, _ = stream_rows(streams, step.plan, step.tok, 7, MIN_PIXELS, MAX_PIXELS)
    got, _ = stream_rows(streams, plan, step.tok, 7, MIN_PIXELS, MAX_PIXELS)
    image = Image.new("RGB", (8, 8))
    for stream in ("grounding", "reasoning"):
        for a, b in zip(ref[stream], got[stream]):
            check_row(b)
            assert a["box_format"] == "abs" and b["box_format"] == fmt and a["keep_mask"] == b["keep_mask"]
            if a["box"] is None:
                assert b["box"] is None and b["box_raw"] is None
                continue
            assert b["box"] == pytest.approx(a["box"], abs=1e-6) and b["box_original"] == pytest.approx(a["box_original"], abs=1e-6)
            assert a["box_raw"] == a["box"] and max(b["box_raw"]) <= (1.0 if fmt == "norm1" else 1000.0)
            assert b["box_raw"] == pytest.approx(to_box_format(a["box"], fmt, a["resized_size"]))
            pic = image.resize(tuple(a["image_size"]))
            assert list(draw_rollout(pic, a).getdata()) == list(draw_rollout(pic, b).getdata())


def test_dump_errors_are_counted_not_raised(step, slake_test_parquet, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    dumps = _dumps(tmp_path, slake_test_parquet, step.tok, rollout_dir=blocker / "rollouts")
    dumps.training_step(1, {"grounding": step.g, "reasoning": step.r}, step.plan)  # cannot mkdir under a file
    assert dumps.errors == 2 and dumps.rows == 0
    broken = SimpleNamespace(boxes=[], keep_masks=[])  # a plan that does not match the batch
    dumps.training_step(2, {"grounding": step.g, "reasoning": step.r}, broken)
    assert dumps.errors == 3 and dumps.metrics()["dump/errors"] == 3.0
    off = _dumps(tmp_path, slake_test_parquet, step.tok, rollout_dir=None, validation_dir=None)
    off.training_step(1, {"grounding": step.g, "reasoning": step.r}, step.plan)
    assert off.metrics() == {} and off.validation_end(1) == {}


class _FakeWandb:
    """wandb's Table / Image / log, recorded."""

    def __init__(self):
        self.logged = []

    class Image:
        def __init__(self, image):
            self.image = image

    class Table:
        def __init__(self, columns):
            self.columns, self.data = columns, []

        def add_data(self, *row):
            self.data.append(row)

    def log(self, data, step):
        self.logged.append((step, data))


def test_validation_dump_and_table(step, slake_test_parquet, tmp_path, monkeypatch, capsys):
    from verl.utils.tracking import Tracking

    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "run" / "metrics-x.jsonl"))
    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path / "run" / "tensorboard"))
    (tmp_path / "run").mkdir()
    tracker = Tracking(project_name="vitos", experiment_name="t", default_backend=["console", "file", "tensorboard"])
    wandb = tracker.logger["wandb"] = _FakeWandb()
    verl_calls = []

    class VerlLogger:  # verl's ValidationGenerationsLogger, for the backends verl handles
        def log(self, loggers, samples, step):
            verl_calls.append((loggers, samples, step))
            if "swanlab" in loggers:
                raise ImportError("No module named 'swanlab'")

    tracker.logger["mlflow"] = tracker.logger["swanlab"] = object()
    dumps = _dumps(tmp_path, slake_test_parquet, step.tok, n_table=2, verl_logger=VerlLogger())
    dumps.validation_batch(4, {"grounding": step.g, "reasoning": step.r}, step.plan)
    out = dumps.validation_end(4, tracker)
    for name in ("wandb", "mlflow", "swanlab"):  # not real backends: keep them out of Tracking.finish
        tracker.logger.pop(name)
    tracker.finish()
    assert out == {"val/dump_errors": 1.0}  # swanlab "not installed": counted, nothing raised
    for stream, n in (("grounding", B * N_G), ("reasoning", B * N_G * N_R)):
        rows = read_jsonl(tmp_path / "validation" / f"val_4_{stream}.jsonl")
        assert len(rows) == n and {r["step"] for r in rows} == {4}
        for r in rows:
            check_row(r)
    # wandb: a table of 2 samples with the overlay as an image column
    (w_step, data), = wandb.logged
    table = data["val/generations"]
    assert w_step == 4 and table.columns == [*TABLE_COLUMNS, "image"] and len(table.data) == 2
    for row in table.data:
        img = row[-1].image
        assert isinstance(img, Image.Image) and max(img.size) <= 512
    # console and file: the text columns only
    printed = capsys.readouterr().out
    assert "validation generations at step 4 (2 samples)" in printed
    lines = [json.loads(x) for x in (tmp_path / "run" / "val_generations.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and set(lines[0]) == set(TABLE_COLUMNS) and lines[0]["step"] == 4
    assert {x["record_id"] for x in lines} == {row[TABLE_COLUMNS.index("record_id")] for row in table.data}
    # tensorboard: the text table and one image per sample in the event file
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 2 * 1000
    assert [c[0] for c in verl_calls] == [["mlflow"], ["swanlab"]] and len(verl_calls[0][1]) == 2
    # the same samples at the next validation
    dumps.validation_batch(5, {"grounding": step.g, "reasoning": step.r}, step.plan)
    tracker2 = SimpleNamespace(logger={"wandb": wandb})
    dumps.validation_end(5, tracker2)
    assert [r[2] for r in wandb.logged[1][1]["val/generations"].data] == [r[2] for r in table.data]


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_rollouts_grid(step, slake_test_parquet, tmp_path):
    dumps = _dumps(tmp_path, slake_test_parquet, step.tok)
    dumps.training_step(3, {"grounding": step.g, "reasoning": step.r}, step.plan)
    path = dump_file(tmp_path / "rollouts", 3, "reasoning")
    # the data files from the data_files.json beside the dump; N_R answers share a box: one tile each
    out = overlay_main(["--rollouts", str(path), "--n", "5", "--tile", "128", "--out", str(tmp_path / "grid.png")])
    assert _png_size(out) == (3 * 128, 2 * (128 + CAPTION_PX))
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    tile = grid[:128, :128]
    assert tile.std() > 10 and not (tile == 96).all()  # an image, not the grey "not found" tile
    # red box outline drawn on the first tile when its box parsed
    first = read_jsonl(path)[0]
    if first["box"] is not None:
        assert ((tile[..., 0] > 200) & (tile[..., 1] < 60) & (tile[..., 2] < 60)).any()
    # explicit --data, a grounding dump, the default 16 (only B * N_G boxes there)
    g_path = dump_file(tmp_path / "rollouts", 3, "grounding")
    out = overlay_main(["--rollouts", str(g_path), "--data", str(slake_test_parquet), "--out", str(tmp_path / "g.png")])
    assert _png_size(out) == (3 * 256, 2 * (256 + CAPTION_PX))
    # rows whose images cannot be found: grey tiles, no crash
    (tmp_path / "rollouts" / DATA_FILES).write_text(json.dumps({"train_files": [], "val_files": []}))
    out = overlay_main(["--rollouts", str(path), "--n", "1", "--tile", "64", "--out", str(tmp_path / "none.png")])
    assert _png_size(out) == (64, 64 + CAPTION_PX)
