"""``cards.html``: one card per question for browsing errors, each (model, method)'s picture with its
kept cells and boxes, prediction and verdicts; ``cards_preview.png``, the first cards as one
picture.

The pictures come from the benchmark parquet rows the records name (``<root>/data/<benchmark>/``,
or the files the runner's ``load_report.json`` lists), read with
:mod:`vitos_verl.data.parquet_rows`. Part of the evaluation report (:mod:`vitos_verl.eval.report`).
"""

from __future__ import annotations

import hashlib
import html
import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vitos_verl.data.parquet_rows import open_image, read_rows
from vitos_verl.eval.protocols import PROTOCOLS
from vitos_verl.eval.report_markdown import BENCHMARK_NAMES, fmt
from vitos_verl.eval.report_summary import benchmark_order, method_key, number

THUMB = 336  # longest side of a card thumbnail, pixels
DEFAULT_CARDS = 200
PRED_COLOUR = (255, 0, 0)  # predicted box (draw_overlay's red)
GT_COLOUR = (0, 200, 255)  # ground-truth boxes (kept cells are outlined yellow)


def _parquet_candidates(data_dir: Path, benchmark: str, split: str | None, known: Sequence[Path] = ()) -> list[Path]:
    """Parquet files that may hold the benchmark's rows: ``known`` ones (the runner's load reports
    name theirs) first, then ``data_dir/<benchmark>/*.parquet``, the record's split, then test, val, ..."""
    folder = data_dir / benchmark
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    rank = {s: i for i, s in enumerate(([split] if split else []) + ["test", "val", "validation", "dev", "train"])}
    out = [p for p in known if p.is_file()]
    return out + [p for p in sorted(files, key=lambda p: (rank.get(p.stem, len(rank)), p.name)) if p not in out]


def _same_question(rec: Mapping[str, Any], row: Mapping[str, Any]) -> bool:
    a = str(rec.get("question") or "").strip().lower()
    b = str((row.get("extra_info") or {}).get("question") or "").strip().lower()
    return not a or not b or a in b or b in a


def _load_images(
    records: Sequence[dict], data_dir: Path, known: Mapping[str, Sequence[Path]] | None = None
) -> tuple[dict[tuple[str, int], Any], Counter]:
    """``{(benchmark, index): PIL image or error string}`` for the records' rows.

    ``index`` is the row's position in the benchmark parquet (= its ``extra_info.index``); a row
    is taken only if its question agrees with the record's (so a wrong parquet is not drawn). The
    rows are read with :func:`vitos_verl.data.parquet_rows.read_rows`, the first image of a row
    (else the record's ``image_path``) opened with :func:`vitos_verl.data.parquet_rows.open_image`.
    """
    images: dict[tuple[str, int], Any] = {}
    errors: Counter = Counter()
    need: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in records:
        idx = r.get("index")
        if isinstance(idx, int) and not isinstance(idx, bool):
            need[r["benchmark"]].setdefault(idx, r)
        else:
            images[(r["benchmark"], idx)] = "no row index"
    for benchmark, recs in need.items():
        split = next((str(r["split"]) for r in recs.values() if r.get("split")), None)
        rows: dict[int, dict] = {}
        mismatched: set[int] = set()
        for path in _parquet_candidates(data_dir, benchmark, split, (known or {}).get(benchmark, ())):
            try:
                got = read_rows(path, [i for i in recs if i not in rows], columns=("images", "extra_info"))
            except Exception as e:  # a broken parquet must not stop the report
                errors[f"unreadable {path.name}: {type(e).__name__}"] += 1
                continue
            rows.update({i: row for i, row in got.items() if _same_question(recs[i], row)})
            mismatched.update(i for i, row in got.items() if i not in rows)
            if len(rows) == len(recs):
                break
        for i, rec in recs.items():
            row, img = rows.get(i), None
            try:
                if row and row.get("images"):
                    img = open_image(row["images"][0])
                if img is None and rec.get("image_path"):
                    img = open_image({"path": str(rec["image_path"])})
                if img is not None:
                    img.load()
            except Exception as e:  # corrupt image bytes
                img = f"unreadable image ({type(e).__name__})"
            if img is None:
                img = (f"row {i} of {data_dir / benchmark}/*.parquet holds another question" if i in mismatched
                       else f"no row {i} in {data_dir / benchmark}/*.parquet and no image file")
                errors[f"{benchmark}: row holds another question" if i in mismatched
                       else f"{benchmark}: row or parquet not found"] += 1
            elif isinstance(img, str):
                errors[f"{benchmark}: {img}"] += 1
            images[(benchmark, i)] = img
    return images, errors


