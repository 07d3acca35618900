"""``ovsam serve``: segment and name objects interactively over HTTP (a Ray Serve application).

    ovsam serve --model ovsam-tiny --checkpoint demo_out/model/ovsam-tiny-synthetic.safetensors \\
        --vocabulary demo_out/model/ovsam-tiny-synthetic.synthetic.vocab.safetensors
    ovsam serve --model ovsam-rn50x16 --checkpoint ovsam_coco.safetensors --replicas 4 --num-gpus-per-replica 1 \\
        --host 0.0.0.0 --token-env OVSAM_TOKEN --allow-url-prefix s3://my-bucket/images/
    ovsam serve --model ovsam-rn50x16 --checkpoint ovsam_coco.safetensors --detector owlv2 \\
        --detector-weights owlv2-base/    # POST /v1/images/{id}/detect and the page's Find box

Then open http://HOST:PORT/ for the browser page, http://HOST:PORT/docs for the API, or connect Label Studio to
http://HOST:PORT (docs/serve.md). It runs until interrupted (Ctrl-C). The same application deploys with
``serve run pipeline.serving.app:build_app model=ovsam-tiny`` or a ``serve deploy`` config file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jobs.args import (UsageError, add_model_arguments, add_storage_options, check_ovsam_model, float_in,
                       int_at_least, positive_int, storage_options)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.serving.settings import ServeSettings

    d = ServeSettings()  # the defaults, shared with the application builder
    m = p.add_argument_group("model")
    add_model_arguments(m, "the default vocabulary")
    s = p.add_argument_group("serving")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int_at_least(0), default=8000, help="port (default: 8000)")
    s.add_argument("--replicas", type=positive_int, default=d.replicas, help=f"model replicas (default: {d.replicas})")
    s.add_argument("--num-gpus-per-replica", type=float_in(0.0), default=None,
                   help="GPUs per model replica (default: 1 where the cluster has GPUs, else 0: CPU)")
    s.add_argument("--cpus-per-replica", type=float_in(0.0, low_open=True), default=None,
                   help="CPUs per model replica (default: 1 with GPUs, else the node's CPUs shared among replicas)")
    s.add_argument("--max-batch-size", type=positive_int, default=d.max_batch_size,
                   help=f"concurrent clicks decoded together in one call (default: {d.max_batch_size})")
    s.add_argument("--batch-wait-ms", type=float_in(0.0), default=d.batch_wait_ms,
                   help=f"how long a click waits for others to batch with (default: {d.batch_wait_ms:g})")
    s.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray instance)")
    c = p.add_argument_group("cache and limits")
    c.add_argument("--cache-bytes", type=positive_int, default=d.cache_bytes,
                   help=f"image features each replica keeps, in bytes (default: {d.cache_bytes})")
    c.add_argument("--cache-ttl", type=float_in(0.0, low_open=True), default=d.cache_ttl,
                   help=f"seconds an unused image is kept (default: {d.cache_ttl:g})")
    c.add_argument("--image-store-bytes", type=positive_int, default=d.image_store_bytes,
                   help=f"uploaded image bytes kept to re-embed on another replica (default: {d.image_store_bytes})")
    c.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes,
                   help=f"largest request body (default: {d.max_body_bytes})")
    c.add_argument("--max-pixels", type=positive_int, default=d.max_pixels,
                   help=f"larger images are refused, against decompression bombs (default: {d.max_pixels})")
    c.add_argument("--request-timeout", type=float_in(0.0, low_open=True), default=d.request_timeout,
                   help=f"seconds before a request is answered 504 (default: {d.request_timeout:g})")
    from pipeline.annotate.detectors.spec import OPEN_VOCAB_DETECTORS

    t = p.add_argument_group("detector", "an open-vocabulary detector for POST /v1/images/{id}/detect and the "
                                         "page's Find box (every instance of typed classes)")
    t.add_argument("--detector", default=None, choices=list(OPEN_VOCAB_DETECTORS),
                   help="the detector --detector-weights holds (default: owlv2 where --detector-weights is given)")
    t.add_argument("--detector-weights", default=None, metavar="DIR",
                   help="the detector's save_pretrained directory (or Hugging Face id where the network allows); "
                        "without it the detect route answers 404 detector_not_configured")
    t.add_argument("--detector-score-thresh", type=float_in(0.0, 1.0), default=None, metavar="S",
                   help="the default score threshold of a detect request (default by detector: owlv2/owlvit 0.1, "
                        "grounding-dino 0.35)")
    t.add_argument("--detector-nms-thresh", type=float_in(0.0, 1.0), default=None, metavar="IOU",
                   help="class-agnostic NMS IoU between detector boxes; 1.0 turns it off (default: owl 0.3, "
                        "grounding-dino 0.5)")
    t.add_argument("--max-detections", type=positive_int, default=None,
                   help="the default cap of boxes a detect request answers (default: 100)")
    t.add_argument("--detector-template", default=None, metavar="TEXT",
                   help="text query made of each typed class, with {} for it (default: 'a photo of a {}')")
    a = p.add_argument_group("access")
    a.add_argument("--allow-url-prefix", action="append", default=[], metavar="PREFIX",
                   help="images may be given as URLs under this prefix (repeatable; e.g. s3://bucket/images/; "
                        "local paths and file:// only if a prefix names them)")
    add_storage_options(a)
    a.add_argument("--token-env", default=None, metavar="NAME",
                   help="require Authorization: Bearer <the value of environment variable NAME>")
    a.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from this origin (repeatable; * for any)")
    a.add_argument("--label-studio-url", default=None, help="Label Studio's URL, to read its /data/... task images")
    a.add_argument("--label-studio-key-env", default=None, metavar="NAME",
                   help="environment variable holding Label Studio's API key")


def settings_from_args(args: argparse.Namespace):
    """The checked :class:`~pipeline.serving.settings.ServeSettings` (a :class:`UsageError` names the flag)."""
    check_ovsam_model(args.model, args.checkpoint)
    for flag, name in (("--token-env", args.token_env), ("--label-studio-key-env", args.label_studio_key_env)):
        if name is not None and not os.environ.get(name):
            raise UsageError(f"{flag} {name}: the environment variable is not set (or empty)")
    for prefix in args.allow_url_prefix:
        if not prefix.strip():
            raise UsageError("--allow-url-prefix: empty prefix")
    from pipeline.serving.settings import ServeSettings

    detector = check_detector(args)
    return ServeSettings(
        model=args.model, checkpoint=args.checkpoint, vocabulary=args.vocabulary, precision=args.precision,
        replicas=args.replicas, num_gpus_per_replica=args.num_gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica, max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms, cache_bytes=args.cache_bytes, cache_ttl=args.cache_ttl,
        image_store_bytes=args.image_store_bytes, max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels,
        request_timeout=args.request_timeout, allow_url_prefix=list(args.allow_url_prefix),
        storage_options=storage_options(args.storage_options), token_env=args.token_env,
        cors_origin=list(args.cors_origin), label_studio_url=args.label_studio_url,
        label_studio_key_env=args.label_studio_key_env, detector=detector, detector_weights=args.detector_weights,
        detector_score_thresh=args.detector_score_thresh, detector_nms_thresh=args.detector_nms_thresh,
        max_detections=args.max_detections, detector_template=args.detector_template)


def check_detector(args: argparse.Namespace) -> str | None:
    """The detector's name (``--detector``, owlv2 by default) once its weights are checked (there, of its type)
    and its options are valid; None without ``--detector-weights`` (then no other detector option may be given).
    Raises :class:`UsageError`."""
    if not args.detector_weights:
        given = [flag for flag, value in (("--detector", args.detector),
                                          ("--detector-score-thresh", args.detector_score_thresh),
                                          ("--detector-nms-thresh", args.detector_nms_thresh),
                                          ("--max-detections", args.max_detections),
                                          ("--detector-template", args.detector_template)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} need --detector-weights DIR (the detector's save_pretrained "
                             "directory)")
        return None
    from pipeline.annotate.detectors.build import check_source
    from pipeline.annotate.detectors.spec import parse_prompt_source, resolve_options

    name = args.detector or "owlv2"
    source = parse_prompt_source(f"detector:{name}")
    try:
        options = resolve_options(source, score_thresh=args.detector_score_thresh,
                                  nms_thresh=args.detector_nms_thresh, max_detections=args.max_detections,
                                  template=args.detector_template)
        check_source(source, args.detector_weights, options=options)
    except FileNotFoundError:
        raise UsageError(f"--detector-weights {args.detector_weights}: no such directory") from None
    except ValueError as e:
        raise UsageError(f"--detector {name}: {e}") from None
    return name


def start(settings, host: str, port: int, address: str | None = None):
    """Start Ray (or join ``address``), Serve's HTTP proxy on ``host:port`` and the application; returns the
    ingress handle once every replica is up."""
    import ray
    from ray import serve

    from pipeline.serving.app import build_app

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(settings), name="ovsam", route_prefix="/")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.checkpoint is None:
        print(f"ovsam serve: WARNING: no --checkpoint: {args.model}'s neck and head are randomly initialised, so "
              "its masks and labels mean nothing", file=sys.stderr)
    from ray import serve

    start(settings, args.host, args.port, args.address)
    detector = f", detector {settings.detector}" if settings.detector else ""
    print(f"ovsam serve: {args.model}{detector} on http://{args.host}:{args.port}/ ({settings.replicas} "
          f"replica(s)); API at /docs; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("ovsam serve: stopping", file=sys.stderr)
    finally:
        serve.shutdown()
    return 0


__all__ = ["add_arguments", "check_detector", "run", "settings_from_args", "start"]
