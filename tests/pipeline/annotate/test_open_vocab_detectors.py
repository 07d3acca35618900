"""Open-vocabulary detectors as proposal sources, against transformers' own pipeline run image by image
(processor, model, ``post_process_*`` with the padded size as OWLv2's target) on tiny random configs."""

from __future__ import annotations

import functools

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from pipeline.annotate.detectors import tiny  # noqa: E402
from pipeline.annotate.detectors.queries import TextQueries  # noqa: E402
from pipeline.annotate.detectors.spec import DetectorOptions, parse_prompt_source, resolve_options  # noqa: E402

NAMES = ["cat", "dog", "traffic cone", "bird"]
SYNONYMS = [["cat", "kitty"], ["dog", "puppy"], ["traffic cone"], ["bird"]]
SPLIT = [1, 2, 1, 0]  # bird is excluded: never queried, never proposed


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = str(tiny.save_tiny_detector(name, tmp_path_factory.mktemp(name)))
        return cache[name]

    return get


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((50, 70), (90, 40), (64, 64))]


def _queries():
    return TextQueries.from_synonyms(NAMES, SYNONYMS, split=SPLIT)


def _clip_sort(boxes, scores, labels, h, w):
    b = boxes.clone().float()
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    order = [i for i in torch.sort(scores, descending=True, stable=True).indices.tolist() if ok[i]]
    return b[order].double().numpy(), scores[order].double().numpy(), [labels[i] for i in order]


@functools.lru_cache(maxsize=None)
def _pipeline(name, path):
    """transformers' own processor and model of ``name`` from ``path``."""
    cls = {"owlv2": transformers.Owlv2ForObjectDetection, "owlvit": transformers.OwlViTForObjectDetection,
           "grounding-dino": transformers.GroundingDinoForObjectDetection,
           "mm-grounding-dino": transformers.MMGroundingDinoForObjectDetection}[name]
    return transformers.AutoProcessor.from_pretrained(path), cls.from_pretrained(path).eval()


def _owl_reference(name, path, image, queries, thresh):
    processor, model = _pipeline(name, path)
    inputs = processor(text=[list(queries.texts)], images=image, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    h, w = image.shape[:2]
    target = (max(h, w), max(h, w)) if name == "owlv2" else (h, w)
    res = processor.post_process_grounded_object_detection(out, threshold=thresh, target_sizes=[target])[0]
    labels = [queries.names[queries.classes[int(i)]] for i in res["labels"]]
    return _clip_sort(res["boxes"], res["scores"], labels, h, w), out


def _assert_same(ours, ref):
    boxes, scores, labels = ref
    assert len(ours) == len(boxes)
    np.testing.assert_allclose(ours.boxes, boxes, atol=0.01, rtol=0)
    np.testing.assert_allclose(ours.scores, scores, atol=1e-5, rtol=0)
    assert list(ours.labels) == list(labels)


@pytest.mark.parametrize("name", ["owlv2", "owlvit"])
def test_owl_detections_equal_transformers_pipeline(name, weights):
    from pipeline.annotate.detectors.owl import OwlDetector

    images, queries = _images(), _queries()
    assert "bird" not in {queries.names[c] for c in queries.classes}
    refs = [_owl_reference(name, weights(name), im, queries, 0.0)[0] for im in images]
    thresh = float(np.median(np.concatenate([r[1] for r in refs])))  # keeps about half the boxes
    refs = [_owl_reference(name, weights(name), im, queries, thresh)[0] for im in images]
    det = OwlDetector(name, weights(name), queries=queries, options=DetectorOptions(
        score_thresh=thresh, nms_thresh=1.0, max_detections=100000, batch_size=2))
    out = det(images)  # batches of 2: mixed image sizes within a batch and across batches
    for image, ours, ref in zip(images, out, refs):
        assert 0 < len(ours)
        _assert_same(ours, ref)
        h, w = image.shape[:2]
        assert (ours.boxes[:, 2] <= w).all() and (ours.boxes[:, 3] <= h).all() and (ours.boxes >= 0).all()
    assert {lab for p in out for lab in p.labels} <= {"cat", "dog", "traffic cone"}


def test_owl_vocabulary_chunks_equal_one_call(weights, monkeypatch):
    from pipeline.annotate.detectors import owl

    queries = _queries()
    options = DetectorOptions(score_thresh=0.0, nms_thresh=1.0, max_detections=100000)
    det = owl.OwlDetector("owlv2", weights("owlv2"), queries=queries, options=options)
    whole = det(_images())
    monkeypatch.setattr(owl, "LOGIT_BUDGET_BYTES", 1)  # one query per chunk
    chunked = det(_images())
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-7, rtol=0)
        assert a.labels == b.labels


