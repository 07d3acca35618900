"""The COCO exporter: committed annotation output -> COCO instances JSON (RLE masks, or polygons traced on the
upsampled mask), and copies of the annotated images in the masks' frame (``--images-dir``).

Only committed shards are read (``pipeline.annotate.outputs``).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from pipeline.annotate.outputs import coco_file_name, iter_committed, read_run

logger = logging.getLogger(__name__)

POLYGON_UPSAMPLE = 4
MAX_PIXEL_CHANGE = 0.02
# How an image whose EXIF orientation was applied to its pixels is written again, per Pillow format: losslessly
# where the format can. JPEG is re-encoded at quality 95: a lossless JPEG rotation (jpegtran's) keeps the pixels only
# for sizes that are whole blocks (8 or 16 px) along the edge that moves; others it trims or leaves partly unturned,
# and neither Pillow nor any dependency of this project has one.
UPRIGHT_SAVE: dict[str, dict[str, Any]] = {"JPEG": {"quality": 95}, "MPO": {"quality": 95},
                                           "PNG": {}, "WEBP": {"lossless": True, "exact": True},
                                           "TIFF": {"compression": "tiff_lzw"}, "GIF": {}, "BMP": {}}


def mask_polygons(rle: dict[str, Any], tolerance: float = 1.0) -> list[list[float]]:
    """COCO polygons (``[[x0, y0, x1, y1, ...], ...]``, in pixel-edge coordinates: pixel ``(i, j)`` spans
    ``[j, j + 1) x [i, i + 1)``), one per 8-connected part of an RLE mask: its outer contour, simplified to within
    ``tolerance`` pixels (Douglas-Peucker) unless that would change more than ``MAX_PIXEL_CHANGE`` of the part's
    pixels (lost or gained, sampled at the pixel centres), so small and thin parts keep their traced outline.
    OpenCV traces the contours through the centres of boundary pixels, which would leave half a pixel of every edge
    out (and single pixels with no area), so they are traced on the mask upsampled ``POLYGON_UPSAMPLE`` times: the
    outline is then within 1/8 pixel of the mask's edge and every pixel of the mask, a lone one included, is inside
    a polygon. Holes are filled, as COCO polygons cannot hold them."""
    import cv2
    from pycocotools import mask as mask_utils

    m = mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"]})
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if not len(rows):
        return []
    # only the mask's box (and a pixel of background around it) is upsampled and traced
    m = np.pad(m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], 1).astype(np.uint8)
    origin = np.array([cols[0] - 1, rows[0] - 1], dtype=np.float64)
    k = POLYGON_UPSAMPLE
    up = cv2.resize(m, (m.shape[1] * k, m.shape[0] * k), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for c in contours:
        if tolerance > 0:
            c = _simplified(c, tolerance * k)
        pts = (c.reshape(-1, 2).astype(np.float64) + 0.5) / k + origin
        if len(pts) < 3:  # cannot happen for a k x k block or larger; kept as a guard
            continue
        polygons.append([round(float(v), 3) for v in pts.reshape(-1)])
    return polygons


def _simplified(contour: np.ndarray, epsilon: float) -> np.ndarray:
    """``contour`` (traced on the upsampled grid) simplified within ``epsilon`` upsampled pixels, or the contour
    itself where the simplified outline would lose or gain more than ``MAX_PIXEL_CHANGE`` of the pixels it holds.
    Both are filled on the upsampled grid and compared at the centre of each original pixel: a pixel is kept if the
    2 x 2 upsampled pixels around its centre are all inside, and gained if any is, so rasterisers that sample a
    little off the centre (pycocotools, ``fillPoly`` on whole pixels) agree."""
    import cv2

    simple = cv2.approxPolyDP(contour, epsilon, True)
    if len(simple) < 3 or len(simple) >= len(contour):
        return contour
    x, y, w, h = cv2.boundingRect(contour)
    traced, approx = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    cv2.fillPoly(traced, [contour - np.array([x, y], dtype=contour.dtype)], 1)
    cv2.fillPoly(approx, [simple - np.array([x, y], dtype=simple.dtype)], 1)
    traced, approx = _around_centres(traced, x, y), _around_centres(approx, x, y)
    inside = traced.any(axis=(1, 3))
    lost = inside & ~approx.all(axis=(1, 3))
    gained = ~inside & approx.any(axis=(1, 3))
    allowed = MAX_PIXEL_CHANGE * inside.sum()
    return simple if lost.sum() <= allowed and gained.sum() <= allowed else contour


def _around_centres(up: np.ndarray, x: int, y: int) -> np.ndarray:
    """``(rows, 2, cols, 2)``: for each original pixel that a box of the upsampled grid (at ``x, y``) touches, the
    2 x 2 upsampled pixels around its centre (0 outside the box)."""
    k = POLYGON_UPSAMPLE
    h, w = up.shape
    pad = ((y % k, -(y + h) % k), (x % k, -(x + w) % k))
    cells = np.pad(up, pad).reshape((h + sum(pad[0])) // k, k, (w + sum(pad[1])) // k, k)
    return cells[:, k // 2 - 1:k // 2 + 1, :, k // 2 - 1:k // 2 + 1]


def export_coco(fs: Any, output: str, class_names: list[str] | None = None, *, polygons: bool = False,
                tolerance: float = 1.0) -> dict:
    """COCO instances JSON for every committed image with status ``ok``.

    Image ids are assigned in (shard, key) order starting at 1; ``file_name`` is :func:`coco_file_name` (made
    unique with the shard's name where two inputs share a path); category ids are vocabulary index + 1; each
    annotation carries ``score`` (the label score) and ``iscrowd = 0``. Segmentation is the RLE mask, or with
    ``polygons`` its polygons (:func:`mask_polygons`; an empty mask, which has none, keeps its RLE). Each image
    also carries ``ovsam_shard`` and ``ovsam_key``, so ``--images-dir`` and other tools can find its source.
    """
    if class_names is None:
        class_names = list(read_run(fs, output)["vocabulary"]["names"])
    images, annotations = [], []
    names: set[str] = set()
    cols = ["image_key", "instance_index", "mask_rle", "area", "box_xyxy", "label", "label_score"]
    for part in iter_committed(fs, output, columns=cols):
        img_rows = sorted(part.images.to_pylist(), key=lambda r: r["image_key"])
        ids = {}
        for row in img_rows:
            if row["status"] != "ok":
                continue
            image_id = len(images) + 1
            ids[row["image_key"]] = image_id
            name = coco_file_name(part.shard, row)
            if name in names:
                name = f"{part.shard}/{name}"
            names.add(name)
            images.append({"id": image_id, "file_name": name, "width": int(row["width"]),
                           "height": int(row["height"]), "ovsam_shard": part.shard, "ovsam_key": row["image_key"]})
        inst = sorted(part.instances.to_pylist(), key=lambda r: (r["image_key"], r["instance_index"]))
        for row in inst:
            x0, y0, x1, y1 = row["box_xyxy"]
            rle = {"size": list(row["mask_rle"]["size"]), "counts": row["mask_rle"]["counts"]}
            segmentation: Any = rle
            if polygons:
                segmentation = mask_polygons(rle, tolerance) or rle
            annotations.append({
                "id": len(annotations) + 1, "image_id": ids[row["image_key"]], "category_id": int(row["label"]) + 1,
                "segmentation": segmentation, "area": float(row["area"]), "bbox": [x0, y0, x1 - x0, y1 - y0],
                "iscrowd": 0, "score": float(row["label_score"]),
            })
    categories = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(class_names)]
    return {"info": {"description": f"ovsam annotations of {output}"}, "images": images,
            "annotations": annotations, "categories": categories}


def write_images(output: str, images: list[dict[str, Any]], images_dir: str, *,
                 storage_options: dict | None = None, shards: list[str] | None = None) -> int:
    """Write the exported ``images`` (COCO image dicts with ``ovsam_shard``/``ovsam_key``) from the annotated inputs
    to ``images_dir/<file_name>`` (any fsspec URL), reading each input shard once, in the frame of their masks
    (:func:`upright_image_bytes`: the original bytes, or for an image with an EXIF orientation 2..8 the oriented
    pixels without the tag). Returns how many were written; raises ``ValueError`` naming what could not be found."""
    import fsspec

    from pipeline.inputs.decode import IMAGE_EXTENSIONS
    from pipeline.annotate.ledger import Ledger
    from pipeline.annotate.outputs import source_refs
    from pipeline.inputs.sources import open_shard

    storage_options = dict(storage_options or {})
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    root = root.rstrip("/")
    ledger = Ledger(fs, root)
    wanted: dict[str, dict[str, str]] = {}
    for im in images:
        wanted.setdefault(im["ovsam_shard"], {})[im["ovsam_key"]] = im["file_name"]
    refs = source_refs(fs, root, sorted(wanted), ledger.manifests(), ledger.run_record(), shards, storage_options)
    lost = [s for s in wanted if s not in refs]
    if lost:
        raise ValueError(f"--images-dir: the inputs of {len(lost)} shard(s) (e.g. {lost[0]}) were not found; pass "
                         "--shards with the annotated inputs")
    out_fs, out_root = fsspec.core.url_to_fs(images_dir, **storage_options)
    out_root = out_root.rstrip("/")
    written = 0
    for shard, keys in wanted.items():
        reader = open_shard(refs[shard], storage_options)
        for sample in reader:
            name = keys.pop(sample.key, None)
            if name is None:
                continue
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample.files), None)
            if ext is None:
                raise ValueError(f"{shard}/{sample.key}: the input no longer holds its image")
            path = f"{out_root}/{name}"
            out_fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with out_fs.open(path, "wb") as f:
                f.write(upright_image_bytes(sample.files[ext], f"{shard}/{sample.key}"))
            written += 1
        if keys:
            raise ValueError(f"--images-dir: {len(keys)} image(s) of shard {shard} (e.g. {next(iter(keys))}) are not "
                             f"in its input {refs[shard].url}")
    return written


def upright_image_bytes(data: bytes, name: str = "image") -> bytes:
    """An image file in the frame of its masks. The decoder (``pipeline.inputs.decode``) applies an EXIF orientation
    2..8 (Pillow also reads one from XMP, and applies a TIFF's itself on loading), so a tool that ignores the tag
    would see such an image turned against its masks. Such an image is re-encoded in its own format with the
    decoder's oriented pixels and without the tag: losslessly (PNG, WebP, TIFF, ...), a JPEG at quality 95 with 4:2:0
    chroma where it had that, else 4:4:4 (``UPRIGHT_SAVE``); its other EXIF data (JPEG, PNG, WebP) and ICC profile
    are kept, and a multi-frame file keeps its first frame, the one annotated. Every other image, one with an
    unusable orientation included, is returned as is, byte for byte. The decoder's own ``apply_orientation`` decides."""
    from PIL import Image

    from pipeline.inputs.decode import IMAGE_FORMATS, apply_orientation

    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Exception as exc:  # it was decoded when annotated; copy what is there rather than fail the export
        logger.warning("%s: cannot open the image to check its orientation (%s); copied as stored", name, exc)
        return data
    with img:
        fmt = img.format or ""
        stored = _orientation_tag(img)
        if isinstance(stored, bool) or not isinstance(stored, int) or not 2 <= stored <= 8:
            return data  # no orientation to apply (the decoder ignores an unusable one): not even decoded
        try:
            img.load()  # as the decoder does; Pillow applies a TIFF's orientation here, and drops its tag
        except Exception as exc:
            logger.warning("%s: cannot decode the image to check its orientation (%s); copied as stored", name, exc)
            return data
        upright = apply_orientation(img, [])
        if upright is img and _orientation_tag(img) == stored:  # neither the decoder nor Pillow turned it
            return data
        options = dict(UPRIGHT_SAVE.get(fmt, {}))
        if fmt in ("JPEG", "MPO"):
            from PIL import JpegImagePlugin

            options["subsampling"] = 2 if JpegImagePlugin.get_sampling(img) == 2 else 0
        exif = img.getexif()
        exif.pop(0x0112, None)  # the orientation, from EXIF or (as Pillow reads it) XMP; XMP is not written
        if len(exif) and fmt in ("JPEG", "MPO", "PNG", "WEBP"):  # a TIFF's "EXIF" is its own image directory
            options["exif"] = exif.tobytes()
        if img.info.get("icc_profile") and fmt not in ("GIF", "BMP"):
            options["icc_profile"] = img.info["icc_profile"]
        out = io.BytesIO()
        upright.save(out, format="JPEG" if fmt == "MPO" else fmt, **options)
        return out.getvalue()


def _orientation_tag(img: Any) -> Any:
    """The orientation Pillow reads (EXIF, else XMP), or None."""
    try:
        return img.getexif().get(0x0112)
    except Exception:  # an unreadable EXIF block: the decoder leaves the pixels as stored
        return None
