"""Label Studio's ML backend contract, as ``ovsam serve`` answers it.

Label Studio calls ``GET /health`` (``{"status": "UP"}``), ``POST /setup`` (the project's labelling config as
``schema``; answered with the model version) and ``POST /predict`` (``tasks``, the ``label_config``, and under
``params.context`` the annotator's smart keypoints and rectangles). Keypoint and rectangle values are in percent
of the image's size (``original_width`` and ``original_height``); a keypoint's ``is_positive`` says whether it adds
or removes. The answer holds one prediction per task: ``{"result": [...], "score", "model_version"}``, its
``brushlabels`` result carrying the mask in Label Studio's brush RLE (``pipeline.export.tools.brush_rle``).
"""

from __future__ import annotations

import math
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import Request  # a module global: FastAPI resolves the routes' string annotations here
from fastapi.responses import JSONResponse

from pipeline.export.tools import brush_rle
from pipeline.serving.inputs import check_url, parse_json, read_body
from pipeline.serving.requests import ApiError, VocabularySpec, parse_segment
from pipeline.serving.service import vocabulary_id


@dataclass(frozen=True)
class LabelConfig:
    """What ``/predict`` needs from a labelling config: the ``BrushLabels`` tag (its name, the image it labels and
    its label values, which are the vocabulary) and the task data key that image reads (``value="$image"``)."""

    brush_name: str
    image_name: str
    image_key: str
    brush_labels: tuple[str, ...]


@dataclass(frozen=True)
class ContextPrompts:
    points: list[list[float]]
    box: list[float] | None
    width: int
    height: int


def parse_label_config(xml: str) -> LabelConfig:
    """The first ``<BrushLabels>`` tag and the ``<Image>`` it points to. Raises ``ValueError`` naming what is
    missing."""
    if len(xml) > 1024 * 1024:
        raise ValueError("the labelling config is larger than 1 MiB")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ValueError(f"the labelling config is not valid XML: {e}") from None
    images = {el.get("name"): el for el in root.iter() if el.tag.lower() == "image" and el.get("name")}
    brushes = [el for el in root.iter() if el.tag.lower() == "brushlabels"]
    if not brushes:
        raise ValueError("the labelling config has no <BrushLabels> tag: OV-SAM answers with brush masks")
    brush = brushes[0]
    to_name = brush.get("toName", "")
    image = images.get(to_name)
    if image is None:
        raise ValueError(f"<BrushLabels name={brush.get('name')!r}> points to toName={to_name!r}, which is not an "
                         "<Image> of the config")
    value = image.get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise ValueError(f"<Image name={to_name!r}> needs value=\"$key\" naming the task's image field")
    labels = tuple(dict.fromkeys(el.get("value") for el in brush if el.tag.lower() == "label" and el.get("value")))
    if not labels:
        raise ValueError(f"<BrushLabels name={brush.get('name')!r}> lists no <Label value=...>: its labels are "
                         "the vocabulary OV-SAM names masks from")
    return LabelConfig(brush.get("name", ""), to_name, value[1:], labels)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}"[:200])
    return float(value)


