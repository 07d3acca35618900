"""Sample decoding: every bad-input kind gets the right status and reason; pixels come out as expected RGB."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.inputs.decode import STATUSES, ImageDecodeError, decode_image, decode_sample
from pipeline.inputs.sidecar import validate_sidecar_prompts
from pipeline.inputs.sources import Sample, iter_samples
from tests.pipeline import corpus, hostile_corpus


def _sample(case: corpus.CorpusCase) -> Sample:
    """The sample the reader would build: member extensions lowercased."""
    return Sample(key=case.key, files={ext.lower(): data for ext, data in case.members.items()}, shard="test")


ALL_CASES = (corpus.good_cases() + corpus.bad_input_cases() + hostile_corpus.image_format_cases()
             + hostile_corpus.sidecar_cases())


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.kind)
def test_every_case_gets_its_status_and_reason(case: corpus.CorpusCase) -> None:
    plain = decode_sample(_sample(case))
    strict = decode_sample(_sample(case), require_prompts=True)
    assert plain.status == case.status, plain.error
    assert strict.status == case.required_status, strict.error
    assert plain.status in STATUSES
    assert case.reason_matches(plain.error), plain.error
    assert plain.key == case.key and plain.shard == "test"
    if plain.status == "ok":
        assert plain.error is None
        assert plain.image is not None and plain.image.dtype == np.uint8 and plain.image.ndim == 3
        assert plain.image.shape == (plain.height, plain.width, 3) and plain.image.flags.c_contiguous
    else:
        assert plain.error
    if plain.status == "bad_prompt":
        # The image still decodes, so its size is known for the status row.
        assert plain.width and plain.height and plain.image is not None
    if plain.status == "decode_error":
        assert plain.image is None


def test_corpus_shards_decode_as_expected(tmp_path) -> None:
    expectations = corpus.write_corpus(tmp_path)
    seen = 0
    for stem, exp in expectations.items():
        for sample in iter_samples(exp.path):
            case = exp.samples[sample.key]
            decoded = decode_sample(sample)
            assert decoded.status == case.status, (stem, sample.key, decoded.error)
            assert case.reason_matches(decoded.error), (stem, sample.key, decoded.error)
            strict = decode_sample(sample, require_prompts=True)
            assert strict.status == case.required_status, (stem, sample.key, strict.error)
            seen += 1
    assert seen == sum(e.samples_read for e in expectations.values())


def test_exif_orientation_swaps_size_and_rotates_pixels() -> None:
    raw = Image.open(io.BytesIO(corpus.exif_rotated_jpeg(6)))
    assert raw.size == (40, 20)
    image, fmt, _ = decode_image(corpus.exif_rotated_jpeg(6))
    assert fmt == "jpeg" and image.shape == (40, 20, 3)
    top, bottom = image[5, 10].astype(int), image[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60, top  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    s = decode_sample(Sample("k", {"jpg": corpus.exif_rotated_jpeg(6),
                                   "json": corpus.sidecar(boxes=[[0, 0, 30, 39]])}, "t"))
    assert (s.width, s.height) == (20, 40)
    np.testing.assert_array_equal(s.boxes_xyxy, [[0, 0, 20, 39]])  # clipped to the oriented width


def test_16bit_png_maps_high_byte() -> None:
    values = np.array([[0, 255, 256, 32768, 65280, 65535]], dtype=np.uint16)
    image, fmt, _ = decode_image(corpus.png16(values))
    assert fmt == "png" and image.shape == (1, 6, 3)
    np.testing.assert_array_equal(image[0, :, 0], [0, 0, 1, 128, 255, 255])
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_mode_conversions() -> None:
    rgba, _, _ = decode_image(corpus.rgba_png())
    np.testing.assert_array_equal(rgba[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(rgba[0, 63], [255, 255, 255])  # transparent -> white background
    la, _, _ = decode_image(corpus.la_png())
    np.testing.assert_array_equal(la[0, 0], [100, 100, 100])
    np.testing.assert_array_equal(la[0, 63], [255, 255, 255])
    pal, _, _ = decode_image(corpus.palette_transparent_png())
    np.testing.assert_array_equal(pal[0, 0], [0, 255, 0])
    np.testing.assert_array_equal(pal[0, 15], [255, 255, 255])  # palette index 0 is transparent
    cmyk, _, _ = decode_image(corpus.cmyk_jpeg())
    reference = corpus.gradient_rgb().astype(int)
    assert np.abs(cmyk.astype(int) - reference).mean() < 8
    gray, _, _ = decode_image(corpus.gray_png())
    np.testing.assert_array_equal(gray[..., 0], corpus.gradient_rgb()[..., 0])
    bilevel, _, _ = decode_image(corpus.bilevel_png())
    assert set(np.unique(bilevel)) <= {0, 255}
    ycbcr = corpus.encode(Image.fromarray(corpus.gradient_rgb()).convert("YCbCr"), "JPEG", quality=95)
    out, _, _ = decode_image(ycbcr)
    assert np.abs(out.astype(int) - reference).mean() < 8
    webp, fmt, _ = decode_image(corpus.good_webp())
    assert fmt == "webp"
    np.testing.assert_array_equal(webp, corpus.gradient_rgb())


def test_truncated_images_fail_even_if_process_allows_truncation(monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    s = decode_sample(Sample("k", {"jpg": corpus.truncated(corpus.good_jpeg(256, 192))}, "t"))
    assert s.status == "decode_error" and "truncated" in s.error
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_pixel_limit_is_checked_before_decoding() -> None:
    small = decode_sample(Sample("k", {"png": corpus.good_png(64, 48)}, "t"), max_pixels=64 * 48 - 1)
    assert small.status == "decode_error" and "64x48 = 3072 pixels, over max_pixels=3071" in small.error
    assert decode_sample(Sample("k", {"png": corpus.good_png(64, 48)}, "t"), max_pixels=64 * 48).status == "ok"


def test_sample_read_errors_and_missing_image_keep_sidecar() -> None:
    side = corpus.sidecar(boxes=[[1, 1, 5, 5]], note="kept")
    s = decode_sample(Sample("k", {"json": side}, "t"))
    assert s.status == "decode_error" and "no image member" in s.error and s.sidecar["note"] == "kept"
    s = decode_sample(Sample("k", {"jpg": corpus.good_jpeg()}, "t", errors=["member 'k.jpg' is too big"]))
    assert s.status == "decode_error" and "too big" in s.error
    s = decode_sample(Sample("k", {"json": b"{bad"}, "t"))
    assert s.status == "decode_error" and any("malformed sidecar" in n for n in s.notes)


def test_validate_sidecar_prompts_drops_clips_and_aligns() -> None:
    sidecar = {"boxes": [[-5, -5, 10, 10], [math.inf, 0, 1, 1], [10, 10, 10, 20], [70, 0, 90, 10],
                         [30, 20, 20, 40], [5, 5, 60, 40]],
               "scores": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "labels": ["a", "b", "c", "d", "e", 7],
               "points": [[1, 1], [float("nan"), 2], [100, 1], [64, 48]]}
    boxes, points, scores, labels, dropped = validate_sidecar_prompts(sidecar, 64, 48)
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 10], [5, 5, 60, 40]])
    assert boxes.dtype == np.float64 and boxes.shape == (2, 4)
    assert scores == [0.1, 0.6] and labels == ["a", "7"]
    np.testing.assert_array_equal(points, [[1, 1], [64, 48]])
    reasons = dict(dropped)
    assert "non-finite" in reasons["boxes[1]"] and "zero or negative area" in reasons["boxes[2]"]
    assert "entirely outside" in reasons["boxes[3]"] and "zero or negative area" in reasons["boxes[4]"]
    assert "non-finite" in reasons["points[1]"] and "outside" in reasons["points[2]"]
    empty = validate_sidecar_prompts({"caption": "x"}, 10, 10)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0, 2) and empty[4] == []


@pytest.mark.parametrize("sidecar, message", [
    ({"boxes": [[1, 2, 3]]}, "list of 4 numbers"),
    ({"boxes": [[1, 2, 3, True]]}, "must be numeric"),
    ({"boxes": {"a": 1}}, "'boxes' must be a list"),
    ({"boxes": [[1, 2, 3, 4]], "scores": [0.5, 0.6]}, "'scores' has 2 entries but 'boxes' has 1"),
    ({"boxes": [[1, 2, 3, 4]], "scores": ["high"]}, "scores[0] must be a number"),
    ({"points": [[1, "a"]]}, "must be numeric"),
    ([1, 2], "must be a JSON object"),
])
def test_malformed_prompts_raise(sidecar, message) -> None:
    with pytest.raises(ValueError) as info:
        validate_sidecar_prompts(sidecar, 64, 48)
    assert message in str(info.value)


def test_huge_json_numbers_and_deep_nesting_do_not_escape() -> None:
    image = corpus.good_jpeg()
    big = b'{"boxes": [[1, 1, 1' + b"0" * 400 + b', 20]], "scores": [1' + b"0" * 400 + b"]}"
    s = decode_sample(Sample("k", {"jpg": image, "json": big}, "t"))
    # Beyond the float range means infinite: dropped like any non-finite coordinate, not an exception.
    assert s.status == "ok" and s.boxes_xyxy.shape == (0, 4)
    assert s.dropped_prompts and "non-finite" in s.dropped_prompts[0][1]
    deep = b"[" * 100000 + b"]" * 100000
    s = decode_sample(Sample("k", {"jpg": image, "json": deep}, "t"))
    assert s.status == "bad_prompt" and "nested too deeply" in s.error


def test_concurrent_decodes_stay_strict() -> None:
    from concurrent.futures import ThreadPoolExecutor

    cut = Sample("k", {"jpg": corpus.truncated(corpus.good_jpeg(256, 192))}, "t")
    good = Sample("g", {"jpg": corpus.good_jpeg(256, 192)}, "t")
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(decode_sample, [cut, good] * 20))
    assert [r.status for r in results] == ["decode_error", "ok"] * 20
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----------------------------------------------------------------------------------------------------------------
# Formats, orientation, modes


def _quadrants_png(orientation: int) -> tuple[bytes, np.ndarray]:
    """A 6x4 image with four distinct quadrants (lossless), tagged with EXIF ``orientation``; and its pixels."""
    arr = np.zeros((4, 6, 3), dtype=np.uint8)
    arr[:2, :3], arr[:2, 3:], arr[2:, :3], arr[2:, 3:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
    arr[0, 0] = (9, 9, 9)  # breaks the remaining symmetry
    exif = Image.Exif()
    exif[0x0112] = orientation
    return corpus.encode(Image.fromarray(arr), "PNG", exif=exif.tobytes()), arr


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_shows_the_image_upright(orientation: int) -> None:
    from PIL import ImageOps

    data, stored = _quadrants_png(orientation)
    upright = {1: stored, 2: stored[:, ::-1], 3: stored[::-1, ::-1], 4: stored[::-1],
               5: stored.transpose(1, 0, 2), 6: np.rot90(stored, -1), 7: np.rot90(stored, 2).transpose(1, 0, 2),
               8: np.rot90(stored, 1)}[orientation]
    image, fmt, notes = decode_image(data)
    assert fmt == "png" and notes == []
    np.testing.assert_array_equal(image, upright)
    # Pillow's own transposition agrees (an independent statement of the EXIF table)
    np.testing.assert_array_equal(image, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))))


@pytest.mark.parametrize("orientation, note", [(0, "orientation 0 is not one of 1..8"),
                                               (9, "orientation 9 is not one of 1..8")])
def test_invalid_orientations_leave_pixels_as_stored(orientation: int, note: str) -> None:
    image, _, notes = decode_image(hostile_corpus.oriented_jpeg(orientation))
    assert image.shape == (20, 40, 3) and any(note in n for n in notes)
    image, _, notes = decode_image(hostile_corpus.exif_orientation_ascii())
    assert image.shape == (48, 64, 3) and any("orientation 'x' is not one of 1..8" in n for n in notes)


def test_float_and_int_tiffs_scale_over_finite_values() -> None:
    image, fmt, _ = decode_image(hostile_corpus.tiff("float"))
    assert fmt == "tiff" and image.shape == (48, 64, 3)
    gray = image[..., 0].astype(int)
    assert gray[0, 0] == 0 and gray[0, 1] == 255 and gray[0, 2] == 0  # NaN, +inf, -inf
    assert gray[0, 3] <= 1 and gray[-1, -1] == 255  # finite range -1..1 spans 0..255
    assert np.all(np.diff(gray.ravel()[3:]) >= 0)  # monotonic like the input ramp
    image, _, _ = decode_image(hostile_corpus.tiff("int"))  # -1000 .. 2071
    assert image[0, 0, 0] == 0 and image[-1, -1, 0] == 255
    image, _, _ = decode_image(hostile_corpus.tiff("16bit"))
    np.testing.assert_array_equal(image[0, :, 0], (np.linspace(0, 65535, 64).astype(np.uint16) >> 8))


def test_animated_images_give_their_first_frame() -> None:
    for data in (hostile_corpus.gif(animated=True), corpus.encode(
            Image.fromarray(corpus.gradient_rgb()), "WEBP", lossless=True, save_all=True,
            append_images=[Image.new("RGB", (64, 48))])):
        image, fmt, notes = decode_image(data)
        assert any("several frames" in n for n in notes), fmt
        assert image.std() > 10  # the gradient, not the black second frame


def test_content_decides_the_decoder_and_other_formats_are_refused() -> None:
    image, fmt, notes = decode_image(corpus.good_jpeg(), extension="png")
    assert fmt == "jpeg" and notes == ["member .png holds jpeg data; decoded as jpeg"]
    ico = corpus.encode(Image.fromarray(corpus.gradient_rgb()), "ICO")
    assert Image.open(io.BytesIO(ico)).format == "ICO"  # Pillow itself would decode it
    with pytest.raises(ImageDecodeError, match="looks like an ICO icon, which is not decoded"):
        decode_image(ico)
    s = decode_sample(Sample("k", {"jpg": corpus.good_jpeg(), "png": corpus.good_png()}, "t"))
    assert s.status == "ok" and s.source_format == "jpeg" and "several image members (jpg, png)" in s.notes[0]
    s = decode_sample(Sample("k", {"heic": hostile_corpus.heic_bytes()}, "t"))
    assert s.status == "decode_error" and s.error.startswith("image member .heic is in a format that is not decoded")


def test_ancillary_crc_errors_fail_even_if_process_allows_truncation(monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    bad = hostile_corpus.png_with_chunk(b"tEXt", b"k\0v", bad_crc=True)
    with pytest.raises(ImageDecodeError, match="bad header checksum"):
        decode_image(bad)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_extreme_aspect_ratios_decode() -> None:
    # The model stage must cope with these too; decoding keeps every pixel.
    for w, h in ((1, 20000), (20000, 1)):
        image, _, _ = decode_image(corpus.encode(Image.new("RGB", (w, h), (1, 2, 3)), "PNG"))
        assert image.shape == (h, w, 3)


# ----------------------------------------------------------------------------------------------------------------
# Sidecar limits and encodings


def test_sidecar_size_limit_and_prompt_cap() -> None:
    image = corpus.good_jpeg()
    side = corpus.sidecar(boxes=[[1, 1, 9, 9]] * 50, points=[[2, 2]] * 10)
    s = decode_sample(Sample("k", {"jpg": image, "json": side}, "t"), max_sidecar_bytes=len(side) - 1)
    assert s.status == "bad_prompt" and f"{len(side)} bytes, over the limit of {len(side) - 1}" in s.error
    assert s.width == 64 and s.image is not None
    s = decode_sample(Sample("k", {"jpg": image, "json": side}, "t"), max_prompts=45)
    assert s.status == "ok" and s.boxes_xyxy.shape == (45, 4) and s.points.shape == (0, 2)
    assert s.num_prompts_dropped == 15 and len(s.dropped_prompts) == 15
    assert all("over the limit of 45 prompts" in r for _, r in s.dropped_prompts)
    s = decode_sample(Sample("k", {"jpg": image, "json": side}, "t"), max_prompts=55)
    assert s.boxes_xyxy.shape == (50, 4) and s.points.shape == (5, 2) and s.num_prompts_dropped == 5


def test_dropped_prompt_listing_is_capped_but_counted() -> None:
    from pipeline.inputs.decode import MAX_LISTED_DROPS

    side = corpus.sidecar(boxes=[[5, 5, 5, 5]] * 5000)
    s = decode_sample(Sample("k", {"jpg": corpus.good_jpeg(), "json": side}, "t"), require_prompts=True)
    assert s.status == "no_prompts" and s.num_prompts_dropped == 5000
    assert len(s.dropped_prompts) == MAX_LISTED_DROPS + 1
    assert s.dropped_prompts[-1] == ("...", f"and {5000 - MAX_LISTED_DROPS} more prompts dropped")
    assert len(s.error) < 1000


def test_sidecar_encodings_and_labels_reach_arrow() -> None:
    import pyarrow as pa

    image = corpus.good_jpeg()
    for data in (b"\xef\xbb\xbf" + corpus.sidecar(boxes=[[1, 1, 9, 9]], labels=["é"]),
                 json.dumps({"boxes": [[1, 1, 9, 9]], "labels": ["é"]}).encode("utf-16"),
                 json.dumps({"boxes": [[1, 1, 9, 9]], "labels": ["é"]}).encode("utf-32")):
        s = decode_sample(Sample("k", {"jpg": image, "json": data}, "t"))
        assert s.status == "ok" and s.labels == ["é"], s.error
    s = decode_sample(Sample("k", {"jpg": image, "json": b'{"boxes": [[1, 1, 9, 9]], "labels": ["\\udc80x"]}'},
                             "t"))
    assert s.labels == ["\\udc80x"]
    pa.array(s.labels)  # a lone surrogate would make the Parquet writer fail the whole shard
    s = decode_sample(Sample("k", {"jpg": image, "json": "{\"labels\": [\"caf\xe9\"]}".encode("latin-1")}, "t"))
    assert s.status == "bad_prompt" and "not UTF-8" in s.error


@pytest.mark.parametrize("value", ['""', "0", "false", "{}", '"1,2,3,4"'])
def test_falsy_or_scalar_prompt_lists_are_malformed_not_empty(value: str) -> None:
    data = b'{"boxes": ' + value.encode() + b"}"
    s = decode_sample(Sample("k", {"jpg": corpus.good_jpeg(), "json": data}, "t"))
    assert s.status == "bad_prompt" and "'boxes' must be a list" in s.error


def test_messages_quote_at_most_a_little_of_the_input() -> None:
    data = json.dumps({"boxes": [["x" * 100000, 1, 2, 3]]}).encode()
    s = decode_sample(Sample("k", {"jpg": corpus.good_jpeg(), "json": data}, "t"))
    assert s.status == "bad_prompt" and len(s.error) < 300


def test_prompt_modes_without_sidecar_prompts_ignore_a_bad_sidecar() -> None:
    broken = Sample("k", {"jpg": corpus.good_jpeg(), "json": b'{"boxes": [[1, 2, 3'}, "t")
    assert decode_sample(broken).status == "bad_prompt"
    ignored = decode_sample(broken, use_sidecar_prompts=False)
    assert ignored.status == "ok" and ignored.image is not None and not ignored.has_prompts
    assert any("sidecar ignored" in n and "malformed" in n for n in ignored.notes)
    labels_only = Sample("k", {"jpg": corpus.good_jpeg(), "json": b'{"labels": ["cat"]}'}, "t")
    assert decode_sample(labels_only, use_sidecar_prompts=False).status == "ok"
