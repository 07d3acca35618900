"""render_overlay: masks lightened (hue kept) with a solid outline, captions on plates, nothing else touched."""

from __future__ import annotations

import numpy as np

from ovsam.masks import encode_rle
from pipeline.export.overlay import MASK_ALPHA, PALETTE, mask_edge, render_overlay


def _scene():
    rng = np.random.default_rng(0)
    img = (rng.random((120, 160, 3)) * 60 + 60).astype(np.uint8)
    yy, xx = np.mgrid[:120, :160]
    square = (yy >= 40) & (yy < 100) & (xx >= 20) & (xx < 80)
    disc = (yy - 70) ** 2 + (xx - 120) ** 2 < 25 ** 2
    img[square] = (220, 30, 30)
    img[disc] = (30, 40, 220)
    rows = []
    for m, name in ((square, "red square"), (disc, "blue circle")):
        ys, xs = np.nonzero(m)
        rows.append({"mask_rle": encode_rle(m[None])[0], "label_name": name, "label_score": 0.5,
                     "box_xyxy": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]})
    return img, rows, (square, disc)


def test_mask_edge_is_the_inner_outline():
    m = np.zeros((7, 9), bool)
    m[1:6, 2:8] = True
    edge = mask_edge(m, 1)
    assert edge.sum() == 2 * 6 + 2 * 3 and not (edge & ~m).any()
    assert not edge[2:5, 3:7].any()
    assert mask_edge(m, 3).sum() == m.sum()  # thicker than half the mask: all of it
    full = np.ones((4, 4), bool)
    assert mask_edge(full, 1).sum() == 12  # the image border counts as outside


def test_overlay_keeps_hue_outlines_and_leaves_the_rest():
    img, rows, masks = _scene()
    drawn = np.asarray(render_overlay(img, rows).convert("RGB")).astype(int)
    changed = (drawn != img).any(axis=-1)
    for i, m in enumerate(masks):
        edge = mask_edge(m, 1)
        inside = m & ~edge
        assert (drawn[edge] == PALETTE[i]).all()  # the outline is solid, in the instance's colour
        expected = np.round((1 - MASK_ALPHA) * img[inside] + MASK_ALPHA * 255)
        assert np.abs(drawn[inside] - expected).max() <= 1  # lightened, not tinted: hue kept
        assert (drawn[inside].argmax(axis=1) == img[inside].argmax(axis=1)).all()
    # outside the masks only the caption plates (above each box) may change
    plates = np.zeros_like(changed)
    for row in rows:
        x0, y0 = int(row["box_xyxy"][0]), int(row["box_xyxy"][1])
        plates[max(0, y0 - 20):y0, max(0, x0 - 60):] = True
    outside = ~(masks[0] | masks[1]) & ~plates
    assert not changed[outside].any()
    assert changed[plates].any()  # the captions are there