def context_prompts(context: dict[str, Any]) -> ContextPrompts:
    """The annotator's smart keypoints (``[x, y, 1|0]`` in pixels) and the last rectangle (``[x0, y0, x1, y1]``)
    from Label Studio's ``context``. Raises ``ValueError`` for malformed entries."""
    results = context.get("result")
    if not isinstance(results, list) or not results:
        raise ValueError("context.result must be a non-empty array")
    points: list[list[float]] = []
    box = None
    size = None
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
            raise ValueError(f"context.result[{i}] must be an object with a value object")
        w = _number(r.get("original_width"), f"context.result[{i}].original_width")
        h = _number(r.get("original_height"), f"context.result[{i}].original_height")
        if w < 1 or h < 1 or w != int(w) or h != int(h):
            raise ValueError(f"context.result[{i}] has an image size of {w:g}x{h:g}")
        if size is not None and size != (int(w), int(h)):
            raise ValueError(f"context.result[{i}] is for a {w:g}x{h:g} image, the ones before for "
                             f"{size[0]}x{size[1]}")
        size = (int(w), int(h))
        v = r["value"]
        x = _number(v.get("x"), f"context.result[{i}].value.x") * w / 100
        y = _number(v.get("y"), f"context.result[{i}].value.y") * h / 100
        kind = r.get("type")
        if kind == "keypointlabels":
            points.append([x, y, 0 if r.get("is_positive") is False else 1])
        elif kind == "rectanglelabels":
            bw = _number(v.get("width"), f"context.result[{i}].value.width") * w / 100
            bh = _number(v.get("height"), f"context.result[{i}].value.height") * h / 100
            box = [x, y, x + bw, y + bh]
        else:
            raise ValueError(f"context.result[{i}].type is {kind!r}; smart tools send keypointlabels or "
                             "rectanglelabels")
    assert size is not None
    return ContextPrompts(points, box, size[0], size[1])


def task_image_url(task: dict[str, Any], config: LabelConfig) -> str:
    data = task.get("data")
    url = data.get(config.image_key) if isinstance(data, dict) else None
    if not isinstance(url, str) or not url:
        raise ValueError(f"the task has no data.{config.image_key} (the <Image value=\"${config.image_key}\"> field)")
    return url


def resolve_task_url(url: str, label_studio_url: str | None) -> str:
    """A task's image URL made absolute: Label Studio's own paths (``/data/upload/...``) under its URL."""
    if "://" in url:
        return url
    if url.startswith("/") and label_studio_url:
        return urllib.parse.urljoin(label_studio_url.rstrip("/") + "/", url.lstrip("/"))
    raise ValueError(f"the task's image {url[:200]!r} is a Label Studio path; start the server with "
                     "--label-studio-url to read it")


def brush_result(mask: np.ndarray, label: str, score: float, config: LabelConfig) -> dict[str, Any]:
    """One ``brushlabels`` result: the mask in Label Studio's brush RLE, named ``label``."""
    h, w = mask.shape
    return {"id": uuid.uuid4().hex[:10], "from_name": config.brush_name, "to_name": config.image_name,
            "type": "brushlabels", "original_width": int(w), "original_height": int(h), "image_rotation": 0,
            "value": {"format": "rle", "rle": brush_rle(mask), "brushlabels": [label]},
            "score": float(score), "readonly": False}


def predict_response(items: list[dict[str, Any]], score: float, model_version: str,
                     empty: bool = False) -> dict[str, Any]:
    """``/predict``'s answer: one prediction (for the first task) holding ``items``; none when ``empty``."""
    results = [] if empty else [{"result": items, "score": float(score), "model_version": model_version}]
    return {"results": results, "model_version": model_version}


def health_response(model_version: str) -> dict[str, Any]:
    return {"status": "UP", "model_class": "OVSAM", "model_version": model_version}


def setup_response(model_version: str) -> dict[str, Any]:
    return {"model_version": model_version}


@dataclass
class AppContext:
    """What the Label Studio routes share with the rest of the app (:func:`.api.make_app`)."""

    settings: Any  # ServeSettings
    label_studio_key: str | None
    model_version: str
    backend: Any
    store: Any
    vocab_specs: dict[str, VocabularySpec]
    add_image: Callable[[bytes], Awaitable[dict[str, Any]]]
    fetch_url: Callable[..., Awaitable[bytes]]


