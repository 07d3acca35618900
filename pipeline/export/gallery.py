"""One self-contained HTML page of annotated images: a thumbnail of each overlay (embedded, no other files), its
instances' labels and scores, and a filter by label and minimum score that hides the instances and images that do
not pass it. Made by ``ovsam show --html``."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THUMBNAIL_SIDE = 480


@dataclass
class ShownImage:
    path: Path
    shard: str
    key: str
    instances: list[dict[str, Any]] = field(default_factory=list)


def _thumbnail(path: Path, side: int = THUMBNAIL_SIDE) -> str:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1rem; background: #f6f6f6; color: #222; }}
header {{ position: sticky; top: 0; background: #f6f6f6; padding: .5rem 0; display: flex; gap: 1rem;
  align-items: center; flex-wrap: wrap; border-bottom: 1px solid #ccc; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1rem; margin-top: 1rem; }}
figure {{ margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }}
figure img {{ width: 100%; height: auto; display: block; }}
figcaption {{ font-size: 12px; color: #555; margin: .3rem 0; word-break: break-all; }}
ul {{ list-style: none; padding: 0; margin: 0; }}
li {{ display: flex; justify-content: space-between; border-top: 1px solid #eee; padding: 2px 0; }}
.hidden {{ display: none; }}
</style></head><body>
<header><strong>{title}</strong>
<label>label <select id="label"><option value="">all labels</option>{options}</select></label>
<label>min score <input id="score" type="range" min="0" max="1" step="0.01" value="0">
<span id="score-value">0.00</span></label>
<span id="count"></span></header>
<main id="grid">{figures}</main>
<script>
const label = document.getElementById("label"), score = document.getElementById("score");
function apply() {{
  const want = label.value, min = parseFloat(score.value);
  document.getElementById("score-value").textContent = min.toFixed(2);
  let shown = 0;
  for (const fig of document.querySelectorAll("figure")) {{
    let any = false;
    for (const li of fig.querySelectorAll("li")) {{
      const ok = (!want || li.dataset.label === want) && parseFloat(li.dataset.score) >= min;
      li.classList.toggle("hidden", !ok);
      any = any || ok;
    }}
    const keep = any || (!want && min === 0);
    fig.classList.toggle("hidden", !keep);
    shown += keep ? 1 : 0;
  }}
  document.getElementById("count").textContent = shown + " of {total} images";
}}
label.addEventListener("change", apply); score.addEventListener("input", apply); apply();
</script></body></html>
"""


def write_html(images: list[ShownImage], out: Path, title: str = "ovsam annotations") -> Path:
    """Write the page to ``out`` and return it."""
    labels = sorted({str(r["label_name"]) for im in images for r in im.instances})
    figures = []
    for im in images:
        rows = "".join(
            f'<li data-label="{html.escape(str(r["label_name"]), quote=True)}" '
            f'data-score="{float(r["label_score"]):.4f}"><span>{html.escape(str(r["label_name"]))}</span>'
            f'<span>{float(r["label_score"]):.2f}</span></li>'
            for r in sorted(im.instances, key=lambda r: -float(r["label_score"])))
        figures.append(f'<figure data-shard="{html.escape(im.shard, quote=True)}" '
                       f'data-key="{html.escape(im.key, quote=True)}"><img src="{_thumbnail(im.path)}" '
                       f'alt="{html.escape(im.key, quote=True)}"><figcaption>{html.escape(im.shard)} / '
                       f'{html.escape(im.key)} - {len(im.instances)} instances</figcaption><ul>{rows}</ul></figure>')
    options = "".join(f'<option value="{html.escape(n, quote=True)}">{html.escape(n)}</option>' for n in labels)
    page = PAGE.format(title=html.escape(title), options=options, figures="\n".join(figures), total=len(images))
    out.write_text(page, encoding="utf-8")
    return out


__all__ = ["ShownImage", "write_html"]
