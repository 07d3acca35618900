"""The HTML report of ``ovsam eval prompts --report DIR``: one self-contained page (``DIR/index.html``; every
picture embedded as a data URI) with the summary table, per-class bars (a PNG per prompt type: mask IoU and top-1
accuracy of the classes with the lowest IoU) and the worst instances, by IoU and by wrong label, each drawn as the
ground truth beside the prediction on the image."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

BAR_CLASSES = 40
PANEL_SIDE = 320
GT_COLOUR = (40, 200, 80)
PRED_COLOUR = (230, 40, 200)


def _png_uri(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def bars(rows: list[dict[str, Any]], values: list[tuple[str, str, tuple[int, int, int]]], *,
         limit: int = BAR_CLASSES, count_key: str = "count") -> Any:
    """A PIL image of horizontal bars, one group per row (``name`` and ``count_key`` as its label), one bar per
    ``(key, legend, colour)`` of ``values`` (fractions in [0, 1]; None or < 0 draws nothing), for the first
    ``limit`` rows as given."""
    from PIL import Image, ImageDraw

    shown = rows[:limit]
    row_h, label_w, bar_w = 12 + 9 * len(values), 220, 300
    img = Image.new("RGB", (label_w + bar_w + 60 * len(values) + 20, 30 + row_h * max(1, len(shown))), "white")
    d = ImageDraw.Draw(img)
    x = 4
    for _, legend, colour in values:
        d.rectangle([x, 8, x + 10, 18], fill=colour)
        d.text((x + 14, 6), f"{legend} (%)", fill="black")
        x += 30 + 7 * len(legend)
    for n, r in enumerate(shown):
        y = 30 + n * row_h
        count = f" ({int(r[count_key])})" if r.get(count_key) is not None else ""
        d.text((4, y + 4), f"{str(r['name'])[:32]}{count}", fill="black")
        for k, (key, _, colour) in enumerate(values):
            value = r.get(key)
            if value is None or value < 0:
                continue
            top = y + 2 + k * 9
            d.rectangle([label_w, top, label_w + int(bar_w * value), top + 7], fill=colour)
            d.text((label_w + bar_w + 6 + 50 * k, y + 4), f"{100 * value:.0f}", fill=colour)
    return img


def class_bars(rows: list[dict[str, Any]], limit: int = BAR_CLASSES) -> Any:
    """``eval prompts``' per-class bars: mask IoU and top-1 accuracy of the ``limit`` classes lowest by IoU."""
    key = (lambda r: (r["miou"] if r["miou"] is not None else 2.0, r["acc"] or 0.0, r["name"]))
    return bars(sorted(rows, key=key), [("miou", "mask IoU", (60, 110, 220)), ("acc", "top-1", (240, 150, 40))],
                limit=limit)


def _tinted(image: np.ndarray, mask: np.ndarray | None, colour: tuple[int, int, int]) -> np.ndarray:
    out = image.astype(np.float32).copy()
    if mask is not None and mask.any():
        out[mask] = 0.45 * out[mask] + 0.55 * np.asarray(colour, dtype=np.float32)
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        out[edge] = colour
    return out.clip(0, 255).astype(np.uint8)


def side_by_side(image: np.ndarray, left: tuple[Any, tuple[int, int, int], str],
                 right: tuple[Any, tuple[int, int, int], str], *, box: list[float] | None = None,
                 point: list[float] | None = None) -> Any:
    """Two panels of ``image``, each with a mask tinted in its colour (``(mask or None, colour, caption)``), the
    prompt (a point, else a box) drawn in yellow on both, and the captions under them."""
    from PIL import Image, ImageDraw

    panels = []
    for mask, colour, caption in (left, right):
        panel = Image.fromarray(_tinted(image, mask, colour))
        scale = PANEL_SIDE / max(panel.size)
        panel = panel.resize((max(1, round(panel.width * scale)), max(1, round(panel.height * scale))))
        d = ImageDraw.Draw(panel)  # the prompt, drawn at the panel's scale so its lines stay thin
        if point is not None:
            x, y = (v * scale for v in point)
            d.ellipse([x - 5, y - 5, x + 5, y + 5], outline="yellow", width=2)
        elif box is not None:
            d.rectangle([v * scale for v in box], outline="yellow", width=2)
        framed = Image.new("RGB", (PANEL_SIDE, panel.height + 20), "white")
        framed.paste(panel, (0, 0))
        ImageDraw.Draw(framed).text((4, panel.height + 4), caption[:48], fill="black")
        panels.append(framed)
    out = Image.new("RGB", (2 * PANEL_SIDE + 8, max(p.height for p in panels)), "white")
    out.paste(panels[0], (0, 0))
    out.paste(panels[1], (PANEL_SIDE + 8, 0))
    return out