def _decode_rle(rle: dict[str, Any]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def add_routes(app: Any, ctx: AppContext) -> None:
    """``/health``, ``/setup``, ``/webhook`` and ``/predict`` on ``app``: the ML backend Label Studio connects to.
    ``/predict`` fetches the task's image (Label Studio's own ``/data/...`` paths with its API key, other URLs only
    under the allowed prefixes), embeds it once (the same image store and feature cache as the API), and answers
    the annotator's clicks and rectangle with a brush mask named from the config's ``<BrushLabels>`` values."""
    settings, backend, store, vocab_specs = ctx.settings, ctx.backend, ctx.store, ctx.vocab_specs
    add_image, fetch_url = ctx.add_image, ctx.fetch_url
    ls_images: OrderedDict[str, str] = OrderedDict()  # task URL -> image id
    ls_configs: dict[str, LabelConfig] = {}

    @app.get("/health")
    async def ls_health():
        return health_response(ctx.model_version)

    @app.post("/setup")
    async def ls_setup(request: Request):
        body = parse_json(await read_body(request, 1024 * 1024))
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        schema = body.get("schema")
        if isinstance(schema, str):
            try:
                ls_configs[str(body.get("project"))] = parse_label_config(schema)
            except ValueError as e:
                raise ApiError(422, "invalid_field", str(e), "schema") from None
        return setup_response(ctx.model_version)

    @app.post("/webhook")
    async def ls_webhook(request: Request):
        await read_body(request, settings.max_body_bytes)
        return JSONResponse({}, status_code=201)

    @app.post("/predict")
    async def ls_predict(request: Request):
        body = parse_json(await read_body(request, settings.max_body_bytes))
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        version = ctx.model_version
        config_text = body.get("label_config")
        try:
            config = parse_label_config(config_text) if isinstance(config_text, str) else \
                ls_configs.get(str(body.get("project")))
        except ValueError as e:
            raise ApiError(422, "invalid_field", str(e), "label_config") from None
        if config is None:
            raise ApiError(422, "invalid_field", "no label_config in the request and no /setup for this project",
                           "label_config")
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks or not isinstance(tasks[0], dict):
            raise ApiError(422, "invalid_field", "tasks must be a non-empty array of task objects", "tasks")
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        context = params.get("context") or body.get("context")
        if not context or not isinstance(context, dict) or not context.get("result"):
            return predict_response([], 0.0, version, empty=True)  # no clicks yet: nothing to propose
        try:
            prompts = context_prompts(context)
            url = resolve_task_url(task_image_url(tasks[0], config), settings.label_studio_url)
        except ValueError as e:
            raise ApiError(422, "invalid_field", str(e), "context") from None
        image_id = ls_images.get(url)
        entry = None
        if image_id is not None:
            try:
                entry = store.get(image_id)
            except ApiError:
                entry = None
        if entry is None:
            headers = None
            if settings.label_studio_url and url.startswith(settings.label_studio_url.rstrip("/") + "/"):
                headers = {"Authorization": f"Token {ctx.label_studio_key}"} if ctx.label_studio_key \
                    else None
            else:
                url = check_url(url, settings.allow_url_prefix)
            info = await add_image(await fetch_url(url, headers))
            image_id = info["image_id"]
            ls_images[url] = image_id
            while len(ls_images) > 10_000:
                ls_images.popitem(last=False)
            entry = store.get(image_id)
        if (prompts.width, prompts.height) != (entry.width, entry.height):
            raise ApiError(422, "invalid_field", f"the context is for a {prompts.width}x{prompts.height} image but "
                           f"the task's image is {entry.width}x{entry.height}", "context")
        spec = VocabularySpec(names=list(config.brush_labels))
        vid = vocabulary_id(spec)
        vocab_specs.setdefault(vid, spec)
        seg = parse_segment({"points": prompts.points, "box": prompts.box, "vocabulary": vid, "top_k": 1},
                            entry.width, entry.height)
        answer = await backend.segment(image_id, entry.data, seg, spec)
        mask = _decode_rle(answer["mask"])
        item = brush_result(mask, answer["label"], answer["label_score"], config)
        return predict_response([item], answer["label_score"], version)
