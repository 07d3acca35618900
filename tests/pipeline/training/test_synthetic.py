"""The synthetic world: exact visible masks and boxes, deterministic shards the job's reader accepts."""

from __future__ import annotations

import json

import numpy as np

from ovsam.masks import decode_rle
from pipeline.inputs.decode import decode_sample
from pipeline.inputs.sources import iter_samples
from pipeline.training.synthetic import CLASS_NAMES, COLOURS, draw_scene, write_shards


def test_visible_masks_are_disjoint_and_boxed_and_coloured():
    rng = np.random.default_rng(3)
    for _ in range(5):
        image, objects = draw_scene(rng, 240, 320, 4)
        assert image.shape == (240, 320, 3) and image.dtype == np.uint8 and objects
        union = np.zeros((240, 320), dtype=int)
        for obj in objects:
            assert obj.name in CLASS_NAMES
            union += obj.mask
            ys, xs = np.nonzero(obj.mask)
            assert obj.box_xyxy == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            mean = image[obj.mask].astype(float).mean(axis=0)
            nearest = min(COLOURS, key=lambda c: np.abs(mean - np.array(COLOURS[c])).sum())
            assert nearest == obj.name.split()[0] and np.abs(mean - COLOURS[nearest]).max() < 45, (obj.name, mean)
        assert union.max() == 1


def test_shards_are_deterministic_and_read_back(tmp_path):
    a = write_shards(tmp_path / "a", num_shards=2, samples_per_shard=3, seed=5, bad_samples=True)
    b = write_shards(tmp_path / "b", num_shards=2, samples_per_shard=3, seed=5, bad_samples=True)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    statuses = {}
    for path in a:
        reader = iter_samples(str(path))
        for sample in reader:
            decoded = decode_sample(sample, require_prompts=True)
            statuses[sample.key] = decoded.status
            if decoded.status == "ok":
                side = json.loads(sample.files["json"])
                masks = decode_rle(side["masks"])
                assert masks.shape == (len(side["boxes"]), decoded.height, decoded.width)
                assert len(decoded.boxes_xyxy) == len(side["labels"]) == masks.shape[0]
        assert not reader.report.truncated
        assert reader.report.samples_read == json.loads(path.with_suffix(".idx.json").read_text())["num_samples"]
    assert statuses.pop("000001/truncated-jpeg") == "decode_error"
    assert statuses.pop("000001/broken-sidecar") == "bad_prompt"
    assert set(statuses.values()) == {"ok"} and len(statuses) == 6