def _valid_box(box: Any) -> list[float] | None:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    vals = [number(v) for v in box]
    return None if any(v is None for v in vals) else vals


def render_thumbnail(image: Any, record: Mapping[str, Any], size: int = THUMB) -> Any:
    """The card picture of one record: kept cells, predicted box (red), ground-truth boxes (cyan).

    The keep mask (``"RxC:hex"``) fixes the resized frame: ``R x C`` cells of 28 px, i.e.
    ``grid_thw = (1, 2R, 2C)`` (:func:`vitos_verl.pruning.geometry_from_grid`), mapped onto the
    image's original size; :func:`vitos_verl.pruning.draw.draw_overlay` dims the pruned cells,
    outlines the kept ones and draws ``box_resized``. Without a mask (nothing pruned) the image is
    shown as is with ``box_original``. Returns an RGB image whose longest side is ``<= size``.
    """
    from PIL import ImageDraw

    from vitos_verl.pruning import KeepMask, geometry_from_grid
    from vitos_verl.pruning.draw import draw_overlay

    pic = None
    box_r, box_o = _valid_box(record.get("box_resized")), _valid_box(record.get("box_original"))
    if record.get("keep_mask"):
        try:
            mask = KeepMask.decode(record["keep_mask"])
            rows, cols = mask.cell_grid
            geom = geometry_from_grid((1, 2 * rows, 2 * cols), orig_size=image.size)
            pic = draw_overlay(image, mask, geom, box_r)
            box_o = None if box_r is not None else box_o
        except ValueError:
            pic = None
    if pic is None:
        pic = image.convert("RGB")
    width = max(1, round(max(pic.size) / size * 1.5))
    draw = ImageDraw.Draw(pic)
    if box_o is not None:
        draw.rectangle(box_o, outline=PRED_COLOUR, width=width)
    for gt in record.get("gt_boxes") or []:
        gt = _valid_box(gt)
        if gt is not None:
            x1, x2 = sorted((gt[0], gt[2]))
            y1, y2 = sorted((gt[1], gt[3]))
            draw.rectangle([x1, y1, x2, y2], outline=GT_COLOUR, width=width)
    pic.thumbnail((size, size))
    return pic


def _wrong(r: Mapping[str, Any]) -> int:
    """Wrong verdicts of a record over the protocols (missing verdicts count as wrong)."""
    c = r.get("correct") if isinstance(r.get("correct"), dict) else {}
    return sum(1 for p in PROTOCOLS if c.get(p) is not True)