def test_owl_query_embeddings_are_computed_once_per_query_set_and_dtype(weights, monkeypatch):
    from pipeline.annotate.detectors.owl import OwlDetector

    queries = _queries()
    det = OwlDetector("owlv2", weights("owlv2"), queries=queries, options=resolve_options(
        parse_prompt_source("detector:owlv2")))
    calls = []
    base = det.model.owlv2
    original = base.get_text_features
    monkeypatch.setattr(base, "get_text_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = det.query_embeddings(queries)
    det(_images()[:1])
    assert det.query_embeddings(queries) is first and len(calls) == 1
    other = TextQueries.from_text("traffic cone,pastry")
    assert det.query_embeddings(other).shape[0] == 2 and len(calls) == 2
    det.precision = "bf16"  # another dtype is another cache entry
    assert det.query_embeddings(queries).dtype == torch.bfloat16 and len(calls) == 3


def test_owlv2_objectness_proposals(weights):
    from pipeline.annotate.detectors.owl import OwlDetector

    import torchvision

    path = weights("owlv2")
    det = OwlDetector("owlv2", path, objectness=True, options=resolve_options(
        parse_prompt_source("proposals:owlv2"), max_detections=7))
    image = _images()[0]
    (ours,) = det([image])
    _, out = _owl_reference("owlv2", path, image, _queries(), 0.0)
    h, w = image.shape[:2]
    side = max(h, w)
    cx, cy, bw, bh = out.pred_boxes[0].unbind(-1)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * side
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    scores = torch.sigmoid(out.objectness_logits[0])
    ok = torch.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).flatten()
    keep = ok[torchvision.ops.nms(boxes[ok], scores[ok], 0.3)][:7]
    assert len(ours) == 7 and ours.labels == [None] * 7
    np.testing.assert_allclose(ours.boxes, boxes[keep].double().numpy(), atol=0.01, rtol=0)
    np.testing.assert_allclose(ours.scores, scores[keep].double().numpy(), atol=1e-5, rtol=0)


def _grounding_reference(name, path, image, caption_queries, thresh):
    processor, model = _pipeline(name, path)
    texts = list(caption_queries.texts)
    inputs = processor(images=image, text=texts, return_tensors="pt")  # the processor merges the phrases
    with torch.no_grad():
        out = model(**inputs)
    h, w = image.shape[:2]
    res = processor.post_process_grounded_object_detection(out, inputs.input_ids, threshold=thresh,
                                                           text_threshold=0.0, target_sizes=[(h, w)])[0]
    # the class of each kept box: the phrase holding its most probable phrase token
    probs = torch.sigmoid(out.logits[0])
    keep = probs.max(-1).values > thresh
    ids = inputs.input_ids[0].tolist()
    phrase_of_token, phrase = [], 0
    for t in ids:
        if t in (processor.tokenizer.cls_token_id, processor.tokenizer.sep_token_id):
            phrase_of_token.append(-1)
        elif processor.tokenizer.convert_ids_to_tokens(t) == ".":
            phrase_of_token.append(-1)
            phrase += 1
        else:
            phrase_of_token.append(phrase)
    mask = torch.tensor([p >= 0 for p in phrase_of_token] + [False] * (probs.shape[1] - len(ids)))
    best = probs.masked_fill(~mask, -1.0).argmax(-1)[keep]
    labels = [caption_queries.names[caption_queries.classes[phrase_of_token[int(t)]]] for t in best]
    return _clip_sort(res["boxes"], res["scores"], labels, h, w)


@pytest.mark.parametrize("name", ["grounding-dino", "mm-grounding-dino"])
def test_grounding_detections_equal_transformers_pipeline(name, weights):
    from pipeline.annotate.detectors.grounding import GroundingDetector

    images, queries = _images(), _queries()
    path = weights(name)
    refs = [_grounding_reference(name, path, im, queries, 0.0) for im in images]
    thresh = float(np.median(np.concatenate([r[1] for r in refs])))
    refs = [_grounding_reference(name, path, im, queries, thresh) for im in images]
    det = GroundingDetector(name, path, queries=queries, options=DetectorOptions(
        score_thresh=thresh, nms_thresh=1.0, max_detections=100000, batch_size=4))
    assert len(det.captions(queries)) == 1
    for ours, ref in zip(det(images), refs):
        assert 0 < len(ours)
        _assert_same(ours, ref)


