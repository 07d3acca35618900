"""Label Studio's ML backend contract without a server: the labelling config, the smart-tool context, and brush
RLE that Label Studio's own decoder (``label_studio_converter.brush``, the converter Label Studio ships) reads
back to our mask's pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.serving.labelstudio import (LabelConfig, brush_result, context_prompts, parse_label_config,
                                          predict_response, resolve_task_url, task_image_url)

CONFIG = """<View>
  <Image name="img" value="$photo" zoom="true"/>
  <KeyPointLabels name="kp" toName="img" smart="true"><Label value="object" smart="true"/></KeyPointLabels>
  <BrushLabels name="mask" toName="img"><Label value="dog"/><Label value="cat"/><Label value="dog"/></BrushLabels>
</View>"""


def test_label_config_names_the_brush_tag_its_image_and_the_vocabulary():
    cfg = parse_label_config(CONFIG)
    assert cfg == LabelConfig(brush_name="mask", image_name="img", image_key="photo", brush_labels=("dog", "cat"))


@pytest.mark.parametrize("xml, words", [
    ("<View><Image name='i' value='$im'/>", "not valid XML"),
    ("<View><Image name='i' value='$im'/><RectangleLabels name='r' toName='i'><Label value='a'/>"
     "</RectangleLabels></View>", "no <BrushLabels>"),
    ("<View><Image name='i' value='$im'/><BrushLabels name='b' toName='other'><Label value='a'/></BrushLabels>"
     "</View>", "toName='other'"),
    ("<View><Image name='i' value='im'/><BrushLabels name='b' toName='i'><Label value='a'/></BrushLabels>"
     "</View>", "value=\"$key\""),
    ("<View><Image name='i' value='$im'/><BrushLabels name='b' toName='i'></BrushLabels></View>", "no <Label"),
])
def test_bad_label_configs_say_what_is_missing(xml, words):
    with pytest.raises(ValueError) as e:
        parse_label_config(xml)
    assert words in str(e.value)


def _kp(x, y, positive=None, w=200, h=100):
    r = {"type": "keypointlabels", "original_width": w, "original_height": h, "from_name": "kp", "to_name": "img",
         "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["object"]}}
    if positive is not None:
        r["is_positive"] = positive
    return r


def test_context_is_converted_from_percent_to_pixels():
    rect = {"type": "rectanglelabels", "original_width": 200, "original_height": 100,
            "value": {"x": 10.0, "y": 20.0, "width": 50.0, "height": 40.0, "rectanglelabels": ["object"]}}
    got = context_prompts({"result": [_kp(25.0, 50.0, True), _kp(75.0, 10.0, False), _kp(50.0, 50.0), rect]})
    assert got.points == [[50.0, 50.0, 1], [150.0, 10.0, 0], [100.0, 50.0, 1]]
    assert got.box == [20.0, 20.0, 120.0, 60.0]
    assert (got.width, got.height) == (200, 100)


@pytest.mark.parametrize("result, words", [
    ([], "non-empty"),
    (["x"], "result[0] must be an object"),
    ([_kp(10, 10), _kp(10, 10, w=300)], "the ones before for 200x100"),
    ([_kp(math.nan, 10)], "value.x must be a finite number"),
    ([{**_kp(10, 10), "original_width": 0}], "image size of 0x100"),
    ([{**_kp(10, 10), "type": "polygonlabels"}], "keypointlabels or rectanglelabels"),
])
def test_malformed_context_is_refused_with_the_entry_named(result, words):
    with pytest.raises(ValueError) as e:
        context_prompts({"result": result})
    assert words in str(e.value)


def test_task_urls():
    cfg = parse_label_config(CONFIG)
    assert task_image_url({"data": {"photo": "s3://b/a.jpg"}}, cfg) == "s3://b/a.jpg"
    with pytest.raises(ValueError, match=r"data\.photo"):
        task_image_url({"data": {"image": "s3://b/a.jpg"}}, cfg)
    assert resolve_task_url("/data/upload/1/a.png", "http://ls:8080/") == "http://ls:8080/data/upload/1/a.png"
    assert resolve_task_url("https://x/y.png", None) == "https://x/y.png"
    with pytest.raises(ValueError, match="--label-studio-url"):
        resolve_task_url("/data/upload/1/a.png", None)


def _masks():
    rng = np.random.default_rng(0)
    yield "random", rng.random((37, 53)) > 0.5
    yield "blobs", np.kron(rng.random((6, 9)) > 0.6, np.ones((11, 7), dtype=bool))
    yield "empty", np.zeros((20, 30), dtype=bool)
    yield "full", np.ones((31, 17), dtype=bool)
    one = np.zeros((9, 13), dtype=bool)
    one[4, 7] = True
    yield "one pixel", one
    yield "long runs", np.pad(np.ones((300, 300), dtype=bool), ((0, 0), (0, 500)))  # runs longer than 2**16 values


@pytest.mark.parametrize("name, mask", list(_masks()), ids=[n for n, _ in _masks()])
def test_brush_rle_decodes_with_label_studios_decoder(name, mask):
    from label_studio_converter import brush

    cfg = parse_label_config(CONFIG)
    item = brush_result(mask, "cat", 0.75, cfg)
    assert item["type"] == "brushlabels" and item["from_name"] == "mask" and item["to_name"] == "img"
    assert (item["original_height"], item["original_width"]) == mask.shape
    assert item["value"]["format"] == "rle" and item["value"]["brushlabels"] == ["cat"]
    rgba = np.asarray(brush.decode_rle(item["value"]["rle"]), dtype=np.uint8).reshape(*mask.shape, 4)
    np.testing.assert_array_equal(rgba[:, :, 3] > 0, mask)
    assert set(np.unique(rgba).tolist()) <= {0, 255}
    out = predict_response([item], 0.75, "ovsam-test")
    assert out == {"results": [{"result": [item], "score": 0.75, "model_version": "ovsam-test"}],
                   "model_version": "ovsam-test"}


def test_the_builders_string_arguments_become_typed_settings():
    """``serve run pipeline.serving.app:build_app key=value`` passes strings; config files may pass typed values."""
    from pipeline.serving.settings import ServeSettings

    s = ServeSettings.from_args({"model": "ovsam-tiny", "replicas": "2", "num-gpus-per-replica": "auto",
                                 "cache_bytes": "1000", "cache_ttl": "2.5", "allow_url_prefix": "s3://a/,s3://b/",
                                 "storage_options": '{"anon": true}', "warm_up": "false", "token_env": "none"})
    assert (s.replicas, s.num_gpus_per_replica, s.cache_bytes, s.cache_ttl) == (2, None, 1000, 2.5)
    assert s.allow_url_prefix == ["s3://a/", "s3://b/"] and s.storage_options == {"anon": True}
    assert s.warm_up is False and s.token_env is None
    assert ServeSettings.from_args({"replicas": 3, "cors_origin": ["*"]}).cors_origin == ["*"]
    with pytest.raises(ValueError, match="unknown setting 'gpus'"):
        ServeSettings.from_args({"gpus": "1"})
