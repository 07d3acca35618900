"""A vocabulary of any size through an open-vocabulary detector: time and peak memory of the model stage
(``pipeline.annotate.stages.Annotator``, what each annotation worker runs) with ``--prompts detector:<name>``.

Launch (from the repository root):

    .venv/bin/python bench/vocabulary_scale.py --tiny --vocabulary imagenet21k --detector owlv2
    .venv/bin/python bench/vocabulary_scale.py --tiny --vocabulary lvis --detector grounding-dino --json s.json
    .venv/bin/python bench/vocabulary_scale.py --detector owlv2 --detector-weights owlv2-base-patch16-ensemble/ \\
        --model ovsam-rn50x16 --vocabulary imagenet21k

Phases: ``build`` (the OV-SAM model, its vocabulary embedded by its CLIP text tower, the detector),
``queries`` (the detector's query embeddings, or Grounding DINO's captions: once per vocabulary), ``annotate``
(``--images`` images of ``--size`` pixels through detector + OV-SAM, ``--batch`` at a time). ``peak_rss_mb`` is the
process's peak resident memory after each phase (``ru_maxrss``). With ``--tiny`` the detector is a tiny random one
(``pipeline/annotate/detectors/tiny.py``) and OV-SAM is ``ovsam-tiny``: the numbers show what the vocabulary's size
costs, not a real model's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.annotate.detectors import tiny
    from pipeline.annotate.stages import Annotator, ModelStageConfig, SampleInput

    weights = args.detector_weights
    tmp = None
    if weights is None:
        tmp = tempfile.TemporaryDirectory()
        weights = str(tiny.save_tiny_detector(args.detector, Path(tmp.name) / args.detector))
    result: dict = {"settings": vars(args).copy(), "phases": {}}
    t0 = time.perf_counter()
    annotator = Annotator(ModelStageConfig(model=args.model, vocabulary=args.vocabulary,
                                           prompts=f"detector:{args.detector}", detector_weights=weights,
                                           detector_score_thresh=0.0, max_detections=args.max_detections,
                                           precision=args.precision))
    result["phases"]["build"] = {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
    det = annotator.detector
    t0 = time.perf_counter()
    if hasattr(det, "query_embeddings"):
        det.query_embeddings(det.queries)
    else:
        result["captions"] = len(det.captions(det.queries))
    result["phases"]["queries"] = {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
    result["classes"], result["queries"] = len(annotator.vocabulary), len(det.queries)
    w, h = args.size
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    instances = 0
    for start in range(0, args.images, args.batch):
        samples = [SampleInput(key=f"{i}", image=rng.integers(0, 255, (h, w, 3), dtype=np.uint8), width=w,
                               height=h) for i in range(start, min(start + args.batch, args.images))]
        for r in annotator(samples):
            assert r.image_row["status"] == "ok", r.image_row
            instances += len(r.instance_rows)
    seconds = time.perf_counter() - t0
    result["phases"]["annotate"] = {"seconds": seconds, "images_per_s": args.images / seconds,
                                    "instances": instances, "peak_rss_mb": peak_rss_mb()}
    if tmp is not None:
        tmp.cleanup()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocabulary", default="imagenet21k", help="coco, lvis, imagenet21k or a class file")
    p.add_argument("--detector", default="owlv2", choices=("owlv2", "owlvit", "grounding-dino", "mm-grounding-dino"))
    p.add_argument("--detector-weights", default=None, help="a save_pretrained directory (default: a tiny one)")
    p.add_argument("--tiny", action="store_true", help="ovsam-tiny and a tiny random detector (the default model)")
    p.add_argument("--model", default="ovsam-tiny")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=lambda t: tuple(int(v) for v in t.split("x")), default=(640, 480), help="WxH")
    p.add_argument("--max-detections", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = run(args)
    for name, phase in result["phases"].items():
        print(f"{name:9s} {phase['seconds']:8.1f} s   peak RSS {phase['peak_rss_mb']:8.0f} MB"
              + (f"   {phase['images_per_s']:.2f} images/s" if "images_per_s" in phase else ""))
    print(f"{result['classes']} classes, {result['queries']} queries" +
          (f", {result['captions']} captions" if "captions" in result else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