def test_grounding_cuts_the_vocabulary_into_captions_that_fit(weights):
    from pipeline.annotate.detectors.grounding import GroundingDetector
    from pipeline.annotate.detectors.hf import finish_boxes

    name, path = "grounding-dino", weights("grounding-dino")
    names = [f"thing {chr(97 + i)}{chr(97 + j)}" for i in range(6) for j in range(6)]
    queries = TextQueries.from_synonyms(names, [[n] for n in names])
    options = DetectorOptions(score_thresh=0.2, nms_thresh=0.5, max_detections=15)
    det = GroundingDetector(name, path, queries=queries, options=options)
    det.max_text_len = 40
    captions = det.captions(queries)
    assert len(captions) > 3
    assert all(len(c.token_classes) <= 40 for c in captions)
    covered = sorted({int(c) for cap in captions for c in cap.token_classes if c >= 0})
    assert covered == list(range(len(names)))
    image = _images()[1]
    (ours,) = det([image])
    # the merge: every caption's own pipeline result, then one class-agnostic NMS and the cap
    parts = []
    for cap in captions:
        members = sorted({int(c) for c in cap.token_classes if c >= 0})
        sub = TextQueries.from_synonyms([names[m] for m in members], [[names[m]] for m in members])
        parts.append(_grounding_reference(name, path, image, sub, 0.2))
    boxes = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    scores = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    labels = [lab for p in parts for lab in p[2]]
    ref = finish_boxes(boxes, scores, labels, image.shape[1], image.shape[0], options)
    _assert_same(ours, ref)


def test_queries_synonyms_template_and_exclusion():
    q = TextQueries.from_synonyms(NAMES, SYNONYMS, split=SPLIT, template="{} in a street")
    assert q.texts == ("cat in a street", "kitty in a street", "dog in a street", "puppy in a street",
                       "traffic cone in a street")
    assert q.classes.tolist() == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="no usable names"):
        TextQueries.from_synonyms(["bird"], [["bird"]], split=[0])
    with pytest.raises(ValueError, match="exactly one"):
        TextQueries.from_synonyms(NAMES, SYNONYMS, template="a photo")
    assert TextQueries.from_text("traffic cone, pastry ,,").names == ("traffic cone", "pastry")


def test_owl_query_logits_stay_within_the_chunk_budget(weights, monkeypatch):
    from pipeline.annotate.detectors import owl

    names = [f"class {i}" for i in range(300)]
    queries = TextQueries.from_synonyms(names, [[n, n + " thing"] for n in names])
    det = owl.OwlDetector("owlv2", weights("owlv2"), queries=queries, options=DetectorOptions(
        score_thresh=0.0, nms_thresh=1.0, max_detections=100000))
    images = _images()[:2]
    whole = det(images)
    sizes = []
    original = det.model.class_predictor

    def spy(feats, q, mask):
        sizes.append(feats.shape[0] * feats.shape[1] * q.shape[1] * 4)
        return original(feats, q, mask)

    vision = det.model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    budget = 2 * 4 * patches * 50  # 50 queries' logits for 2 images
    monkeypatch.setattr(det.model, "class_predictor", spy)
    monkeypatch.setattr(owl, "LOGIT_BUDGET_BYTES", budget)
    chunked = det(images)
    assert len(sizes) == -(-len(queries) // 50) and max(sizes) <= budget
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert a.labels == b.labels


def test_grounding_phrases_without_offsets_equal_the_offset_mapping(weights):
    from pipeline.annotate.detectors.grounding import GroundingDetector

    queries = _queries()
    det = GroundingDetector("grounding-dino", weights("grounding-dino"), queries=queries,
                            options=resolve_options(parse_prompt_source("detector:grounding-dino")))
    (caption,) = det.captions(queries)
    group = list(range(len(queries)))
    lengths = [len(det.processor.tokenizer(t.lower() + ".", add_special_tokens=False)["input_ids"])
               for t in queries.texts]
    counted = det._counted_caption(queries, group, lengths, caption.text)
    np.testing.assert_array_equal(counted.token_classes, caption.token_classes)
    assert sorted(set(caption.token_classes.tolist())) == [-1, 0, 1, 2]
