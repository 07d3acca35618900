"""Argument types shared by the command line's subcommands (torch-free, so ``--help`` stays fast).

A value that fails one of these is a usage error: argparse prints ``argument --FLAG: ...`` and exits 2 before any
work starts.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable

class UsageError(ValueError):
    """An invalid value found after parsing (a check that needs more than one option): exit 2, like argparse's."""


STORAGE_HELP = 'fsspec options as a JSON object, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\''


def json_object(text: str) -> dict[str, Any]:
    """A JSON object (``{...}``): the ``--storage-options`` type."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got {type(value).__name__}: {text!r}")
    return value


def storage_options(value: Any, flag: str = "--storage-options") -> dict[str, Any]:
    """``args.storage_options`` as a dict: parsed already by :func:`json_object`, or a JSON string (a
    programmatically built namespace). Raises ValueError naming ``flag``."""
    if isinstance(value, dict):
        return value
    try:
        return json_object(value if value is not None else "{}")
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{flag}: {e}") from None


def add_storage_options(p: argparse.ArgumentParser, help: str = STORAGE_HELP) -> None:
    p.add_argument("--storage-options", type=json_object, default={}, metavar="JSON", help=help)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def float_in(low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in ``[low, high]`` (``(low, high]`` with ``low_open``; no upper bound for None)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or \
                (high is not None and value > high):
            bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


# ovsam.precision.PRECISIONS, spelled out so that building the parser does not import torch (a test checks they agree)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def add_model_arguments(g: Any, vocabulary_help: str = "the vocabulary") -> None:
    """``--model --checkpoint --vocabulary --precision``, as ``predict`` and ``serve`` take them."""
    g.add_argument("--model", default="ovsam-tiny", help="model name or config JSON (see `ovsam models`)")
    g.add_argument("--checkpoint", default=None, help="project checkpoint file for the model")
    g.add_argument("--vocabulary", default="coco",
                   help=f"{vocabulary_help}: built-in (coco, lvis, imagenet21k), a text class list, or a saved "
                        "vocabulary (default: coco)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="float type the model computes in (default: auto: bf16 where the device computes it "
                        "natively, else fp32)")


def add_grid_arguments(g: Any) -> None:
    """Everything mode's options (a point grid, the stable masks kept), shared by ``annotate --prompts grid`` and
    ``predict --everything`` so both mean and default the same."""
    g.add_argument("--points-per-side", type=positive_int, default=32, help="grid density (default: 32)")
    g.add_argument("--stability-score-thresh", type=float_in(0.0, 1.0), default=0.6,
                   help="keep masks at least this stable (IoU of the mask at logit thresholds +1 and -1) "
                        "(default: 0.6, measured with bench/grid.py: 92%% of the demo's held-out objects found)")
    g.add_argument("--box-nms-thresh", type=float_in(0.0, 1.0), default=0.85,
                   help="IoU of the class-agnostic box NMS between the grid's masks (default: 0.85)")
    g.add_argument("--pred-iou-thresh", type=float_in(0.0, 1.0), default=0.88,
                   help="SAM models' predicted-IoU filter; OV-SAM has no IoU head and ignores it (default: 0.88)")
    g.add_argument("--min-mask-area", type=non_negative_int, default=0,
                   help="drop masks with fewer pixels (default: 0)")


def add_detector_arguments(g: Any) -> None:
    """The options of a detector or proposal source (``--prompts detector:<name>`` / ``proposals:<name>``), shared
    by ``annotate``, ``predict`` and ``serve``. Defaults that depend on the source are documented in
    ``docs/annotate.md`` and ``pipeline/annotate/detectors/spec.py``."""
    g.add_argument("--detector-weights", default=None, metavar="PATH",
                   help="an open-vocabulary detector's save_pretrained directory (or Hugging Face id where the "
                        "network allows), or a torchvision detector's state dict file")
    g.add_argument("--detector-score-thresh", type=float_in(0.0, 1.0), default=None, metavar="S",
                   help="drop detector boxes scoring below this (default by source: owlv2/owlvit 0.1, "
                        "grounding-dino 0.35, proposals 0.0, torchvision detectors 0.5)")
    g.add_argument("--detector-nms-thresh", type=float_in(0.0, 1.0), default=None, metavar="IOU",
                   help="class-agnostic NMS IoU between detector boxes; 1.0 turns it off (default by source: "
                        "owl 0.3, grounding-dino 0.5, torchvision 1.0)")
    g.add_argument("--detector-template", default=None, metavar="TEXT",
                   help="text query made of each synonym, with {} for it (default: 'a photo of a {}')")
    g.add_argument("--detector-batch-size", type=positive_int, default=8, metavar="N",
                   help="images per detector call (default: 8)")
    g.add_argument("--max-detections", type=positive_int, default=100,
                   help="at most this many detector boxes per image (default: 100, COCO's maxDets)")


def check_detector(prompts: str, weights: str | None, vocabulary: str | None, options: Any) -> None:
    """Everything about ``--prompts`` and its detector that can be checked before work starts: the source exists,
    its weights are there and of its type (a torchvision detector is built once from them), ``proposals:`` names
    a detector with a proposal head, and an open-vocabulary detector has a class to query in ``vocabulary``.
    Raises :class:`UsageError`."""
    from pipeline.annotate.detectors.build import build_proposer, check_source
    from pipeline.annotate.detectors.spec import parse_prompt_source

    try:
        source = parse_prompt_source(prompts)
    except ValueError as e:
        raise UsageError(str(e)) from None
    names = synonyms = split = None
    if source.open_vocabulary and vocabulary is not None:
        from ovsam.vocabulary import Vocabulary

        try:
            names, synonyms, split = Vocabulary.read_spec(vocabulary)
        except (ValueError, OSError) as e:
            raise UsageError(f"--vocabulary {vocabulary}: {e}") from None
    try:
        check_source(source, weights, names=names, synonyms=synonyms, split=split, options=options)
        if source.family == "torchvision":
            build_proposer(source, weights, options=options, device="cpu")
    except FileNotFoundError:
        raise UsageError(f"--detector-weights {weights}: no such file or directory") from None
    except ImportError as e:
        raise UsageError(f"--prompts {prompts}: {e}") from None
    except (ValueError, RuntimeError, KeyError) as e:
        raise UsageError(f"--prompts {prompts}" + (f" with --detector-weights {weights}" if weights else "")
                         + f": {e}") from None


def check_ovsam_model(model: str, checkpoint: str | None) -> None:
    """``--model`` names an OV-SAM config (built-in name or JSON file) and ``--checkpoint``, if given, exists (any
    fsspec URL). Raises :class:`UsageError`. Torch-free."""
    import fsspec

    from ovsam.config import OvsamConfig, load_config

    try:
        config = load_config(model)
    except (ValueError, OSError) as e:
        raise UsageError(f"--model: {e} (or a model config JSON file)") from None
    if not isinstance(config, OvsamConfig):
        raise UsageError(f"--model {model!r} is a SAM config; this needs an OV-SAM model (see `ovsam models`)")
    if checkpoint is not None:
        fs, path = fsspec.core.url_to_fs(str(checkpoint))
        if not fs.isfile(path):
            raise UsageError(f"--checkpoint {checkpoint}: no such file")


def expand_inputs(flag: str, spec: str | list[str], storage: dict[str, Any] | None = None, **kwargs: Any) -> list[Any]:
    """``pipeline.inputs.sources.expand_shards(spec, storage, **kwargs)`` for the option ``flag`` (``--input``,
    ``--shards``). What it refuses (a glob that matches nothing, a bad brace range, a shard, directory, list file or
    URL list that does not exist, a URL list without the ``--url-column``) raises :class:`UsageError` naming
    ``flag``, so the command exits 2 before anything is written or Ray starts; other ``OSError``s (storage
    unreachable, permission denied) pass through (exit 1)."""
    from pipeline.inputs.sources import expand_shards

    try:
        return expand_shards(spec, storage, **kwargs)
    except FileNotFoundError as e:
        raise UsageError(f"{flag}: no such file or directory: {e.filename or e}") from None
    except ValueError as e:
        text = str(e) if flag == "--input" else str(e).replace("--input", flag)  # the sources name --input
        raise UsageError(text if flag in text else f"{flag}: {text}") from None


def check_output_shards(flag: str, shards: list[str] | None, output: str, storage: dict[str, Any]) -> None:
    """``--shards`` of a command that reads the images of an annotation output again (``show``, ``export
    --images-dir``, ``eval coco|compare --report``), expanded here as that reader will (missing shards dropped,
    with the output's recorded ``--images-per-shard`` and ``--url-column``), so that a spec it cannot expand is a
    :class:`UsageError` found before anything is written. Nothing to check without ``shards``."""
    if not shards:
        return
    import fsspec

    from pipeline.annotate.ledger import Ledger

    fs, root = fsspec.core.url_to_fs(output, **storage)
    recorded = (Ledger(fs, root.rstrip("/")).run_record() or {}).get("config", {})
    expand_inputs(flag, list(shards), storage, allow_missing=True,
                  images_per_shard=recorded.get("images_per_shard"), url_column=recorded.get("url_column"))


def add_progress_arguments(p: argparse.ArgumentParser, default: float, *, evaluations: str,
                           also_quiet: str = "") -> None:
    """``--progress-every SECONDS`` and ``-q/--quiet`` of the training commands (``ovsam train``, ``ovsam
    distill``); ``evaluations`` names what else gets a line, ``also_quiet`` what else ``-q`` silences."""
    p.add_argument("--progress-every", type=float_in(0.0), default=default, metavar="SECONDS",
                   help=f"the most seconds between progress lines while training (step/total, loss, images/s, "
                        f"elapsed, ETA; also at the first and last step, and {evaluations}; 0 = every step; "
                        f"default {default:g})")
    p.add_argument("-q", "--quiet", action="store_true",
                   help=f"no progress lines{also_quiet} (errors and the final summary still print)")


__all__ = ["STORAGE_HELP", "UsageError", "add_grid_arguments", "add_progress_arguments", "add_storage_options", "check_ovsam_model",
           "check_output_shards", "expand_inputs", "float_in", "int_at_least", "json_object", "non_negative_int",
           "positive_int", "storage_options"]
