"""What ``python -m vlm.eval`` writes: ``eval.json``, ``predictions.jsonl``, ``report.md`` (the tables and the
gallery), ``gallery/NNN.png``: each sample's first image with the boxes of its prediction (and of its
reference, labelled ``ref: ...``) drawn, under it the question, the reference, the prediction and the score, and
``report.html``: the same gallery as a web page (one row per sample: the image with its boxes, ``images/NNN.png``,
beside the question, reference, prediction and score as text, HTML-escaped), opened in any browser."""
from __future__ import annotations

import html
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

#: gallery panel width (px) and the longest image side in it
PANEL_WIDTH = 360


def _question(sample: Any) -> str:
    users = [m for m in sample.messages if m.role == "user"]
    return users[-1].text() if users else ""


def marked_image(sample: Any, record: dict[str, Any], *,
                 json_frame: tuple[int, int] | None = None) -> Image.Image | None:
    """The sample's first image with the prediction's boxes (palette colours) and the reference's (``ref: ...``)
    drawn, scaled to fit ``PANEL_WIDTH`` (nearest neighbour: small images stay sharp); None without an image."""
    from vlm.data.images import load_image
    from vlm.inference.draw import draw_boxes, reply_boxes

    img = None
    if sample.images:
        pil = load_image(sample.images[0])
        ref = record.get("target") or ""
        marked = draw_boxes(pil, record.get("prediction") or "", json_frame=json_frame)
        from vlm.data.boxes import draw

        refs = [(f"ref: {lab}" if lab else "ref", box) for lab, box in reply_boxes(ref, pil.size)]
        marked = draw(marked, refs, width=1) if refs else marked
        scale = min(PANEL_WIDTH / marked.width, PANEL_WIDTH / marked.height, 8.0)
        img = marked.resize((max(1, round(marked.width * scale)), max(1, round(marked.height * scale))),
                            Image.NEAREST)
    return img


def _score(record: dict[str, Any]) -> str | None:
    if record.get("score") is None:
        return None
    return f"{record['score']:.3f}" + (f"  IoU {record['iou']:.3f}" if "iou" in record else "")


def gallery_panel(sample: Any, record: dict[str, Any], *, json_frame: tuple[int, int] | None = None) -> Image.Image:
    """One gallery PNG: image with boxes (prediction in palette colours, reference labelled ``ref``), then text."""
    lines = [f"Q: {_question(sample)}", f"reference: {record.get('target')}",
             f"prediction: {record.get('prediction')}"]
    if _score(record) is not None:
        lines.append(f"score: {_score(record)}")
    img = marked_image(sample, record, json_frame=json_frame)
    font = ImageFont.load_default()
    wrapped = [w for line in lines for w in (textwrap.wrap(line, 58) or [""])]
    top = img.height + 8 if img else 4
    panel = Image.new("RGB", (PANEL_WIDTH, top + 14 * len(wrapped) + 6), (255, 255, 255))
    if img:
        panel.paste(img, ((PANEL_WIDTH - img.width) // 2, 4))
    d = ImageDraw.Draw(panel)
    for k, line in enumerate(wrapped):
        d.text((6, top + 14 * k), line, fill=(0, 0, 0), font=font)
    return panel


def write_report(out: Path, metrics: dict[str, float], records: Sequence[dict[str, Any]], samples: Sequence[Any],
                 *, title: str, info: dict[str, Any], gallery: int = 12,
                 json_frame: tuple[int, int] | None = None, data_config: dict[str, Any] | None = None) -> Path:
    """Write ``eval.json`` ({metrics, info, data_config}), ``predictions.jsonl``, ``gallery/*.png`` (the first
    ``gallery`` answered samples; ``samples[k]`` is record ``k``'s sample, ``None`` for an unanswered one) and
    ``report.md`` (``info`` as a list: ``data`` says what was evaluated, the table, the gallery) into ``out``;
    returns the report's path. ``data_config``: the data set's full configuration, kept in ``eval.json`` only."""
    from vlm.eval.evaluator import format_table

    out.mkdir(parents=True, exist_ok=True)
    config = {} if data_config is None else {"data_config": data_config}
    (out / "eval.json").write_text(json.dumps({"metrics": metrics, **info, **config}, indent=1, default=str))
    with (out / "predictions.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")
    shown: list[str] = []
    entries: list[tuple[str | None, Any, dict[str, Any]]] = []
    if gallery:
        (out / "gallery").mkdir(exist_ok=True)
        for k, (r, s) in enumerate(zip(records, samples)):
            if len(shown) >= gallery:
                break
            if r.get("prediction") is None or s is None:
                continue
            name = f"gallery/{k:03d}.png"
            gallery_panel(s, r, json_frame=json_frame).save(out / name)
            image = marked_image(s, r, json_frame=json_frame)
            page_image = f"images/{k:03d}.png"
            if image is not None:
                (out / "images").mkdir(exist_ok=True)
                image.save(out / page_image)
            shown.append(name)
            entries.append((page_image if image is not None else None, s, r))
    body = [f"# {title}", "", *(f"- {k}: `{v}`" for k, v in info.items()), "", format_table(metrics), ""]
    if shown:
        body += ["## Gallery", "", *(f"![{n}]({n})" for n in shown), ""]
    (out / "report.md").write_text("\n".join(body))
    (out / "report.html").write_text(report_html(title, info, metrics, entries))
    return out / "report.md"


def report_html(title: str, info: dict[str, Any], metrics: dict[str, float],
                entries: Sequence[tuple[str | None, Any, dict[str, Any]]]) -> str:
    """``report.html``: the info list, the metrics table and one gallery row per ``(image file or None, sample,
    record)``; every text is HTML-escaped (questions and predictions are untrusted), images are files beside it."""
    e = html.escape
    rows = "".join(f"<tr><td>{e(k)}</td><td>{v:.4f}</td></tr>" if isinstance(v, float) else
                   f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in metrics.items())
    cards = []
    for image, sample, r in entries:
        pic = f'<img src="{e(image)}" alt="{e(str(r.get("id", "")))}">' if image else "<div>(no image)</div>"
        score = _score(r)
        cards.append(
            f'<div class="card">{pic}<dl><dt>question</dt><dd>{e(_question(sample))}</dd>'
            f'<dt>reference</dt><dd>{e(str(r.get("target")))}</dd>'
            f'<dt>prediction</dt><dd>{e(str(r.get("prediction")))}</dd>'
            + (f"<dt>score</dt><dd>{e(score)}</dd>" if score is not None else "") + "</dl></div>")
    items = "".join(f"<li>{e(str(k))}: <code>{e(str(v))}</code></li>" for k, v in info.items())
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td{border:1px solid #ccc;padding:2px 8px}.card{display:flex;gap:1em;border-top:1px solid #ddd;"
             "padding:.8em 0}.card img{width:240px;height:auto;flex:none;image-rendering:pixelated;align-self:flex-start}"
             "dt{font-weight:bold;color:#555}dd{margin:0 0 .4em 0;white-space:pre-wrap}")
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title><style>{style}</style>'
            f"</head><body><h1>{e(title)}</h1><ul>{items}</ul><h2>Metrics</h2><table>{rows}</table>"
            f"<h2>Gallery</h2>{''.join(cards) or '<p>(no answered samples)</p>'}</body></html>\n")
