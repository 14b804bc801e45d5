"""vitos_verl.eval.warmstart_probe and decode_pruned's KV cache, on the sparse-evidence task's
real rows (generated) and the tiny policy at the task's pixel budget (fp32: AVX2 hosts too)."""

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from vitos_verl.eval import warmstart_probe
from vitos_verl.eval.pruned_check import decode_pruned, encode_row
from vitos_verl.pruning import box_to_keep_mask, box_to_resized, geometry_from_grid


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from data_prep import sparse_evidence

    out = tmp_path_factory.mktemp("sparse_evidence_probe")
    sparse_evidence.generate(out, seed=3, n_train=2, n_val=6)
    return out / "val.parquet"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_decodes_the_same_tokens(task, tiny_224_ckpt, temperature):
    processor = AutoProcessor.from_pretrained(tiny_224_ckpt)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_224_ckpt, dtype=torch.float32).eval()
    for row in pq.read_table(task).to_pylist()[:3]:
        enc = encode_row(processor, row)
        geom = geometry_from_grid(enc["image_grid_thw"][0], tuple(row["extra_info"]["image_size"]))
        mask = box_to_keep_mask(box_to_resized(row["extra_info"]["gt_boxes"][0], geom), geom.cell_grid, 1, 0.0)
        assert 0 < int(mask.sum()) < mask.numel()  # a real pruned prompt
        ref, ref_first = decode_pruned(model, enc, [mask], 12, temperature, torch.Generator().manual_seed(5))
        got, got_first = decode_pruned(
            model, enc, [mask], 12, temperature, torch.Generator().manual_seed(5), use_cache=True
        )
        assert got == ref and len(ref) > 1
        torch.testing.assert_close(got_first, ref_first)


def _scripted(monkeypatch, processor, texts):
    """Make the probe's policy write ``texts`` in order (grounding, reasoning, grounding, ...)."""
    it = iter(texts)

    def fake(model, enc, keep_masks, max_new_tokens, temperature, generator, use_cache):
        assert temperature == 1.0 and use_cache
        return processor.tokenizer.encode(next(it)), None

    monkeypatch.setattr(warmstart_probe, "decode_pruned", fake)


def test_probe_scores_boxes_in_the_frame_the_reward_uses(task, tiny_224_ckpt, monkeypatch):
    rows = pq.read_table(task).to_pylist()
    processor = AutoProcessor.from_pretrained(tiny_224_ckpt)
    right, wrong = [], []
    for r in rows:
        x1, y1, x2, y2 = (int(v) for v in r["extra_info"]["gt_boxes"][0])  # 224 x 224 px: not resized
        other = (224 - x2, 224 - y2, 224 - x1, 224 - y1)  # the opposite quadrant
        right += [
            f"<box>[{x1}, {y1}, {x2}, {y2}]</box>",
            f"<think>.</think><answer>{r['reward_model']['ground_truth']}</answer>",
        ]
        wrong += [f"<box>[{other[0]}, {other[1]}, {other[2]}, {other[3]}]</box>", "no answer here"]
    _scripted(monkeypatch, processor, right)
    res = warmstart_probe.probe(tiny_224_ckpt, task, num=len(rows))
    assert res["rows"] == len(rows)
    assert res["box_iou"] == pytest.approx(1.0) and res["box_format"] == 1.0
    assert res["answer_acc"] == 1.0 and res["answer_format"] == 1.0
    _scripted(monkeypatch, processor, wrong)
    res = warmstart_probe.probe(tiny_224_ckpt, task, num=len(rows))
    assert res["box_iou"] == 0.0 and res["box_format"] == 1.0
    assert res["answer_acc"] == 0.0 and res["answer_format"] == 0.0


def test_probe_refuses_data_without_boxes(task, tiny_224_ckpt, tmp_path):
    table = pq.read_table(task).to_pylist()
    for r in table:
        r["extra_info"]["gt_boxes"] = []
    import pyarrow as pa

    path = tmp_path / "no_boxes.parquet"
    pq.write_table(pa.Table.from_pylist(table), path)
    with pytest.raises(ValueError, match="gt_boxes"):
        warmstart_probe.probe(tiny_224_ckpt, path)


def test_pick_stops_at_the_first_warm_start_over_the_threshold(task, monkeypatch, tmp_path):
    rates = {"sft100": (0.30, 0.50), "sft125": (0.45, 0.41), "sft150": (0.90, 0.90)}
    seen = []

    def fake(model, data, **kwargs):
        seen.append(model)
        iou, acc = rates[model]
        return {"model": model, "rows": 64, "box_iou": iou, "answer_acc": acc}

    monkeypatch.setattr(warmstart_probe, "probe", fake)
    res = warmstart_probe.pick(list(rates), task, 0.4, out=tmp_path / "pick.json")
    assert res["picked"] == "sft125" and res["met"] and seen == ["sft100", "sft125"]  # sft150 is not probed
    assert (tmp_path / "pick.json").exists()
    res = warmstart_probe.pick(list(rates), task, 0.95)
    assert res["picked"] == "sft150" and not res["met"] and len(res["probes"]) == 3
    with pytest.raises(ValueError, match="no warm start"):
        warmstart_probe.pick([], task, 0.4)
