"""What ``python -m vlm.eval`` writes: ``eval.json``, ``predictions.jsonl``, ``report.md`` (the tables and the
gallery) and ``gallery/NNN.png``: each sample's first image with the boxes of its prediction (and of its
reference, labelled ``ref: ...``) drawn, under it the question, the reference, the prediction and the score."""
from __future__ import annotations

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


def gallery_panel(sample: Any, record: dict[str, Any], *, json_frame: tuple[int, int] | None = None) -> Image.Image:
    """One gallery PNG: image with boxes (prediction in palette colours, reference labelled ``ref``), then text."""
    from vlm.data.images import load_image
    from vlm.inference.draw import draw_boxes, reply_boxes

    lines = [f"Q: {_question(sample)}", f"reference: {record.get('target')}",
             f"prediction: {record.get('prediction')}"]
    if record.get("score") is not None:
        lines.append(f"score: {record['score']:.3f}" + (f"  IoU {record['iou']:.3f}" if "iou" in record else ""))
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
    shown = []
    if gallery:
        (out / "gallery").mkdir(exist_ok=True)
        for k, (r, s) in enumerate(zip(records, samples)):
            if len(shown) >= gallery:
                break
            if r.get("prediction") is None or s is None:
                continue
            name = f"gallery/{k:03d}.png"
            gallery_panel(s, r, json_frame=json_frame).save(out / name)
            shown.append(name)
    body = [f"# {title}", "", *(f"- {k}: `{v}`" for k, v in info.items()), "", format_table(metrics), ""]
    if shown:
        body += ["## Gallery", "", *(f"![{n}]({n})" for n in shown), ""]
    (out / "report.md").write_text("\n".join(body))
    return out / "report.md"
