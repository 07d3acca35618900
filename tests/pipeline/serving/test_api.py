"""``ovsam serve`` end to end: a real Ray Serve application on loopback, answered over HTTP.

- The API's masks and labels equal ``OvsamPredictor``'s for the same image and prompts: points, boxes, mixed,
  re-clicks with ``previous``, and concurrent clicks on several images (micro-batched into one decoder call).
- A table of bad requests, each answered with its documented 4xx while good requests keep being answered.
- Label Studio's ``/predict``: its brush RLE decodes with Label Studio's own decoder to our mask.
- A soak: many images and clicks keep the feature cache within ``--cache-bytes``.
- The detect route through the replicas (a tiny random-weight OWLv2 built in each), and the page's Find box.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.pipeline.serve_fixtures import TOKEN, TOKEN_ENV, Client, free_port, png_bytes, scene

MAX_BODY = 2 * 1024 * 1024
MAX_PIXELS = 16 * 1024 * 1024
CACHE_BYTES = 40 * 1024 * 1024  # about ten ovsam-tiny images' features
LS_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="dog"/><Label value="cat"/><Label value="traffic cone"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="object" smart="true"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="object" smart="true"/></RectangleLabels>
</View>"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    from jobs.serve import start
    from pipeline.annotate.detectors.tiny import save_tiny_detector
    from pipeline.serving.app import ServeSettings, build_app

    os.environ["HF_HUB_OFFLINE"] = "1"  # the replicas load the tiny detector from a local directory
    detector = str(save_tiny_detector("owlv2", tmp_path_factory.mktemp("owlv2")))
    allowed = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    Image.fromarray(scene(7)).save(allowed / "seven.png")
    Image.fromarray(scene(8)).save(outside / "eight.png")
    os.environ[TOKEN_ENV] = TOKEN
    settings = ServeSettings(model="ovsam-tiny", precision="fp32", vocabulary="coco", token_env=TOKEN_ENV,
                             allow_url_prefix=[str(allowed)], max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS,
                             cpus_per_replica=1, max_batch_size=8, batch_wait_ms=20, cache_bytes=CACHE_BYTES,
                             detector="owlv2", detector_weights=detector)
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        start(settings, "127.0.0.1", port)
        # a second application whose images expire after a second, without a detector
        serve.run(build_app(dataclasses.replace(settings, cache_ttl=1.0, warm_up=False, detector=None,
                                                detector_weights=None)), name="short", route_prefix="/short")
        yield {"base": f"http://127.0.0.1:{port}", "allowed": allowed, "outside": outside, "settings": settings,
               "detector": detector}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server["base"])


@pytest.fixture(scope="module")
def reference():
    """The same model and vocabulary in this process (random init is seeded, so the weights are the replica's)."""
    import ovsam

    model = ovsam.build_ovsam("ovsam-tiny", precision="fp32")
    vocab = ovsam.Vocabulary.resolve("coco", model, progress=False)
    return model, vocab


def _rle(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


def _predict(predictor, body: dict, mask_input=None):
    kw = {}
    if body.get("points"):
        p = np.asarray(body["points"], dtype=float)
        kw.update(point_coords=p[:, :2], point_labels=p[:, 2])
    if body.get("box") is not None:
        kw["box"] = np.asarray(body["box"], dtype=float)
    if mask_input is not None:
        kw["mask_input"] = mask_input
    return predictor.predict(**kw)


def _assert_same(answer: dict, pred, names: list[str], top_k: int = 5) -> None:
    assert answer["mask"]["size"] == list(pred.masks[0].shape)
    assert answer["mask"]["counts"] == _rle(pred.masks[0])
    assert answer["area"] == int(pred.masks[0].sum())
    assert answer["box"] == [float(v) for v in pred.boxes_xyxy[0]]
    assert answer["mask_quality"] == pytest.approx(float(pred.iou_scores[0]), abs=1e-6)
    label = int(pred.labels[0])
    assert answer["label"] == names[label]
    assert answer["label_score"] == pytest.approx(float(pred.label_scores[0, label]), abs=1e-6)
    order = np.argsort(-pred.label_scores[0], kind="stable")[:top_k]
    assert [n for n, _ in answer["topk"]] == [names[int(k)] for k in order]


PROMPTS = [
    {"points": [[30, 40, 1]]},
    {"points": [[30, 40, 1], [90, 20, 0], [64.5, 70.25, 1]]},
    {"box": [10, 12, 80, 70]},
    {"box": [0, 0, 128, 96], "points": [[50, 50, 1], [5, 90, 0]]},
]


def test_answers_equal_the_predictor(client, reference):
    import ovsam

    model, vocab = reference
    predictor = ovsam.OvsamPredictor(model, vocab)
    for seed, (h, w) in [(0, (96, 128)), (1, (131, 77))]:
        image = scene(seed, h, w)
        up = client.upload(image)
        assert (up["width"], up["height"]) == (w, h)
        predictor.set_image(image)
        for body in PROMPTS:
            body = {k: v for k, v in body.items()}
            if "box" in body:
                body["box"] = [min(v, w if i % 2 == 0 else h) for i, v in enumerate(body["box"])]
            body["points"] = [[min(x, w), min(y, h), lab] for x, y, lab in body.get("points", [])] or None
            status, answer = client.segment(up["image_id"], **{k: v for k, v in body.items() if v is not None})
            assert status == 200, answer
            pred = _predict(predictor, body)
            _assert_same(answer, pred, vocab.names)
            # a re-click: the previous answer's low-res logits fed back, as SamPredictor's mask_input
            click = {"points": [[min(20, w), min(60, h), 1]]}
            status, again = client.segment(up["image_id"], previous=answer["previous_id"], **click)
            assert status == 200, again
            _assert_same(again, _predict(predictor, click, mask_input=pred.low_res_logits[0]), vocab.names)
            assert again["previous_id"] != answer["previous_id"]


def test_polygon_format_and_topk(client, reference):
    from pipeline.export.coco import mask_polygons

    up = client.upload(scene(3))
    status, rle = client.segment(up["image_id"], points=[[40, 40, 1]], top_k=3)
    status2, poly = client.segment(up["image_id"], points=[[40, 40, 1]], format="polygon", top_k=3)
    assert status == status2 == 200
    assert len(rle["topk"]) == 3 and rle["topk"] == poly["topk"]
    assert poly["mask"] == json.loads(json.dumps(mask_polygons(rle["mask"])))


def test_concurrent_clicks_on_many_images_equal_the_predictor(client, reference):
    import ovsam

    model, vocab = reference
    images = [scene(20 + i) for i in range(6)]
    ids = [client.upload(im)["image_id"] for im in images]
    jobs = [(i, {"points": [[10 + 13 * j, 15 + 9 * j, 1]]} if j % 2 else {"box": [5 + j, 5, 60 + 7 * j, 80]})
            for i in range(6) for j in range(3)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: client.segment(ids[job[0]], **job[1]), jobs))
    predictor = ovsam.OvsamPredictor(model, vocab)
    for (i, body), (status, answer) in zip(jobs, answers):
        assert status == 200, answer
        predictor.set_image(images[i])
        _assert_same(answer, _predict(predictor, body), vocab.names)
    status, stats = client.request("GET", "/v1/stats")
    rep = stats["replicas"][0]
    assert rep["decoder_calls"] < rep["segments"]  # some clicks shared a decoder call


def test_vocabularies(client, reference):
    import ovsam

    model, _ = reference
    names = ["red square", "blue circle", "noise"]
    status, created = client.request("POST", "/v1/vocabularies", {"names": names})
    assert status == 200 and created["size"] == 3 and created["names"] == names
    status, again = client.request("POST", "/v1/vocabularies", {"names": names})
    assert again["vocabulary_id"] == created["vocabulary_id"]
    image = scene(4)
    up = client.upload(image)
    status, answer = client.segment(up["image_id"], points=[[60, 50, 1]], vocabulary=created["vocabulary_id"])
    assert status == 200, answer
    vocab = ovsam.Vocabulary.from_names(names, model, progress=False, check_synonyms=False)
    predictor = ovsam.OvsamPredictor(model, vocab)
    predictor.set_image(image)
    _assert_same(answer, _predict(predictor, {"points": [[60, 50, 1]]}), names)
    status, listed = client.request("GET", "/v1/vocabularies")
    assert created["vocabulary_id"] in [v["vocabulary_id"] for v in listed["vocabularies"]]


def test_upload_forms_and_url(client, server):
    image = np.asarray(Image.open(server["allowed"] / "seven.png").convert("RGB"))
    boundary = "----ovsamtest"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + png_bytes(image) + f"\r\n--{boundary}--\r\n".encode()
    status, form = client.request("POST", "/v1/images", raw=body,
                                  content_type=f"multipart/form-data; boundary={boundary}")
    assert status == 200, form
    status, by_url = client.request("POST", "/v1/images", {"url": str(server["allowed"] / "seven.png")})
    assert status == 200, by_url
    assert (form["width"], form["height"]) == (by_url["width"], by_url["height"]) == (128, 96)
    a = client.segment(form["image_id"], points=[[30, 30, 1]])[1]
    b = client.segment(by_url["image_id"], points=[[30, 30, 1]])[1]
    assert a["mask"] == b["mask"] and a["label"] == b["label"]


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (5000, 4000)).save(buf, "PNG")  # 20 Mpx in ~20 KB
    return buf.getvalue()


