"""The training shard format: sidecar records, classes files, shard index and sample keys validate and round-trip.

Run time: well under a second.
"""

from __future__ import annotations

import json

import pytest

from schemas.training import (MAX_KEY_LENGTH, ClassesFile, ShardEntry, TrainingRecord, index_from_json,
                              index_to_json, is_valid_key, make_key)

RLE = {"size": [4, 6], "counts": "PP0"}


def _mask_record(**changes):
    fields = {"dataset": "coco", "kind": "mask", "width": 6, "height": 4, "source_id": 7, "labels": [3, -1],
              "boxes": [[0, 0, 2, 2], [1.5, 1, 6, 4]], "masks": [RLE, RLE]}
    fields.update(changes)
    return fields


def test_record_round_trips_through_json():
    rec = TrainingRecord(**_mask_record())
    text = rec.to_json()
    assert json.loads(text) == {"dataset": "coco", "kind": "mask", "width": 6, "height": 4, "source_id": 7,
                                "labels": [3, -1], "boxes": [[0.0, 0.0, 2.0, 2.0], [1.5, 1.0, 6.0, 4.0]],
                                "masks": [RLE, RLE], "image_labels": []}
    assert TrainingRecord.from_json(text) == rec and TrainingRecord.from_json(text.encode()) == rec
    image = TrainingRecord(dataset="in21k", kind="image", width=3, height=5, source_id="n01/a.JPEG",
                           image_labels=[12])
    assert TrainingRecord.from_json(image.to_json()) == image


@pytest.mark.parametrize("changes, field", [
    ({"dataset": ""}, "'dataset'"),
    ({"kind": "segment"}, "'kind'"),
    ({"width": 0}, "'width'"),
    ({"height": 2.5}, "'height'"),
    ({"source_id": True}, "'source_id'"),
    ({"source_id": 1.5}, "'source_id'"),
    ({"labels": [3, -2]}, r"'labels'\[1\]"),
    ({"labels": [3]}, "'labels': expected one label per box"),
    ({"boxes": [[0, 0, 2], [0, 0, 1, 1]]}, r"'boxes'\[0\]"),
    ({"boxes": [[0, 0, 2, 2], [3, 0, 1, 1]]}, r"'boxes'\[1\]: expected x0 <= x1"),
    ({"boxes": [[0, 0, 2, 2], [0, 0, float("nan"), 1]]}, r"'boxes'\[1\]"),
    ({"masks": [RLE]}, "'masks': expected one mask per box"),
    ({"masks": [RLE, {"size": [6, 4], "counts": "PP0"}]}, r"'masks'\[1\]\['size'\]"),
    ({"masks": [RLE, {"size": [4, 6], "counts": [1, 2]}]}, r"'masks'\[1\]"),
    ({"image_labels": [1]}, "'image_labels'"),
    ({"kind": "box"}, "'masks'"),
    ({"kind": "image"}, "'boxes'"),
])
def test_record_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        TrainingRecord(**_mask_record(**changes))


def test_record_from_json_rejects_unknown_missing_and_non_json():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['score'\]"):
        TrainingRecord.from_json(json.dumps({**_mask_record(), "score": 1}))
    with pytest.raises(ValueError, match="'source_id': missing"):
        TrainingRecord.from_json(json.dumps({k: v for k, v in _mask_record().items() if k != "source_id"}))
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainingRecord.from_json(b'{"dataset": ')
    with pytest.raises(ValueError, match="'image_labels'"):
        TrainingRecord(dataset="x", kind="image", width=1, height=1, source_id=1)  # image-level needs a label


def test_classes_file_round_trip_and_errors():
    cf = ClassesFile(dataset="lvis", kind="mask", classes=["aerosol can,spray can", "bow"], split=["base", "novel"],
                     ids=[1, 2], source={"packer": "coco"})
    data = json.loads(cf.to_json())
    assert data["format"] == "ovsam-classes" and data["version"] == 1
    assert ClassesFile.from_json(cf.to_json()) == cf
    assert ClassesFile(dataset="sa1b", kind="mask", classes=[]).class_agnostic
    for changes, field in (({"split": ["base"]}, "'split'"), ({"split": ["base", "rare"]}, r"'split'\[1\]"),
                           ({"classes": ["a", " , "]}, r"'classes'\[1\]"), ({"ids": [1, None]}, r"'ids'\[1\]"),
                           ({"format": "other"}, "'format'"), ({"kind": "points"}, "'kind'")):
        with pytest.raises(ValueError, match=field):
            ClassesFile.from_dict({**data, **changes})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['extra'\]"):
        ClassesFile.from_dict({**data, "extra": 1})


def test_index_round_trip_and_errors():
    entry = ShardEntry(num_samples=3, bytes=20480, first_item=0, num_items=4, sha256="a" * 64)
    index = {"x-000001.tar": entry, "x-000000.tar": entry}
    text = index_to_json(index)
    assert list(json.loads(text)) == ["x-000000.tar", "x-000001.tar"]
    assert index_from_json(text) == index
    bad = json.loads(text)
    bad["x-000001.tar"]["num_items"] = 2
    with pytest.raises(ValueError, match="'x-000001.tar'.*'num_items': expected >= num_samples"):
        index_from_json(json.dumps(bad))
    bad["x-000001.tar"] = {"num_samples": 3}
    with pytest.raises(ValueError, match="'x-000001.tar'"):
        index_from_json(json.dumps(bad))
    with pytest.raises(ValueError, match="'sha256'"):
        ShardEntry(num_samples=1, bytes=1, first_item=0, num_items=1, sha256="xyz")


def test_keys_are_tar_safe_and_distinct():
    assert make_key(391895) == "391895"
    assert make_key("n01440764", "n01440764_10026") == "n01440764/n01440764_10026"
    dotted, underscored = make_key("a.b"), make_key("a_b")
    assert underscored == "a_b" and dotted.startswith("a_b_") and dotted != underscored and "." not in dotted
    long_key = make_key("x" * 200)
    assert len(long_key) <= MAX_KEY_LENGTH and long_key != make_key("x" * 199)
    for key in (dotted, long_key, make_key("../etc", "pass wd"), make_key("ünïcode")):
        assert is_valid_key(key), key
    assert not is_valid_key("a.b") and not is_valid_key("/abs") and not is_valid_key("a//b")
    with pytest.raises(ValueError, match="non-empty"):
        make_key("a", "")