def _mask(rle: dict[str, Any] | None) -> np.ndarray | None:
    from ovsam.masks import decode_rle

    return None if not rle else decode_rle([rle])[0]


def instance_picture(image: np.ndarray, rec: dict[str, Any], names: list[str]) -> Any:
    """Ground truth (left) beside the prediction (right) of one ``eval prompts`` instance."""
    caption = f"pred: {names[rec['label']]} ({rec['score']:.2f})" + (
        "" if rec.get("iou") is None else f", IoU {rec['iou']:.2f}")
    return side_by_side(image, (_mask(rec.get("gt_mask")), GT_COLOUR, f"GT: {names[rec['gt_label']]}"),
                        (_mask(rec["pred_mask"]), PRED_COLOUR, caption), box=rec["box"], point=rec.get("point"))


def figure(picture: Any, caption: str) -> str:
    return (f'<figure><img class="case" alt="{html.escape(caption)}" src="{_png_uri(picture)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_page(out_dir: str | Path, title: str, intro: str, summary_html: str, sections: list[str]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(PAGE.format(title=html.escape(title), intro=html.escape(intro), summary=summary_html,
                                sections="\n".join(sections)), encoding="utf-8")
    return path


class _Images:
    """The images the worst instances are on, read once each: COCO files under ``images``, or samples of shards."""

    def __init__(self, images_root: str | None, storage_options: dict | None) -> None:
        self.root = None if images_root is None else images_root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.cache: dict[str, np.ndarray] = {}

    def get(self, source: dict[str, Any]) -> np.ndarray:
        import fsspec

        from pipeline.inputs.decode import decode_image
        from pipeline.training.train_data import iter_samples

        if "file_name" in source:
            key = source["file_name"]
            if key not in self.cache:
                with fsspec.open(f"{self.root}/{key}", "rb", **self.storage_options) as f:
                    self.cache[key] = decode_image(f.read())[0]
            return self.cache[key]
        key = f"{source['shard']}#{source['key']}"
        if key not in self.cache:
            for k, image, _ in iter_samples([source["shard"]], self.storage_options):
                if k == source["key"]:
                    self.cache[key] = image
                    break
            else:
                raise ValueError(f"sample {source['key']} is not in {source['shard']} any more")
        return self.cache[key]


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1rem; background: #f6f6f6; color: #222; }}
table {{ border-collapse: collapse; background: white; }}
td, th {{ border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.grid {{ display: flex; flex-wrap: wrap; gap: .8rem; }}
figure {{ margin: 0; background: white; padding: .4rem; border: 1px solid #ddd; }}
figcaption {{ font-size: 12px; color: #555; max-width: 648px; }}
</style></head><body>
<h1>{title}</h1>
<p>{intro}</p>
<h2>Summary</h2>
{summary}
{sections}
</body></html>
"""


def _summary_table(summary: dict[str, Any]) -> str:
    from pipeline.evaluation.prompts import summary_rows

    rows = summary_rows(summary)
    paper = any(r["paper_miou"] is not None for r in rows)
    cells = [[r["prompt"], r["split"], str(r["count"]), "-" if r["miou"] is None else f"{100 * r['miou']:.1f}",
              f"{100 * r['acc']:.1f}"] + ([str(r["paper_miou"] or "-")] if paper else []) for r in rows]
    return html_table(["prompt", "split", "instances", "mIoU %", "top-1 %"] + (["paper mIoU %"] if paper else []),
                      cells)


def write_report(summary: dict[str, Any], out_dir: str | Path, *, images: str | None = None,
                 storage_options: dict | None = None, title: str = "ovsam eval prompts") -> Path:
    """Write ``out_dir/index.html`` for an ``eval prompts`` summary; returns its path. ``images`` is the COCO
    images root (``--images``) for a COCO-format set."""
    names = summary.get("class_names") or []
    reader = _Images(images, storage_options)
    sections = []
    for prompt, rec in summary["prompts"].items():
        parts = [f"<h2>{html.escape(prompt)} prompts</h2>"]
        if rec.get("per_class"):
            parts.append(f'<h3>Per class</h3><img alt="per-class bars, {html.escape(prompt)}" '
                         f'src="{_png_uri(class_bars(rec["per_class"]))}">')
        for kind, heading in (("iou", "Lowest mask IoU"), ("label", "Most confident wrong labels")):
            figures = []
            for r in rec.get("worst", {}).get(kind, []):
                try:
                    picture = instance_picture(reader.get(r["source"]), r, names)
                except (OSError, ValueError) as e:
                    logger.warning("report: cannot draw %s: %s", r["source"], e)
                    continue
                where = r["source"].get("file_name") or f"{r['source']['shard']} / {r['source']['key']}"
                figures.append(figure(picture, f"{where}, instance {r['index']}"))
            if figures:
                parts.append(f"<h3>{heading}</h3><div class=\"grid\">{''.join(figures)}</div>")
        sections.append("\n".join(parts))
    intro = (f"{summary.get('units', 0)} units. Left: the ground truth (green) and its prompt; right: the prediction "
             "(magenta) with its label, label probability and IoU.")
    return write_page(out_dir, title, intro, _summary_table(summary), sections)


def _annotated_images(output: str, records: list[dict[str, Any]], shards: list[str] | None,
                      storage_options: dict | None) -> dict[tuple[str, str], np.ndarray]:
    from pipeline.annotate.outputs import read_annotated_images

    wanted: dict[str, set[str]] = {}
    for r in records:
        wanted.setdefault(r["shard"], set()).add(r["key"])
    return read_annotated_images(output, wanted, shards=shards, storage_options=storage_options) if wanted else {}


def _pct(v: Any) -> str:
    return "-" if v is None or v < 0 else f"{100 * v:.1f}"


def write_coco_report(report: dict[str, Any], out_dir: str | Path, output: str, *, shards: list[str] | None = None,
                      storage_options: dict | None = None, title: str = "ovsam eval coco") -> Path:
    """``out_dir/index.html`` for an ``eval coco`` report: the AP table, per-class AP bars per IoU type and the
    worst ground-truth instances (lowest best IoU, confident wrong categories), GT beside the best prediction, on
    the annotated images (read from the output's inputs, or ``shards``)."""
    types = [t for t in ("segm", "bbox") if t in report]
    rows = [[t, split, *(_pct(report[t][split][k]) for k in ("AP", "AP50", "AP75", "AR100"))]
            for t in types for split in ("all", "base", "novel") if split in report[t]]
    summary = html_table(["IoU type", "split", "AP %", "AP50 %", "AP75 %", "AR100 %"], rows)
    sections = []
    for t in types:
        per_class = sorted(report[t]["per_class"], key=lambda r: (r["AP"], r["name"]))
        bars_png = bars([{**r, "count": r["gt_instances"]} for r in per_class],
                        [("AP", "AP", (60, 110, 220)), ("AP50", "AP50", (240, 150, 40))])
        sections.append(f"<h2>{t}: per class</h2><img alt=\"per-class bars, {t}\" src=\"{_png_uri(bars_png)}\">")
    worst = report.get("worst", {})
    pictures = _annotated_images(output, worst.get("iou", []) + worst.get("label", []), shards, storage_options)
    for kind, heading in (("iou", "Ground-truth instances with the lowest best mask IoU"),
                          ("label", "Confident predictions of another category (IoU >= 0.5)")):
        figures = []
        for r in worst.get(kind, []):
            image = pictures.get((r["shard"], r["key"]))
            if image is None:
                continue
            right = ("no prediction" if r["pred_name"] is None else
                     f"pred: {r['pred_name']} ({r['score']:.2f}), IoU {r['iou']:.2f}")
            picture = side_by_side(image, (_mask(r["gt_mask"]), GT_COLOUR, f"GT: {r['gt_name']}"),
                                   (_mask(r["pred_mask"]), PRED_COLOUR, right), box=r["box"])
            figures.append(figure(picture, f"{r['shard']} / {r['key']}, annotation {r['annotation_id']}"))
        if figures:
            sections.append(f"<h2>{heading}</h2><div class=\"grid\">{''.join(figures)}</div>")
    m = report["matching"]
    intro = (f"{m['images_evaluated']} images and {m['categories_evaluated']} categories evaluated with pycocotools' "
             "COCOeval. Left: the ground truth (green); right: the prediction with the highest mask IoU (magenta).")
    return write_page(out_dir, title, intro, summary, sections)


def write_compare_report(report: dict[str, Any], out_dir: str | Path, *, shards: list[str] | None = None,
                         storage_options: dict | None = None, title: str = "ovsam eval compare") -> Path:
    """``out_dir/index.html`` for an ``eval compare`` report: the agreement table, the mask-IoU histogram and
    the pairs with the lowest IoU and with changed labels, A beside B, on the images of A's inputs."""
    ins = report["instances"]
    rows = [["pairs", ins["pairs"]], ["paired by prompt / by mask", f"{ins['paired_by_prompt']} / "
                                                                    f"{ins['paired_by_mask']}"],
            ["only in A / only in B", f"{ins['only_a']} / {ins['only_b']}"],
            ["label agreement %", _pct(report["label_agreement"])]]
    q = report["mask_iou"]
    if ins["pairs"]:
        rows += [["mask IoU mean / median / p5 / min", " / ".join(f"{q[k]:.4f}" for k in
                                                                  ("mean", "median", "p5", "min"))],
                 ["label_score shift B - A: mean / max |.|",
                  f"{report['score_shift']['mean']:+.5f} / {report['score_shift']['max_abs']:.5f}"]]
    summary = html_table(["", ""], [[str(a), str(b)] for a, b in rows])
    sections = []
    if ins["pairs"]:
        hist = [{"name": f"IoU {k}", "fraction": v / ins["pairs"], "count": v} for k, v in q["histogram"].items()]
        sections.append(f"<h2>Mask IoU of the pairs</h2><img alt=\"IoU histogram\" src=\""
                        f"{_png_uri(bars(hist, [('fraction', 'share of pairs', (60, 110, 220))]))}\">")
    items = report.get("worst_iou", []) + report.get("label_changes", [])
    pictures = _annotated_images(report["a"], [{"shard": w["shard"], "key": w["image_key"]} for w in items],
                                 shards, storage_options)
    for kind, heading in (("worst_iou", "Pairs with the lowest mask IoU"), ("label_changes", "Changed labels")):
        figures = []
        for w in report.get(kind, []):
            image = pictures.get((w["shard"], w["image_key"]))
            if image is None or "mask_a" not in w:
                continue
            picture = side_by_side(image, (_mask(w["mask_a"]), GT_COLOUR, f"A: {w['label_a']} ({w['score_a']:.2f})"),
                                   (_mask(w["mask_b"]), PRED_COLOUR,
                                    f"B: {w['label_b']} ({w['score_b']:.2f}), IoU {w['iou']:.2f}"))
            figures.append(figure(picture, f"{w['shard']} / {w['image_key']}, #{w['instance_a']} / "
                                           f"#{w['instance_b']}"))
        if figures:
            sections.append(f"<h2>{heading}</h2><div class=\"grid\">{''.join(figures)}</div>")
    intro = f"A: {report['a']} (green); B: {report['b']} (magenta)."
    return write_page(out_dir, title, intro, summary, sections)


__all__ = ["write_coco_report", "write_compare_report", "bars", "class_bars", "figure", "html_table", "instance_picture", "side_by_side", "write_page", "write_report"]