def _select_questions(records: Sequence[dict], limit: int) -> tuple[dict[str, list[list[dict]]], dict[str, int]]:
    """Questions (all their records) per benchmark, wrong first, capped at ``limit`` in all.

    A question's records are every (model, method) prediction of one ``(benchmark, uid)``. Within a
    benchmark, questions with more wrong verdicts (over methods and protocols) come first, then by
    row index. The cap is shared round-robin between benchmarks. Returns the kept questions and
    ``{benchmark: questions left out}``.
    """
    by_q: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        by_q[(str(r.get("benchmark")), str(r.get("uid")))].append(r)
    per_b: dict[str, list[list[dict]]] = defaultdict(list)
    for (b, _uid), recs in by_q.items():
        recs.sort(key=lambda r: (method_key(str(r.get("method"))), str(r.get("model"))))
        per_b[b].append(recs)
    for qs in per_b.values():
        qs.sort(key=lambda q: (-sum(_wrong(r) for r in q), number(q[0].get("index")) or 0, str(q[0].get("uid"))))
    order = benchmark_order(per_b)
    taken = {b: 0 for b in order}
    left = max(int(limit), 0)
    while left > 0:
        progressed = False
        for b in order:
            if left and taken[b] < len(per_b[b]):
                taken[b] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    kept = {b: per_b[b][: taken[b]] for b in order if taken[b]}
    return kept, {b: len(per_b[b]) - taken[b] for b in order}


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#f6f6f6;color:#222}
h2{margin-top:2em;border-bottom:2px solid #999}
.card{background:#fff;border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.8em}
.card.wrong{border-left:6px solid #c33}.card.right{border-left:6px solid #3a3}
.q{font-weight:600}.meta{color:#666;font-size:.85em}
.preds{display:flex;flex-wrap:wrap;gap:.8em;margin-top:.6em}
.pred{border:1px solid #ddd;border-radius:4px;padding:.5em;width:360px;font-size:.85em}
.pred img{display:block;max-width:336px;max-height:336px;margin-bottom:.4em}
.ok{color:#197a19;font-weight:600}.bad{color:#b01c1c;font-weight:600}
pre{white-space:pre-wrap;word-break:break-word;background:#f3f3f3;padding:.3em;margin:.3em 0;max-height:14em;
overflow:auto}
.note{background:#fff8dc;padding:.5em;border:1px solid #e5d9a6}
.legend span{display:inline-block;width:1em;height:.8em;margin:0 .2em 0 .8em;vertical-align:middle}
"""


def _verdict(r: Mapping[str, Any], protocol: str) -> str:
    c = r.get("correct") if isinstance(r.get("correct"), dict) else {}
    v = c.get(protocol)
    if v is True:
        return f'<span class="ok">{protocol}: right</span>'
    if v is False:
        return f'<span class="bad">{protocol}: wrong</span>'
    return f"<span>{protocol}: -</span>"


def write_cards(
    records: Sequence[dict], out_dir: str | Path, data_dir: str | Path, limit: int = DEFAULT_CARDS
) -> Path:
    """``cards.html`` (and ``img/`` thumbnails beside it): one card per question, for browsing errors.

    Cards are grouped by benchmark; a card shows the question, choices, answer and, per (model,
    method), the picture (:func:`render_thumbnail`, read from the benchmark parquet row ``index``
    under ``data_dir/<benchmark>/``), the prediction and grounding output (HTML-escaped), the
    verdict under each protocol, keep ratio, kept/visual tokens, IoU and time. Wrong answers come
    first; at most ``limit`` questions are shown and the page says how many were left out.
    """
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    img_dir = out_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    kept, left_out = _select_questions(records, limit)
    chosen = [r for qs in kept.values() for q in qs for r in q]
    known: dict[str, list[Path]] = defaultdict(list)
    for where, rep in sorted((getattr(records, "report", None) or {}).get("load_reports", {}).items()):
        if isinstance(rep, Mapping) and rep.get("parquet"):
            known[Path(where).name].append(Path(str(rep["parquet"])))
    images, img_errors = _load_images(chosen, data_dir, known)
    esc = html.escape
    n_questions = sum(len(qs) for qs in kept.values())
    total_left = sum(left_out.values())
    body = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>ViToS evaluation cards</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>ViToS evaluation: per-question cards</h1>",
        f'<p class="note">{n_questions} questions shown, wrong answers first; {total_left} left out '
        f"(cap {int(limit)}; left out per benchmark: "
        + esc(", ".join(f"{b} {n}" for b, n in left_out.items()) or "none") + ").</p>",
        '<p class="legend">Picture: dimmed cells were pruned, kept cells outlined yellow;'
        f'<span style="background:rgb{PRED_COLOUR}"></span>predicted box'
        f'<span style="background:rgb{GT_COLOUR}"></span>ground-truth boxes.</p>',
    ]
    if img_errors:
        body.append('<p class="note">Pictures missing: '
                    + esc("; ".join(f"{k}: {v}" for k, v in sorted(img_errors.items()))) + "</p>")
    written: dict[str, str] = {}
    for b, questions in kept.items():
        body.append(f'<h2 id="{esc(b)}">{esc(BENCHMARK_NAMES.get(b, b))} ({len(questions)} questions'
                    f"{f', {left_out[b]} left out' if left_out.get(b) else ''})</h2>")
        for q in questions:
            first = q[0]
            wrong = any(_wrong(r) for r in q)
            choices = first.get("choices") or []
            body.append(f'<div class="card {"wrong" if wrong else "right"}" data-uid="{esc(str(first.get("uid")))}">')
            body.append(f'<div class="meta">{esc(b)} · uid {esc(str(first.get("uid")))} · row '
                        f'{esc(str(first.get("index")))} · {esc(str(first.get("answer_type") or ""))}</div>')
            body.append(f'<div class="q">{esc(str(first.get("question") or ""))}</div>')
            if choices:
                body.append("<ul>" + "".join(f"<li>{esc(str(c))}</li>" for c in choices) + "</ul>")
            body.append(f"<div>Answer: <b>{esc(str(first.get('answer') or ''))}</b></div>")
            body.append('<div class="preds">')
            for r in q:
                img = images.get((b, r.get("index")))
                pic_html = f'<div class="meta">{esc(img)}</div>' if isinstance(img, str) else ""
                if img is not None and not isinstance(img, str):
                    key = json.dumps([b, r.get("index"), r.get("keep_mask"), r.get("box_resized"),
                                      r.get("box_original"), r.get("gt_boxes")], default=str)
                    name = written.get(key)
                    if name is None:
                        name = hashlib.sha1(key.encode()).hexdigest()[:16] + ".png"
                        try:
                            render_thumbnail(img, r).save(img_dir / name)
                        except Exception as e:  # a bad box or mode must not stop the page
                            name = ""
                            img_errors[f"drawing failed ({type(e).__name__})"] += 1
                        written[key] = name
                    if name:
                        pic_html = f'<img src="img/{name}" alt="{esc(b)} row {esc(str(r.get("index")))}">'
                iou, keep = number(r.get("iou")), number(r.get("keep_ratio"))
                body.append(
                    '<div class="pred">' + pic_html
                    + f"<div><b>{esc(str(r.get('method')))}</b> · {esc(str(r.get('model')))}</div>"
                    + f"<div>{_verdict(r, 'medevalkit')} · {_verdict(r, 'strict')}</div>"
                    + f"<div>keep ratio {fmt(keep, 3)} ({esc(str(r.get('kept_tokens')))}/"
                    f"{esc(str(r.get('visual_tokens')))} tokens) · IoU {fmt(iou, 3)} · "
                    f"{fmt(number(r.get('time_s')), 2)} s</div>"
                    + (f'<div class="bad">error: {esc(str(r["error"]))}</div>' if r.get("error") else "")
                    + f"<div>Prediction:</div><pre>{esc(str(r.get('prediction') or ''))}</pre>"
                    + (f"<details><summary>Grounding output</summary><pre>{esc(str(r['grounding_output']))}</pre>"
                       "</details>" if r.get("grounding_output") is not None else "")
                    + "</div>"
                )
            body.append("</div></div>")
    body.append("</body></html>")
    path = out_dir / "cards.html"
    path.write_text("\n".join(body), encoding="utf-8")
    if chosen:
        _write_preview(kept, images, out_dir / "cards_preview.png")
    return path


def _write_preview(kept: Mapping[str, list[list[dict]]], images: Mapping, path: Path, questions: int = 2, tile: int = 240) -> Path:
    """``cards_preview.png``: the first ``questions`` cards of each benchmark as one picture (a row
    per question: every method's thumbnail with its verdicts and answer), drawn with Pillow for
    places without a browser (the page itself is ``cards.html``)."""
    from PIL import Image, ImageDraw

    from vitos_verl.eval.protocols import strict_answer

    rows = []
    for b, qs in kept.items():
        for q in qs[:questions]:
            tiles = []
            for r in q:
                img = images.get((b, r.get("index")))
                pic = render_thumbnail(img, r, tile) if img is not None and not isinstance(img, str) else Image.new("RGB", (tile, tile), "grey")
                card = Image.new("RGB", (tile, tile + 78), "white")
                card.paste(pic, (0, 0))
                answer = strict_answer(str(r.get("prediction") or "")) or ""
                lines = [f"{b} {r.get('uid')} | {r.get('method')} | keep {fmt(number(r.get('keep_ratio')), 2)}",
                         f"Q: {str(r.get('question') or '')[:38]}", f"truth: {str(r.get('answer') or '')[:32]}",
                         f"answer: {answer[:32]}",
                         "medevalkit " + ("right" if (r.get("correct") or {}).get("medevalkit") else "wrong")
                         + " | strict " + ("right" if (r.get("correct") or {}).get("strict") else "wrong")]
                draw = ImageDraw.Draw(card)
                for k, line in enumerate(lines):
                    draw.text((4, tile + 3 + 15 * k), line, fill="black")
                tiles.append(card)
            if tiles:
                rows.append(tiles)
    width = max(len(t) for t in rows) * (tile + 6)
    sheet = Image.new("RGB", (width, len(rows) * (tile + 84)), (230, 230, 230))
    for i, tiles in enumerate(rows):
        for j, card in enumerate(tiles):
            sheet.paste(card, (j * (tile + 6), i * (tile + 84)))
    sheet.save(path)
    return path
