"""``ovsam eval compare A B``: instances of two runs paired by image and prompt (then mask IoU), with label
agreement, mask IoU and score shift that equal a direct computation from the two outputs' Parquet files."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from jobs.cli import main
from pipeline.evaluation.compare import compare_outputs, pair_instances
from pipeline.annotate.ledger import write_run_json
from pipeline.inputs.shard_io import ShardReadReport
from pipeline.annotate.sinks import commit_shard

from tests.pipeline.corpus import good_png, sidecar


def _mask(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _row(key, j, m, label, score, box=None):
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    ys, xs = np.nonzero(m)
    mbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    return {"image_key": key, "shard": "s-000000", "instance_index": j, "prompt_type": "box",
            "prompt_box_xyxy": box or mbox, "prompt_points": None, "prompt_point_labels": None, "box_xyxy": mbox,
            "mask_rle": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
            "area": int(m.sum()), "mask_quality": 1.0, "label": 0, "label_name": label, "label_score": score,
            "background_score": 0.0, "topk_labels": [0], "topk_scores": [score], "detector_score": None,
            "detector_label": None, "head_embedding": None, "clip_embedding": None, "clip_valid": None}


def _commit(out, instance_rows, statuses):
    fs = fsspec.filesystem("file")
    image_rows = [{"image_key": k, "shard": "s-000000", "status": st, "error": None, "width": 40, "height": 30,
                   "num_instances": 0, "num_prompts": 0, "num_prompts_dropped": 0, "source_format": "png",
                   "source_name": f"{k}.png"} for k, st in statuses.items()]
    report = ShardReadReport(samples_read=len(image_rows), truncated=False, error=None, expected=None)
    commit_shard(fs, str(out), "s-000000", instance_rows, image_rows, input_url="x.tar", config_hash="h",
                 read_report=report, attempt_id="a")
    write_run_json(fs, str(out), {"config_hash": "h", "config": {}, "vocabulary": {"names": ["cat", "dog"]}})


def test_known_differences_are_counted_exactly(tmp_path, capsys) -> None:
    h, w = 30, 40
    a = [_row("i0", 0, _mask(h, w, 0, 10, 0, 10), "cat", 0.9),
         _row("i0", 1, _mask(h, w, 10, 20, 10, 20), "dog", 0.8),
         _row("i0", 2, _mask(h, w, 20, 30, 30, 40), "cat", 0.7),
         _row("i1", 0, _mask(h, w, 0, 30, 0, 20), "dog", 0.6, box=[0.0, 0.0, 20.0, 30.0]),
         _row("i1", 1, _mask(h, w, 5, 8, 25, 35), "cat", 0.5)]
    b = [_row("i0", 0, _mask(h, w, 0, 10, 0, 10), "cat", 0.95),  # same; score +0.05
         _row("i0", 1, _mask(h, w, 10, 20, 15, 25), "cat", 0.8, box=a[1]["prompt_box_xyxy"]),  # IoU 50/150
         # a[2] is gone; B has a mask A lacks
         _row("i0", 2, _mask(h, w, 0, 5, 30, 40), "dog", 0.4),
         _row("i1", 0, _mask(h, w, 0, 30, 0, 18), "dog", 0.6, box=[0.5, 0.0, 19.0, 30.0]),  # another prompt box
         _row("i1", 1, _mask(h, w, 5, 8, 25, 35), "cat", 0.4)]
    _commit(tmp_path / "a", a, {"i0": "ok", "i1": "ok", "i2": "ok"})
    _commit(tmp_path / "b", b, {"i0": "ok", "i1": "ok", "i2": "decode_error"})
    report = compare_outputs(str(tmp_path / "a"), str(tmp_path / "b"))
    ins = report["instances"]
    assert (ins["pairs"], ins["paired_by_prompt"], ins["paired_by_mask"], ins["only_a"], ins["only_b"]) == \
        (4, 3, 1, 1, 1)
    assert report["images"] == {"both": 3, "status_differs": 1, "only_a": 0, "only_b": 0}
    assert report["label_agreement"] == pytest.approx(3 / 4)
    ious = sorted([1.0, 50 / 150, 540 / 600, 1.0])
    assert report["mask_iou"]["mean"] == pytest.approx(np.mean(ious))
    assert report["mask_iou"]["min"] == pytest.approx(50 / 150)
    assert report["mask_iou"]["at_least_0.98"] == pytest.approx(0.5)
    assert sum(report["mask_iou"]["histogram"].values()) == 4
    assert report["score_shift"]["mean"] == pytest.approx((0.05 + 0 + 0 - 0.1) / 4, abs=1e-6)
    assert report["score_shift"]["max_abs"] == pytest.approx(0.1, abs=1e-6)
    assert report["worst_iou"][0]["iou"] == pytest.approx(50 / 150)
    assert [(c["label_a"], c["label_b"]) for c in report["label_changes"]] == [("dog", "cat")]
    path = tmp_path / "cmp.json"
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(path.read_text())["instances"] == ins
    assert "label agreement: 75.00%" in printed and "i2: ok -> decode_error" in printed
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "nothing")]) == 2


def test_greedy_mask_pairing_takes_the_best_pair_first() -> None:
    h, w = 20, 20
    a = [_row("k", 0, _mask(h, w, 0, 10, 0, 10), "cat", 0.5, box=[1, 1, 1, 1]),
         _row("k", 1, _mask(h, w, 0, 10, 2, 12), "cat", 0.5, box=[2, 2, 2, 2])]
    b = [_row("k", 0, _mask(h, w, 0, 10, 1, 11), "cat", 0.5, box=[3, 3, 3, 3]),
         _row("k", 1, _mask(h, w, 0, 10, 2, 12), "cat", 0.5, box=[4, 4, 4, 4])]
    pairs, left_a, left_b = pair_instances(a, b)
    assert sorted((i, j) for i, j, _, _ in pairs) == [(0, 0), (1, 1)] and not left_a and not left_b
    assert all(how == "mask" for *_, how in pairs)


def test_two_real_runs_fp32_against_itself_and_bf16(tmp_path) -> None:
    """The same folder annotated twice in fp32 agrees exactly; against bf16 the report equals the IoUs, labels
    and scores computed directly from the two outputs' rows."""
    from pipeline.inputs.sources import expand_shards
    from pipeline.annotate.stages import ModelStageConfig
    from pipeline.annotate.worker import ShardWorker, WorkerConfig

    folder = tmp_path / "photos"
    for i in range(4):
        path = folder / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(good_png(64, 48))
        path.with_suffix(".json").write_bytes(sidecar(boxes=[[4, 4, 30, 30], [20, 10, 60, 44], [0, 0, 64, 48]]))
    vocab = tmp_path / "classes.txt"
    vocab.write_text("red square\nblue circle\ngreen triangle\n")
    outs = {}
    for name, precision in (("a", "fp32"), ("b", "fp32"), ("c", "bf16")):
        out = tmp_path / name
        stage = ModelStageConfig(model="ovsam-tiny", vocabulary=str(vocab), precision=precision)
        worker = ShardWorker(WorkerConfig(output=str(out), stage=stage, config_hash="h", batch_size=2,
                                          warm_up=False))
        for ref in expand_shards([str(folder)]):
            worker.process(ref)
        write_run_json(fsspec.filesystem("file"), str(out), {"config_hash": "h",
                                                             "config": {"inputs": [str(folder)]},
                                                             "vocabulary": {"names": ["x"]}})
        outs[name] = out
    same = compare_outputs(str(outs["a"]), str(outs["b"]))
    assert same["instances"]["pairs"] == 12 and same["instances"]["paired_by_prompt"] == 12
    assert same["label_agreement"] == 1.0 and same["mask_iou"]["min"] == 1.0
    assert same["score_shift"]["max_abs"] == 0.0
    other = compare_outputs(str(outs["a"]), str(outs["c"]))
    assert other["instances"]["pairs"] == 12 and other["instances"]["paired_by_prompt"] == 12

    def rows(out):
        [path] = (out / "instances").glob("*.parquet")
        return sorted(pq.read_table(path).to_pylist(), key=lambda r: (r["image_key"], r["instance_index"]))

    ra, rc = rows(outs["a"]), rows(outs["c"])
    ious = [float(mask_utils.iou([x["mask_rle"]], [y["mask_rle"]], [0])[0, 0]) for x, y in zip(ra, rc)]
    assert other["mask_iou"]["mean"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert other["label_agreement"] == pytest.approx(np.mean([x["label"] == y["label"] for x, y in zip(ra, rc)]))
    shifts = [y["label_score"] - x["label_score"] for x, y in zip(ra, rc)]
    assert other["score_shift"]["mean"] == pytest.approx(np.mean(shifts), abs=1e-7)
    assert [w["iou"] for w in other["worst_iou"]] == sorted(ious)
    # the report draws the pairs, lowest IoU first (all 12 here), and the changed labels, A beside B
    assert main(["eval", "compare", str(outs["a"]), str(outs["c"]), "--report", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count('<img class="case"') == 12 + 12 - round(12 * other["label_agreement"])


def _brute_force(a, b, min_iou):
    """The pairing restated on dense masks: prompt pairs in order, then a full IoU matrix of what is left, taken
    greedily from the highest IoU down (ties in row-major order) to ``min_iou``."""
    from pipeline.evaluation.compare import _prompt_key

    def dense(row):
        return mask_utils.decode(row["mask_rle"]).astype(bool)

    def iou(x, y):
        return float(np.logical_and(x, y).sum() / np.logical_or(x, y).sum()) if np.logical_or(x, y).any() else 0.0

    pairs, left_a, free_b = [], [], list(range(len(b)))
    for i, row in enumerate(a):
        j = next((j for j in free_b if _prompt_key(b[j]) == _prompt_key(row)), None)
        if j is None:
            left_a.append(i)
        else:
            free_b.remove(j)
            pairs.append((i, j, iou(dense(row), dense(b[j])), "prompt"))
    m = np.array([[iou(dense(a[i]), dense(b[j])) for j in free_b] for i in left_a]).reshape(len(left_a), len(free_b))
    taken_a, taken_b = set(), set()
    for flat in np.argsort(-m, axis=None, kind="stable"):
        r, c = divmod(int(flat), m.shape[1])
        if m[r, c] < min_iou:
            break
        if r not in taken_a and c not in taken_b:
            taken_a.add(r)
            taken_b.add(c)
            pairs.append((left_a[r], free_b[c], float(m[r, c]), "mask"))
    return (pairs, [i for n, i in enumerate(left_a) if n not in taken_a],
            [j for n, j in enumerate(free_b) if n not in taken_b])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
@pytest.mark.parametrize("min_iou", [0.5, 0.2, 1e-9])
def test_pairing_equals_a_brute_force_dense_computation(min_iou) -> None:
    """Random overlapping rectangles (with repeated masks, so IoU ties, empty masks and shared prompts): the same
    pairs, the same IoUs to the last bit and the same leftovers as the dense restatement."""
    rng = np.random.default_rng(7)
    h, w = 24, 32

    def rows(n, key_offset):
        out = []
        for j in range(n):
            y0, x0 = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
            m = _mask(h, w, y0, y0 + int(rng.integers(1, 12)), x0, x0 + int(rng.integers(1, 14)))
            if j % 9 == 8:
                m[:] = False  # an empty mask
            box = [float(rng.integers(0, 3)) + key_offset] * 4 if j % 3 == 0 else None
            row = _row("k", j, m if m.any() else _mask(h, w, 0, 1, 0, 1), "cat", 0.5, box=box)
            if not m.any():
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                row["mask_rle"] = {"size": [h, w], "counts": rle["counts"].decode()}
            out.append(row)
        return out

    for trial in range(6):
        a = rows(int(rng.integers(0, 30)), 0.0)
        b = rows(int(rng.integers(0, 30)), 0.0)
        b += [dict(r, instance_index=len(b) + n) for n, r in enumerate(a[:3])]  # identical masks: IoU ties
        got = pair_instances(a, b, min_iou)
        want = _brute_force(a, b, min_iou)
        assert got == want, trial


def test_pairing_on_a_large_image_needs_no_dense_masks_and_no_square_matrices() -> None:
    """8000x6000 with 1000 instances a side (600 paired by prompt, 400 left for mask IoU): quick, and the Python
    heap (numpy included) peaks far below one decoded mask (48 MB) and below the square IoU matrices the pairing
    used to build (600 x 600 for the prompt pairs' diagonal and 400 x 400 for the rest: 4.4 MB at their peak);
    what is left grows linearly with the instances (about 0.8 kB each)."""
    import time
    import tracemalloc

    h, w = 6000, 8000
    rng = np.random.default_rng(1)

    def row(j, x, y, bw, bh, prompt):
        [rle] = mask_utils.frPyObjects(np.array([[x, y, bw, bh]], dtype=np.float64), h, w)
        return {"image_key": "k", "instance_index": j, "prompt_type": "box", "prompt_box_xyxy": prompt,
                "prompt_points": None, "mask_rle": {"size": [h, w], "counts": rle["counts"].decode()},
                "label_name": "cat", "label_score": 0.5}

    a, b = [], []
    for j in range(1000):
        x, y = float(rng.integers(0, w - 400)), float(rng.integers(0, h - 400))
        bw, bh = float(rng.integers(20, 400)), float(rng.integers(20, 400))
        prompt = [float(j), 0.0, 0.0, 0.0]
        a.append(row(j, x, y, bw, bh, prompt))
        # B: the same box shifted by a few pixels; the last 400 under another prompt (paired by mask IoU)
        b.append(row(j, x + float(rng.integers(0, 4)), y, bw, bh, prompt if j < 600 else [float(j), 1.0, 0.0, 0.0]))
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        pairs, left_a, left_b = pair_instances(a, b, 0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - t0
    assert sum(how == "prompt" for *_, how in pairs) == 600
    assert len(pairs) == 1000 and not left_a and not left_b  # rectangles shifted < 4 px of >= 20: IoU > 0.5
    assert all(i == j for i, j, _, _ in pairs)
    for i, j, iou, _ in pairs[::50]:
        assert iou == float(mask_utils.iou([a[i]["mask_rle"]], [b[j]["mask_rle"]], [0])[0, 0])
    assert peak < 2_000_000, peak
    assert seconds < 30, seconds