def _bad_requests(server, image_id: str, expired_id: str):
    allowed, outside = server["allowed"], server["outside"]
    seg = f"/v1/images/{image_id}/segment"
    png = png_bytes(scene(9))
    return [
        # (name, method, path, kwargs, status, code, field)
        ("corrupt image", "POST", "/v1/images", dict(raw=png[:60] + b"\0" * 40, content_type="image/png"),
         422, "invalid_image", "image"),
        ("not an image", "POST", "/v1/images", dict(raw=b"hello world", content_type="application/octet-stream"),
         422, "invalid_image", "image"),
        ("decompression bomb", "POST", "/v1/images", dict(raw=_bomb(), content_type="image/png"),
         422, "invalid_image", "image"),
        ("empty upload", "POST", "/v1/images", dict(raw=b"", content_type="image/png"), 422, "invalid_image", "image"),
        ("oversized body", "POST", "/v1/images", dict(raw=b"\xff" * (MAX_BODY + 1), content_type="image/jpeg"),
         413, "body_too_large", "body"),
        ("text body", "POST", "/v1/images", dict(raw=b"x", content_type="text/plain"), 415,
         "unsupported_media_type", "Content-Type"),
        ("disallowed URL", "POST", "/v1/images", dict(body={"url": "http://169.254.169.254/latest/meta-data"}),
         403, "url_not_allowed", "url"),
        ("local path outside", "POST", "/v1/images", dict(body={"url": str(outside / "eight.png")}),
         403, "url_not_allowed", "url"),
        ("file URL outside", "POST", "/v1/images", dict(body={"url": f"file://{outside / 'eight.png'}"}),
         403, "url_not_allowed", "url"),
        ("path traversal", "POST", "/v1/images",
         dict(body={"url": f"{allowed}/../{outside.name}/eight.png"}), 403, "url_not_allowed", "url"),
        ("missing allowed file", "POST", "/v1/images", dict(body={"url": str(allowed / "nope.png")}),
         422, "url_unreadable", "url"),
        ("url not a string", "POST", "/v1/images", dict(body={"url": 5}), 422, "invalid_field", "url"),
        ("invalid JSON", "POST", seg, dict(raw=b"{points: [", content_type="application/json"), 400,
         "invalid_json", None),
        ("JSON array", "POST", seg, dict(body=[1, 2]), 400, "invalid_json", None),
        ("points wrong type", "POST", seg, dict(body={"points": "30,40"}), 422, "invalid_field", "points"),
        ("point wrong type", "POST", seg, dict(body={"points": [["a", 4, 1]]}), 422, "invalid_field",
         "points[0][0]"),
        ("box wrong type", "POST", seg, dict(body={"box": {"x": 1}}), 422, "invalid_field", "box"),
        ("NaN coordinate", "POST", seg, dict(raw=b'{"points": [[NaN, 3, 1]]}', content_type="application/json"),
         422, "invalid_field", "points[0][0]"),
        ("infinite box", "POST", seg, dict(raw=b'{"box": [0, 0, Infinity, 5]}', content_type="application/json"),
         422, "invalid_field", "box[2]"),
        ("point outside the image", "POST", seg, dict(body={"points": [[129, 10, 1]]}), 422, "invalid_field",
         "points[0]"),
        ("negative point", "POST", seg, dict(body={"points": [[-1, 10, 1]]}), 422, "invalid_field", "points[0]"),
        ("bad point label", "POST", seg, dict(body={"points": [[10, 10, 2]]}), 422, "invalid_field",
         "points[0][2]"),
        ("box outside the image", "POST", seg, dict(body={"box": [0, 0, 200, 50]}), 422, "invalid_field", "box"),
        ("empty box", "POST", seg, dict(body={"box": [10, 10, 10, 50]}), 422, "invalid_field", "box"),
        ("no prompt", "POST", seg, dict(body={}), 422, "invalid_field", "points"),
        ("unknown field", "POST", seg, dict(body={"points": [[1, 1, 1]], "mask": 1}), 422, "invalid_field", "mask"),
        ("top_k zero", "POST", seg, dict(body={"points": [[1, 1, 1]], "top_k": 0}), 422, "invalid_field", "top_k"),
        ("unknown format", "POST", seg, dict(body={"points": [[1, 1, 1]], "format": "png"}), 422, "invalid_field",
         "format"),
        ("unknown image id", "POST", "/v1/images/AAAAAAAAAAAAAAAAAAAAAA/segment",
         dict(body={"points": [[1, 1, 1]]}), 404, "image_not_found", "image_id"),
        ("expired image id", "POST", f"/short/v1/images/{expired_id}/segment", dict(body={"points": [[1, 1, 1]]}),
         404, "image_expired", "image_id"),
        ("unknown previous", "POST", seg, dict(body={"points": [[1, 1, 1]], "previous": "nope"}), 404,
         "previous_not_found", "previous"),
        ("unknown vocabulary", "POST", seg, dict(body={"points": [[1, 1, 1]], "vocabulary": "v-unknown"}), 404,
         "vocabulary_not_found", "vocabulary"),
        ("empty vocabulary", "POST", "/v1/vocabularies", dict(body={"names": []}), 422, "invalid_field", "names"),
        ("unknown builtin", "POST", "/v1/vocabularies", dict(body={"builtin": "imagenet1k"}), 422,
         "invalid_field", "builtin"),
        ("everything bad grid", "POST", f"/v1/images/{image_id}/everything", dict(body={"points_per_side": 0}),
         422, "invalid_field", "points_per_side"),
        ("detect empty text", "POST", f"/v1/images/{image_id}/detect", dict(body={"text": []}), 422,
         "invalid_field", "text"),
        ("detect bad threshold", "POST", f"/v1/images/{image_id}/detect",
         dict(body={"text": ["dog"], "detector_score_thresh": 2}), 422, "invalid_field", "detector_score_thresh"),
        ("detect without a detector", "POST", f"/short/v1/images/{expired_id}/detect", dict(body={"text": ["dog"]}),
         404, "detector_not_configured", None),
        ("missing token", "POST", seg, dict(body={"points": [[1, 1, 1]]}, headers={"Authorization": ""}),
         401, "unauthorized", "Authorization"),
        ("wrong token", "POST", seg, dict(body={"points": [[1, 1, 1]]},
                                          headers={"Authorization": "Bearer not-the-token"}),
         401, "unauthorized", "Authorization"),
        ("wrong basic password", "GET", "/v1/stats",
         dict(headers={"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}), 401, "unauthorized",
         "Authorization"),
        ("unknown route", "GET", "/v1/nothing", {}, 404, "not_found", None),
    ]


def test_bad_requests_get_their_4xx_and_the_server_keeps_answering(client, server):
    up = client.upload(scene(5))
    short = Client(server["base"] + "/short")
    expired = short.upload(scene(6))["image_id"]
    time.sleep(1.5)
    cases = _bad_requests(server, up["image_id"], expired)
    assert len(cases) >= 20
    for name, method, path, kwargs, status, code, field in cases:
        got_status, body = client.request(method, path, **kwargs)
        assert (got_status, body["error"]["code"], body["error"]["field"]) == (status, code, field), (name, body)
        assert body["error"]["message"], name
        ok_status, ok = client.segment(up["image_id"], points=[[20, 20, 1]])  # still answering good requests
        assert ok_status == 200, (name, ok)
    status, health = client.request("GET", "/healthz", headers={"Authorization": ""})
    assert status == 200 and health["status"] == "ok"
    status, metrics = client.request("GET", "/metrics")
    assert status == 200 and 'ovsam_serve_errors_total{method="POST",route="/v1/images",status="403"}' in metrics
    basic = "Basic " + base64.b64encode(f"labelstudio:{TOKEN}".encode()).decode()
    assert client.request("GET", "/v1/stats", headers={"Authorization": basic})[0] == 200


def test_label_studio_predict_decodes_with_label_studio(client, server, reference):
    import ovsam
    from label_studio_converter import brush

    model, _ = reference
    status, setup = client.request("POST", "/setup", {"project": "1.1700000000", "schema": LS_CONFIG})
    assert status == 200 and setup["model_version"]
    status, health = client.request("GET", "/health")
    assert status == 200 and health["status"] == "UP"
    url = str(server["allowed"] / "seven.png")
    context = {"result": [
        {"original_width": 128, "original_height": 96, "image_rotation": 0, "from_name": "kp", "to_name": "image",
         "type": "keypointlabels", "is_positive": True, "origin": "manual",
         "value": {"x": 25.0, "y": 50.0, "width": 0.5, "keypointlabels": ["object"]}},
        {"original_width": 128, "original_height": 96, "image_rotation": 0, "from_name": "kp", "to_name": "image",
         "type": "keypointlabels", "is_positive": False, "origin": "manual",
         "value": {"x": 75.0, "y": 25.0, "width": 0.5, "keypointlabels": ["object"]}},
    ]}
    request = {"tasks": [{"id": 3, "data": {"image": "file://" + url}}], "project": "1.1700000000",
               "label_config": LS_CONFIG, "params": {"login": None, "password": None, "context": context}}
    status, out = client.request("POST", "/predict", request)
    assert status == 200, out
    [prediction] = out["results"]
    [item] = prediction["result"]
    assert item["type"] == "brushlabels" and item["from_name"] == "tag" and item["to_name"] == "image"
    assert (item["original_width"], item["original_height"]) == (128, 96)
    assert item["value"]["format"] == "rle"
    decoded = np.asarray(brush.decode_rle(item["value"]["rle"]), dtype=np.uint8).reshape(96, 128, 4)[:, :, 3] > 0
    image = np.asarray(Image.open(url).convert("RGB"))
    names = ["dog", "cat", "traffic cone"]
    vocab = ovsam.Vocabulary.from_names(names, model, progress=False, check_synonyms=False)
    predictor = ovsam.OvsamPredictor(model, vocab)
    predictor.set_image(image)
    pred = predictor.predict(point_coords=np.array([[32.0, 48.0], [96.0, 24.0]]), point_labels=np.array([1, 0]))
    np.testing.assert_array_equal(decoded, pred.masks[0])
    assert item["value"]["brushlabels"] == [names[int(pred.labels[0])]]
    assert prediction["score"] == pytest.approx(float(pred.label_scores[0, pred.labels[0]]), abs=1e-6)
    # no clicks yet: no proposal, and still a well-formed answer
    status, empty = client.request("POST", "/predict", {**request, "params": {}})
    assert status == 200 and all(not r["result"] for r in empty["results"])


def test_soak_keeps_the_cache_within_its_bound(client):
    """Many distinct images and clicks: the replica's feature cache never exceeds --cache-bytes, entries are
    evicted, and the replica's memory stops growing once the cache is full."""
    def rep():
        return client.request("GET", "/v1/stats")[1]["replicas"][0]

    rss, cache = [], []
    for i in range(60):
        image_id = client.upload(scene(100 + i, 80 + i % 7, 100 + i % 11))["image_id"]
        for j in range(3):
            status, _ = client.segment(image_id, points=[[10 + j * 20, 30, 1]])
            assert status == 200
        if i % 10 == 9:
            r = rep()
            rss.append(r["rss_bytes"])
            cache.append(r["cache"])
    assert all(c["bytes"] <= CACHE_BYTES for c in cache)
    assert cache[-1]["evictions"] > 0
    # once the cache is full (from the second sample on), memory is flat within a fraction of the cache's bound
    assert max(rss[1:]) - rss[1] < CACHE_BYTES // 2, rss


def test_browser_page_segments_a_click_and_keeps_the_mask(client, server, tmp_path):
    """The page in headless chromium: token, upload through the file input, a left click, a right click, undo,
    keep; the mask overlay and its label appear, and the page's mask is the API's for the same prompts."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import ARTEFACTS, console_errors, headless_chrome

    image = scene(21, 240, 320)
    image[60:180, 100:260] = (230, 200, 40)  # one big object to click on
    path = tmp_path / "page.png"
    Image.fromarray(image).save(path)
    driver = headless_chrome(1300, 900)
    wait = WebDriverWait(driver, 120)

    def body(name):
        return driver.execute_script(f"return document.body.dataset.{name} || ''")

    try:
        driver.get(server["base"] + "/")
        wait.until(lambda d: body("ready") == "1")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda d: body("imageId") != "")
        view = driver.find_element(By.ID, "view")
        rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]",
                                     view)
        sx, sy = rect[0] / 320, rect[1] / 240  # the canvas's CSS pixels per image pixel
        # selenium offsets are from the element's centre (160, 120): click the object at (180, 120)
        ActionChains(driver).move_to_element_with_offset(view, int(20 * sx), 0).click().perform()
        wait.until(lambda d: int(body("segments") or 0) >= 1)
        page = driver.execute_script(
            "const a = state.answer; return {label: document.getElementById('mask-label').textContent, "
            "topk: document.querySelectorAll('#topk li').length, points: state.prompts.points, mask: a.mask, "
            "area: a.area, decoded: a.maskData.reduce((s, v) => s + v, 0), name: a.label, "
            "image_id: state.image.image_id}")
        assert page["label"].startswith(page["name"] + " ") and page["label"].endswith("%")
        assert page["topk"] == 5
        [[x, y, positive]] = page["points"]
        assert positive == 1 and abs(x - 180) < 2 and abs(y - 120) < 2
        status, api = client.segment(page["image_id"], points=page["points"], top_k=5)
        assert status == 200 and api["mask"] == page["mask"] and api["label"] == page["name"]
        assert page["decoded"] == page["area"] == int(mask_utils.decode(
            {"size": api["mask"]["size"], "counts": api["mask"]["counts"].encode()}).sum()) > 0
        # the overlay is drawn: inside the mask the canvas is tinted blue against the image
        tint = driver.execute_script(
            "const d = document.getElementById('view').getContext('2d').getImageData(0, 0, 320, 240).data;"
            "const m = state.answer.maskData; let blue = 0, red = 0, n = 0;"
            "for (let i = 0; i < m.length; i++) if (m[i]) { blue += d[4 * i + 2]; red += d[4 * i]; n++; }"
            "return [blue / n, red / n]")
        masked = mask_utils.decode({"size": api["mask"]["size"], "counts": api["mask"]["counts"].encode()}) > 0
        assert tint[0] > image[masked][:, 2].mean() + 20, tint
        ARTEFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTEFACTS / "serve_page_click.png"))
        ActionChains(driver).move_to_element_with_offset(view, int(-140 * sx), int(-100 * sy)).context_click() \
            .perform()
        wait.until(lambda d: int(body("segments")) >= 2)
        assert len(driver.execute_script("return state.prompts.points")) == 2
        driver.find_element(By.ID, "undo").click()
        wait.until(lambda d: len(d.execute_script("return state.prompts.points")) == 1)
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ENTER)
        wait.until(lambda d: body("instances") == "1")
        assert driver.find_element(By.ID, "download").is_enabled()
        assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
        errors = console_errors(driver)
        assert not errors, errors
        assert driver.save_screenshot(str(ARTEFACTS / "serve_page_kept.png"))
    finally:
        driver.quit()


def _detect_reference(server, image: np.ndarray, names: list[str], boxes: list[list[float]]):
    """The detector's ``detect`` (server defaults) on ``image``, and OV-SAM's prompts of ``boxes`` (the replica's
    detector boxes, which may differ from this process's in the last bits), in this process."""
    import ovsam
    from pipeline.annotate.detectors.owl import OwlDetector
    from pipeline.annotate.detectors.queries import TextQueries
    from pipeline.annotate.detectors.spec import parse_prompt_source, resolve_options

    options = resolve_options(parse_prompt_source("detector:owlv2"))
    queries = TextQueries.from_text(names)
    found = OwlDetector("owlv2", server["detector"], options=options, queries=queries).detect([image], queries)[0]
    model = ovsam.build_ovsam("ovsam-tiny", precision="fp32")
    predictor = ovsam.OvsamPredictor(model, ovsam.Vocabulary.from_names(names, model, progress=False,
                                                                        check_synonyms=False))
    predictor.set_image(image)
    return found, predictor.predict(box=np.asarray(boxes, dtype=np.float64))


def test_detect_through_the_replicas_equals_the_detector_then_box_prompts(client, server):
    from tests.pipeline.serving.test_detect import assert_detect_answer

    names = ["traffic cone", "pastry"]
    image = scene(30, 120, 160)
    up = client.upload(image)
    status, answer = client.request("POST", f"/v1/images/{up['image_id']}/detect", {"text": names})
    assert status == 200, answer
    assert (answer["detector"], answer["detector_score_thresh"], answer["max_detections"]) == ("owlv2", 0.1, 100)
    boxes = [i["detector_box"] for i in answer["instances"]]
    assert_detect_answer(answer, *_detect_reference(server, image, names, boxes), names, tolerance=1e-3)
    status, health = client.request("GET", "/healthz")
    assert health["detector"]["name"] == "owlv2"
    status, stats = client.request("GET", "/v1/stats")
    assert stats["replicas"][0]["detects"] >= 2  # the warm-up's and this one
    status, metrics = client.request("GET", "/metrics")
    assert 'ovsam_serve_requests_total{method="POST",route="/v1/images/{id}/detect"}' in metrics


def test_browser_page_finds_typed_classes(client, server, tmp_path):
    """The page's Find box in headless chromium: type two classes, Detect; every instance the API answers for the
    same image and text is drawn (its mask tinted on the canvas) and listed with OV-SAM's and the detector's names
    and scores. On a server without a detector the box is disabled, with a note."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import ARTEFACTS, console_errors, headless_chrome

    image = scene(31, 240, 320)
    image[40:200, 60:150] = (240, 140, 30)
    path = tmp_path / "find.png"
    Image.fromarray(image).save(path)
    driver = headless_chrome(1300, 900)
    wait = WebDriverWait(driver, 120)

    def body(name):
        return driver.execute_script(f"return document.body.dataset.{name} || ''")

    try:
        driver.get(server["base"] + "/short/")  # no detector there
        wait.until(lambda d: body("ready") == "1")
        assert body("detector") == "none"
        assert not driver.find_element(By.ID, "find-text").is_enabled()
        assert driver.find_element(By.ID, "find-note").is_displayed()

        driver.get(server["base"] + "/")
        wait.until(lambda d: body("ready") == "1")
        assert body("detector") == "owlv2" and not driver.find_element(By.ID, "find-note").is_displayed()
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda d: body("imageId") != "")
        wait.until(lambda d: d.find_element(By.ID, "detect").is_enabled())
        driver.find_element(By.ID, "find-text").send_keys("traffic cone, pastry")
        driver.find_element(By.ID, "detect").click()
        wait.until(lambda d: body("detected") != "")
        status, api = client.request("POST", f"/v1/images/{body('imageId')}/detect",
                                     {"text": ["traffic cone", "pastry"], "top_k": 5})
        assert status == 200 and len(api["instances"]) > 0
        assert int(body("detected")) == int(body("instances")) == len(api["instances"])
        page = driver.execute_script(
            "return state.image.instances.map((i) => ({mask: i.mask, label: i.label, label_score: i.label_score, "
            "detector_label: i.detector_label, detector_score: i.detector_score}))")
        assert page == [{k: i[k] for k in ("mask", "label", "label_score", "detector_label", "detector_score")}
                        for i in api["instances"]]
        rows = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#instances li[data-source=detect]")]
        assert len(rows) == len(api["instances"])
        for row, inst in zip(rows, api["instances"]):
            assert row.startswith(f"{inst['label']} {round(100 * inst['label_score'])}%")
            assert f"found as {inst['detector_label']} {round(100 * inst['detector_score'])}%" in row
        assert driver.find_element(By.ID, "count").text == str(len(api["instances"]))
        # the masks are drawn: where the first instance's mask is, the canvas differs from the image
        first = mask_utils.decode({"size": api["instances"][0]["mask"]["size"],
                                   "counts": api["instances"][0]["mask"]["counts"].encode()}) > 0
        drawn = np.asarray(driver.execute_script(
            "return Array.from(document.getElementById('view').getContext('2d')"
            ".getImageData(0, 0, 320, 240).data)"), dtype=np.int16).reshape(240, 320, 4)[..., :3]
        assert np.abs(drawn[first] - image[first]).mean() > 10
        assert driver.find_element(By.ID, "download").is_enabled()
        assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
        errors = console_errors(driver)
        assert not errors, errors
        ARTEFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTEFACTS / "serve_page_find.png"))
    finally:
        driver.quit()
