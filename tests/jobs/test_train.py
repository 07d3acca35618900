"""``ovsam train`` end to end on synthetic shards.

- learning (acceptance 1): ovsam-tiny on 2 Ray Train workers lifts held-out mask IoU and top-1 accuracy far above
  the untrained model's;
- a worker killed mid-run (fault injection, ``max_failures=1``) and a driver killed with SIGKILL and relaunched
  with the same ``--name`` both resume from the newest checkpoint (step counter and optimiser state continue) and
  end within noise of the uninterrupted run (acceptance 3);
- a mixture of image-, box- and mask-level datasets with different vocabularies trains in one run, its measured
  sampling frequencies follow the weights and no batch mixes datasets (acceptance 4);
- the output file loads with ``build_ovsam`` and ``ovsam annotate --checkpoint``, and exports the released layout.
- ``ovsam train`` prints progress lines (step/total, loss, images/s, elapsed, ETA; the trunk warm-up's too) and
  each held-out evaluation's result from 2 Ray Train workers, with Ray forwarding none of the workers' output;
  ``-q`` leaves them out and keeps the summary.

The default suite's learning run is the shipped recipe with its two phases shortened (``SHORT_RUN``: 250 trunk
warm-up steps, then 250 CLIP2SAM steps on the same cosine schedule). It shows a clear gain in about 4 min (252 s on a
2-core AMD EPYC) and gives the interruption tests a trained model to continue. The recipe as shipped (1,200 + 800
steps, 746 s on the same machine) is the acceptance run for learning and is marked ``slow`` (``make test-all``): the
random-init mask decoder leaves its all-background plateau only after ~250-300 steps, and labels need a trunk whose
channels tell the shapes apart, which the warm-up trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from jobs import trainer
from jobs.train import SYNTHETIC_RECIPE, TrainJobConfig, run_train
from pipeline.training.train_specs import DatasetSpec

REPO = Path(__file__).resolve().parents[2]
# The short-run recipe for the random-init tiny model (jobs/train.py, also the demo's): 1,200 steps of region
# classification train the calibrated random CLIP trunk first, then 800 CLIP2SAM steps at lr 2e-3 with a 75-step
# warm-up, cosine decay and no clipping, 4 images x 10 prompts per worker, 1024 mask points, bare-name text
# embeddings; the CLIP trunk and the neck train too, and masks are classified on their largest part's box.
CHECKPOINT_EVERY = 100
TRAIN_ARGS = {**SYNTHETIC_RECIPE, "checkpoint_every": CHECKPOINT_EVERY, "eval_samples": 48, "report_every": 20}
SHORT_RUN = {"trunk_warmup": 250, "steps": 250}
SHORT_STEPS = SHORT_RUN["trunk_warmup"] + SHORT_RUN["steps"]  # the trunk warm-up, then the CLIP2SAM steps
TOTAL_STEPS = SYNTHETIC_RECIPE["trunk_warmup"] + SYNTHETIC_RECIPE["steps"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from pipeline.training.packers.synthetic import pack_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    pack_synthetic(str(root / "mask"), kind="mask", num_train=256, num_heldout=48, samples_per_shard=32)
    return root


def _config(shards: Path, storage: Path, name: str, **kw) -> TrainJobConfig:
    args = {**TRAIN_ARGS, **kw}
    return TrainJobConfig(datasets=(DatasetSpec("synthetic", str(shards / "mask" / "train"), "mask", 1.0),),
                          heldout=(("synthetic", str(shards / "mask" / "heldout")),), name=name,
                          storage_path=str(storage), **args)


def _final_state(metrics: dict) -> dict:
    return trainer.read_state(metrics["checkpoint"])


def _run_reference(shards: Path, out: Path, **kw) -> dict:
    """An uninterrupted run on 2 workers, evaluated before and after training."""
    start = time.time()
    metrics = run_train(_config(shards, out / "runs", "reference", eval_at_start=True, **kw),
                        output=str(out / "model.safetensors"))
    metrics["test_wall_s"] = time.time() - start
    metrics["out"] = out
    print(json.dumps({k: v for k, v in metrics.items() if "/" in k or k.endswith("_s")}, indent=1, default=str))
    return metrics


def _assert_gains(m: dict, steps: int, margins: dict[str, float], probe: float) -> None:
    """The run took ``steps`` steps on 2 workers, started near chance and gained more than ``margins[key]`` on every
    held-out metric named; the warm-up's probe on the held-out GT boxes reached ``probe``."""
    assert m["step"] == steps and m["world_size"] == 2 and m["batches/synthetic"] == steps
    before = {k.split("/", 2)[2]: v for k, v in m.items() if k.startswith("initial/synthetic/")}
    after = {k.split("/", 2)[2]: v for k, v in m.items() if k.startswith("eval/synthetic/")}
    for prompt in ("box", "point"):  # untrained: near chance
        assert before[f"{prompt}/miou"] < 0.1 and before[f"{prompt}/acc"] < 0.2
    for key, margin in margins.items():
        assert after[key] > before[key] + margin, (key, before, after)
    assert m["warmup/synthetic/probe_acc"] > probe
    assert after["box/count"] > 100  # every held-out instance was scored once, over both workers


@pytest.fixture(scope="module")
def reference(ray_local, shards, tmp_path_factory) -> dict:
    """The short run (``SHORT_RUN``), which the interruption and output tests continue from."""
    return _run_reference(shards, tmp_path_factory.mktemp("reference"), **SHORT_RUN)


def test_short_run_clearly_improves_heldout_iou_and_accuracy(reference):
    # Measured on a 2-core AMD EPYC (seed 0, 252 s): box prompts mIoU 0.03 -> 0.35, top-1 0.07 -> 0.29, on GT boxes
    # 0.05 -> 0.58; single clicks mIoU 0.04 -> 0.35, top-1 0.03 -> 0.28; the warm-up's probe 0.67. The masks are
    # still leaving the decoder's all-background plateau; the margins leave room for other CPUs' float kernels.
    _assert_gains(reference, SHORT_STEPS, {"box/miou": 0.2, "box/acc": 0.12, "box/gt_box_acc": 0.3,
                                           "point/miou": 0.2, "point/acc": 0.12}, probe=0.45)


@pytest.mark.slow
def test_shipped_recipe_improves_heldout_iou_and_accuracy(ray_local, shards, tmp_path):
    # masks and labels far above the untrained model. Measured (a run repeats bit for bit on one machine, not across
    # CPUs) on a 2-core AMD EPYC, seeds 0, 1 and 2: box prompts mIoU 0.03 -> 0.81 (all three), top-1 0.07 -> 0.79,
    # 0.68, 0.74, on GT boxes 0.05 -> 0.81, 0.73, 0.80; single clicks mIoU 0.04 -> 0.73, 0.73, 0.76, top-1 0.03 ->
    # 0.70, 0.57, 0.71. On an earlier machine, seeds 0 and 1: box mIoU 0.80, 0.78, top-1 0.61, 0.61, on GT boxes
    # 0.66, 0.72; clicks mIoU 0.69, 0.71, top-1 0.53, 0.58. The warm-up's probe: 0.70-0.78 over both machines.
    _assert_gains(_run_reference(shards, tmp_path), TOTAL_STEPS,
                  {"box/miou": 0.6, "box/acc": 0.4, "box/gt_box_acc": 0.45, "point/miou": 0.45, "point/acc": 0.3},
                  probe=0.5)


def test_eval_prompts_equals_the_training_jobs_heldout_evaluation(reference, shards, tmp_path):
    """``ovsam eval prompts --shards`` on the trained model, with the vocabulary the run classified against, gives
    the numbers of the training job's own final held-out evaluation: the same instances, labels and IoUs, up to
    the order the sums are added in. (This needs the workers' BatchNorm statistics averaged before evaluating and
    checkpointing: the trunk trains, each worker's statistics follow its own batches, and without that the two
    workers evaluated with different models and the checkpoint held rank 0's: box mIoU 3.5e-5 and 2 of 122 labels
    off.)"""
    from pipeline.evaluation.prompts import EvalPromptsConfig, run_eval_prompts

    out = reference["out"]
    cfg = EvalPromptsConfig(output=str(tmp_path / "eval"), model="ovsam-tiny",
                            checkpoint=str(out / "model.safetensors"),
                            vocabulary=str(out / "model.synthetic.vocab.safetensors"),
                            shards=(str(shards / "mask" / "heldout"),), batch_size=4, workers=0)
    summary = run_eval_prompts(cfg, progress=lambda *_: None)
    for prompt in ("box", "point"):
        got = summary["prompts"][prompt]["summary"]
        assert got["count"] == reference[f"eval/synthetic/{prompt}/count"] > 100
        for key in ("miou", "acc", "head_acc", "gt_box_acc"):
            want = reference[f"eval/synthetic/{prompt}/{key}"]
            assert got[key] == pytest.approx(want, rel=1e-9, abs=1e-12), (prompt, key, got[key], want)


def _close(a: dict, b: dict, keys: list[str], tol: float) -> None:
    print({k: (round(a[k], 3), round(b[k], 3)) for k in keys})
    for k in keys:
        assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


# The interruption tests continue training the reference model for a short run, so their metrics are at a trained
# level, and compare an interrupted run with an uninterrupted one of the same settings. A resumed run draws other
# samples after the restart than the uninterrupted one, and the reference model's labels are fragile: 40 steps at
# lr 1e-4 moved held-out top-1 between 0.39 and 0.57 depending on the draw (mask IoU within 0.01), so the
# continuation runs at 1e-5. It has no trunk warm-up and keeps the trunk and the neck frozen, as _train_cmd does
# (test_unfrozen_state_round_trips covers what a resume restores for unfrozen parts).
FT_STEPS = 40
FT_EVERY = 10
FT_ARGS = {"trunk_warmup": 0, "steps": FT_STEPS, "batch_size": 4, "num_prompts": 10, "lr": 1e-5, "warmup_steps": 1,
           "schedule": "constant", "clip_grad_norm": 0.0, "checkpoint_every": FT_EVERY, "eval_samples": 48,
           "report_every": 10, "templates": "plain", "mask_points": 1024}
FINAL_KEYS = ["eval/synthetic/box/miou", "eval/synthetic/point/miou", "eval/synthetic/box/acc",
              "eval/synthetic/box/gt_box_acc"]


def _ft_config(shards: Path, reference: dict, storage: Path, name: str, **kw) -> TrainJobConfig:
    # 0 on the command line = None here: no clipping; and no --unfreeze, as on the command line of _train_cmd
    args = {**FT_ARGS, "clip_grad_norm": None, "unfreeze": (), **kw}
    return _config(shards, storage, name, checkpoint=str(reference["out"] / "model.safetensors"), **args)


@pytest.fixture(scope="module")
def finetune(reference, shards, tmp_path_factory) -> dict:
    """The uninterrupted short continuation of the reference model."""
    out = tmp_path_factory.mktemp("finetune")
    return run_train(_ft_config(shards, reference, out / "runs", "finetune"))


def _optimizer_steps(state: dict) -> set[int]:
    return {int(s["step"]) for s in state["optimizer"]["state"].values()}


def test_worker_death_resumes_and_matches(reference, finetune, shards, tmp_path):
    marker = tmp_path / "fault"
    # Ray Train registers a checkpoint once the controller has taken every worker's report of it; a worker's next
    # report waits for that (a queue of one), so by step 2.5 x FT_EVERY the step-FT_EVERY checkpoint is registered
    fault_step = 2 * FT_EVERY + FT_EVERY // 2
    metrics = run_train(_ft_config(shards, reference, tmp_path / "runs", "worker-fault", max_failures=1,
                                   fault_at=(fault_step, str(marker))))
    assert marker.read_text().startswith(f"killed at step {fault_step}")
    # the restarted workers resumed from the newest registered checkpoint before the fault, not from scratch
    assert metrics["resumed_from"] in (FT_EVERY, 2 * FT_EVERY)
    state = _final_state(metrics)
    assert state["step"] == FT_STEPS and state["samples"] == FT_STEPS * 2 * FT_ARGS["batch_size"]
    # AdamW's step counters and the schedule continued across the restart: a fresh optimiser would count at most
    # FT_STEPS - FT_EVERY (parameters without a gradient on a step, e.g. an FPN level no RoI used, count less)
    assert max(_optimizer_steps(state)) == max(_optimizer_steps(_final_state(finetune))) == FT_STEPS
    assert state["scheduler"]["last_epoch"] == FT_STEPS
    _close(metrics, finetune, FINAL_KEYS, tol=0.1)


def _train_cmd(shards: Path, reference: dict, storage: Path, name: str, summary: Path) -> list[str]:
    args = [sys.executable, "-m", "jobs.train", "--dataset", f"synthetic={shards / 'mask' / 'train'}:mask:1",
            "--heldout", f"synthetic={shards / 'mask' / 'heldout'}", "--name", name, "--storage-path", str(storage),
            "--checkpoint", str(reference["out"] / "model.safetensors"), "--ray-address", "local",
            "--num-workers", "2", "--summary", str(summary)]
    for key, value in FT_ARGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_driver_killed_and_relaunched_resumes(reference, finetune, shards, tmp_path):
    storage = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(_train_cmd(shards, reference, storage, "driver-kill", tmp_path / "first.json"),
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 600
            snapshot = storage / "driver-kill" / "checkpoint_manager_snapshot.json"
            while time.time() < deadline and proc.poll() is None:
                # kill once Ray Train has persisted a registered checkpoint (its snapshot lists one)
                if snapshot.exists() and '"checkpoint_dir_name"' in snapshot.read_text():
                    break
                time.sleep(0.5)
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray instance it started
            proc.wait()
    assert not (tmp_path / "first.json").exists()  # it did not finish
    second = subprocess.run(_train_cmd(shards, reference, storage, "driver-kill", tmp_path / "second.json"),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    metrics = json.loads((tmp_path / "second.json").read_text())
    assert metrics["resumed_from"] >= FT_EVERY and metrics["resumed_from"] % FT_EVERY == 0
    state = trainer.read_state(metrics["checkpoint"])
    assert state["step"] == FT_STEPS and max(_optimizer_steps(state)) == FT_STEPS
    assert state["scheduler"]["last_epoch"] == FT_STEPS
    _close(metrics, finetune, FINAL_KEYS, tol=0.1)


def test_output_loads_for_annotate_and_exports_released(reference, tmp_path):
    from ovsam import build_ovsam
    from ovsam.checkpoint import read_metadata

    out = reference["out"]
    from jobs.train import export_outputs

    model = build_ovsam("ovsam-tiny", checkpoint=out / "model.safetensors")
    trained = trainer.read_state(reference["checkpoint"])["trainable"]
    # the recipe also trains the CLIP trunk (BatchNorm statistics included) and the neck
    assert any(k.startswith("backbone.") and k.endswith("running_var") for k in trained)
    assert any(k.startswith("neck.") for k in trained) and not any(k.startswith("text.") for k in trained)
    for k, v in trained.items():
        assert torch.equal(model.state_dict()[k], v), k
    # the trained model classifies with the head alone, on the RoI rule of the recipe
    assert not model.config.recognition.ensemble
    assert model.config.recognition.roi_box == SYNTHETIC_RECIPE["roi_box"]
    assert read_metadata(out / "model.safetensors")["trained_steps"] == str(SHORT_STEPS)
    # the released layout holds the neck, FPN and head, but has no place for a trained CLIP trunk
    with pytest.raises(ValueError, match="no place for a trained CLIP trunk"):
        run_train(_config(Path("/nonexistent"), tmp_path / "runs", "released"), export_released=str(tmp_path))
    export_outputs(out / "model.safetensors", released_dir=str(tmp_path / "released"))
    released = torch.load(tmp_path / "released" / "clip2sam.pth", weights_only=True)
    assert released and all(k.startswith(("fpn_neck.", "mask_decoder.")) for k in released)
    assert torch.equal(released["fpn_neck." + next(k for k in trained if k.startswith("fpn_neck.")).split(".", 1)[1]],
                       trained[next(k for k in trained if k.startswith("fpn_neck."))])
    neck = torch.load(tmp_path / "released" / "sam2clip.pth", weights_only=True)
    key = next(k for k in trained if k.startswith("neck."))
    assert torch.equal(neck["neck_student." + key.split(".", 1)[1]], trained[key])
    # beside the output: the vocabulary the run classified against (bare names, every class a trained base class)
    from ovsam import Vocabulary
    from pipeline.training.synthetic import CLASS_NAMES, write_shards

    vocabulary_file = out / "model.synthetic.vocab.safetensors"
    assert reference["vocabularies"] == {"synthetic": str(vocabulary_file)}
    vocabulary = Vocabulary.load(vocabulary_file)
    assert vocabulary.names == list(CLASS_NAMES) and vocabulary.templates == ("{}",)
    assert set(vocabulary.split.tolist()) == {1}
    # the annotation job runs with the trained file and that vocabulary
    write_shards(tmp_path / "in", num_shards=1, samples_per_shard=3)
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "annotate", "--input", str(tmp_path / "in" / "*.tar"),
                          "--output", str(tmp_path / "ann"), "--checkpoint", str(out / "model.safetensors"),
                          "--vocabulary", str(vocabulary_file), "--workers", "1", "--ray-address", "local"],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert len(list((tmp_path / "ann" / "_manifest").glob("*.json"))) == 1


def _pack_relabelled(root: Path, name: str, kind: str, classes: list[str], relabel, num: int) -> Path:
    """A synthetic shard set of ``kind`` whose labels are ``relabel(synthetic class name)`` indices into
    ``classes``: the same scenes under another vocabulary."""
    import dataclasses

    from pipeline.training.packers.synthetic import plan_synthetic
    from pipeline.training.packers.writer import PackPlan, write_plan
    from pipeline.training.synthetic import CLASS_NAMES
    from schemas.training import ClassesFile

    base = plan_synthetic(kind, num, split="train", seed=len(name))

    def load(i):
        sample = base.load(i)
        rec = sample.record
        mapped = {f: [classes.index(relabel(CLASS_NAMES[v])) for v in getattr(rec, f)]
                  for f in ("labels", "image_labels")}
        return dataclasses.replace(sample, record=dataclasses.replace(rec, dataset=name, **mapped))

    plan = PackPlan(classes=ClassesFile(dataset=name, kind=kind, classes=classes), settings={"test": name},
                    items=base.items, load=load)
    write_plan(plan, str(root / name), samples_per_shard=8)
    return root / name


def test_mixture_of_kinds_and_vocabularies(tmp_path, monkeypatch):
    import ovsam.clip2sam

    colours = ["red", "green", "blue", "yellow"]
    shapes = ["square", "circle", "triangle"]
    sets = {
        "colours": (_pack_relabelled(tmp_path, "colours", "image", colours, lambda n: n.split()[0], 16), "image", 4),
        "shapes": (_pack_relabelled(tmp_path, "shapes", "box", shapes, lambda n: n.split()[1], 16), "box", 2),
        "scenes": (_pack_relabelled(tmp_path, "scenes", "mask", [f"{c} {s}" for c in colours for s in shapes],
                                    lambda n: n, 16), "mask", 1),
    }
    sizes = {"colours": 4, "shapes": 3, "scenes": 12}
    seen = []
    real = ovsam.clip2sam.clip2sam_losses

    def recording(model, batch, text, cfg, generator=None):
        seen.append({"datasets": {s.dataset for s in batch}, "kinds": {s.kind for s in batch},
                     "max_label": max(int(s.labels.max()) for s in batch), "classes": text.shape[0],
                     "points": int(sum(int(s.is_point.sum()) for s in batch))})
        return real(model, batch, text, cfg, generator)

    monkeypatch.setattr(ovsam.clip2sam, "clip2sam_losses", recording)
    steps = 140
    cfg = TrainJobConfig(datasets=tuple(DatasetSpec(n, str(p), k, w) for n, (p, k, w) in sets.items()),
                         name="mixture", storage_path=str(tmp_path / "runs"), steps=steps, batch_size=2,
                         num_prompts=8, checkpoint_every=steps, num_workers=0, mask_points=256)
    start = time.time()
    metrics = run_train(cfg)
    print(f"mixture: {steps} steps in {time.time() - start:.0f} s")
    assert len(seen) == steps
    for batch in seen:  # one dataset per batch, classified against its own vocabulary
        (name,) = batch["datasets"]
        assert batch["kinds"] == {sets[name][1]}
        assert batch["classes"] == sizes[name] and batch["max_label"] < sizes[name]
        assert (batch["points"] > 0) == (name == "scenes")  # only mask-level data gets point prompts
    counts = Counter(next(iter(b["datasets"])) for b in seen)
    assert {k: metrics[f"batches/{k}"] for k in sets} == dict(counts)
    total = sum(w for _, _, w in sets.values())
    for name, (_, _, weight) in sets.items():
        p = weight / total
        assert abs(counts[name] / steps - p) < 4 * math.sqrt(p * (1 - p) / steps), (name, counts, p)
    # the vocabularies were built once each and cached
    assert len(list((tmp_path / "runs" / "_vocab").glob("*.safetensors"))) == 3
    assert metrics["step"] == steps


def test_unfreeze_and_roi_box_flags(tmp_path):
    import argparse

    from jobs.train import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--dataset", f"s={tmp_path}:mask:1", "--name", "n", "--storage-path", str(tmp_path)]
    cfg = config_from_args(p.parse_args(base + ["--unfreeze", "clip, neck", "--roi-box", "largest_component"]))
    assert cfg.unfreeze == ("clip", "neck") and cfg.roi_box == "largest_component"
    assert TrainJobConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    plain = config_from_args(p.parse_args(base))
    assert plain.unfreeze == () and plain.roi_box is None
    # unfreezing changes the training (a relaunch with other parts unfrozen is refused); the RoI rule does not
    assert cfg.training_hash() != plain.training_hash()
    assert config_from_args(p.parse_args(base + ["--roi-box", "largest_component"])).training_hash() == \
        plain.training_hash()
    with pytest.raises(ValueError, match="cannot unfreeze 'text'; it can unfreeze clip, neck"):
        config_from_args(p.parse_args(base + ["--unfreeze", "clip,text"]))
    warm = config_from_args(p.parse_args(base + ["--trunk-warmup", "5"]))
    assert warm.trunk_warmup == 5 and warm.trains_trunk() and not plain.trains_trunk() and cfg.trains_trunk()
    assert warm.training_hash() != plain.training_hash()
    with pytest.raises(ValueError, match="trunk-warmup must be >= 0"):
        config_from_args(p.parse_args(base + ["--trunk-warmup", "-1"]))


def test_unfrozen_state_round_trips():
    """What a checkpoint holds and a resume restores when the trunk and the neck train: their weights and the
    trunk's BatchNorm statistics, and nothing of the frozen text tower or prompt encoder."""
    from jobs.train_loop import _trainable_state
    from ovsam import build_ovsam
    from ovsam.training import set_trainable

    model = build_ovsam("ovsam-tiny")
    set_trainable(model, "clip2sam", ("clip", "neck"))
    with torch.no_grad():  # every weight and buffer (BatchNorm statistics included) away from the random init
        for v in model.state_dict().values():
            v.add_(1) if not v.is_floating_point() else v.add_(torch.rand_like(v) + 0.5)
    state = _trainable_state(model, ("clip", "neck"))
    assert {k.split(".")[0] for k in state} == {"backbone", "neck", "fpn_neck", "mask_decoder"}
    fresh = build_ovsam("ovsam-tiny")
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("text.", "prompt_encoder.")) for k in missing)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v) == (not k.startswith(("text.", "prompt_encoder."))), k


def test_evaluation_restores_each_modules_train_mode():
    """The held-out evaluations run everything in eval mode and hand back each module's own train mode, so a trunk
    that trains keeps updating its BatchNorm statistics after an evaluation and a frozen one keeps them."""
    from jobs.train_loop import _in_eval_mode
    from ovsam import build_ovsam
    from ovsam.clip2sam import RegionProbe
    from ovsam.training import set_trainable, train_mode

    model = build_ovsam("ovsam-tiny")
    probe = RegionProbe.for_model(model, {"synthetic": 5}).train()
    set_trainable(model, "clip2sam", ("clip",))
    train_mode(model, "clip2sam", ("clip",))
    modes = {n: m.training for n, m in [*model.named_modules(), ("probe", probe)]}
    assert modes["backbone.visual.layer1.0.bn1"] and not modes["neck"] and modes["fpn_neck"]
    with _in_eval_mode(model, probe):
        assert not any(m.training for m in [*model.modules(), *probe.modules()])
    assert {n: m.training for n, m in [*model.named_modules(), ("probe", probe)]} == modes


def _states_by_step(run_dir: Path) -> dict[int, dict]:
    states = [trainer.read_state(p) for p in run_dir.glob("checkpoint_*")]
    return {int(s["step"]): s for s in states}


def test_trunk_warmup_trains_the_trunk_first_and_resumes(tmp_path):
    """``--trunk-warmup N``: the first N steps train the CLIP trunk alone (region classification through a probe
    that is not part of the model), then the CLIP2SAM steps train the head with the trunk frozen again; the
    checkpoints of either phase resume it, and the trained model classifies without the frozen-CLIP ensemble."""
    import shutil

    from ovsam import build_ovsam
    from pipeline.training.packers.synthetic import pack_synthetic

    pack_synthetic(str(tmp_path / "data"), kind="mask", num_train=8, num_heldout=2, samples_per_shard=4)
    warm, steps = 3, 3
    cfg = TrainJobConfig(datasets=(DatasetSpec("synthetic", str(tmp_path / "data" / "train"), "mask", 1.0),),
                         heldout=(("synthetic", str(tmp_path / "data" / "heldout")),), eval_samples=2,
                         name="warm", storage_path=str(tmp_path / "runs"), steps=steps, trunk_warmup=warm,
                         batch_size=2, num_prompts=4, lr=1e-3, warmup_steps=1, schedule="cosine",
                         mask_points=64, templates="plain", checkpoint_every=1, num_to_keep=10, num_workers=0)
    metrics = run_train(cfg, output=str(tmp_path / "model.safetensors"))
    assert metrics["step"] == warm + steps and metrics["batches/synthetic"] == warm + steps
    assert 0 <= metrics["warmup/synthetic/probe_acc"] <= 1  # the probe on the held-out GT boxes, after the warm-up
    assert "eval/synthetic/box/miou" in metrics
    run = tmp_path / "runs" / "warm"
    states = _states_by_step(run)
    assert sorted(states) == list(range(1, warm + steps + 1))
    init = build_ovsam("ovsam-tiny").state_dict()

    def part(step: int, prefix: str) -> dict:
        return {k: v for k, v in states[step]["trainable"].items() if k.startswith(prefix)}

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    init_fpn = {k: v for k, v in init.items() if k.startswith("fpn_neck.")}
    init_trunk = {k: v for k, v in init.items() if k.startswith("backbone.")}
    assert not same(part(warm, "backbone."), init_trunk)  # the warm-up trained the trunk (BatchNorm included)
    assert same(part(warm, "fpn_neck."), init_fpn)  # ... and nothing of the head
    assert same(part(warm + steps, "backbone."), part(warm, "backbone."))  # then the trunk is frozen again
    assert not same(part(warm + steps, "fpn_neck."), init_fpn)
    for step, state in states.items():  # the probe and its optimiser are saved while the warm-up runs
        assert ("warmup" in state) == (step < warm), step
        if step < warm:
            assert state["warmup"]["scheduler"]["last_epoch"] == step
            assert max(_optimizer_steps(state["warmup"])) == step
    assert states[warm + steps]["scheduler"]["last_epoch"] == steps
    assert max(_optimizer_steps(states[warm + steps])) == steps  # the CLIP2SAM optimiser only ran after it
    trained = build_ovsam(checkpoint=str(tmp_path / "model.safetensors"))
    assert not trained.config.recognition.ensemble
    assert same({k: v for k, v in trained.state_dict().items() if k.startswith("backbone.")},
                part(warm + steps, "backbone."))

    # the run is a function of its settings: the same again, with another global RNG state, trains bit for bit
    # the same (the probe is initialised from the run's seed, as on every Ray Train worker)
    torch.manual_seed(12345)
    run_train(dataclasses.replace(cfg, storage_path=str(tmp_path / "again")))
    repeat = _states_by_step(tmp_path / "again" / "warm")
    for step in (1, warm, warm + steps):
        assert same(repeat[step]["trainable"], states[step]["trainable"]), step
    assert same(repeat[1]["warmup"]["probe"], states[1]["warmup"]["probe"])

    # a relaunch resumes inside the warm-up (from step 1) and carries the probe's optimiser on
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed / "warm")
    for p in resumed.joinpath("warm").glob("checkpoint_*"):
        if trainer.read_state(p)["step"] > 1:
            shutil.rmtree(p)
    metrics = run_train(dataclasses.replace(cfg, storage_path=str(resumed)))
    assert metrics["resumed_from"] == 1 and metrics["step"] == warm + steps
    again = _states_by_step(resumed / "warm")
    assert max(_optimizer_steps(again[2]["warmup"])) == 2 and again[2]["warmup"]["scheduler"]["last_epoch"] == 2
    assert max(_optimizer_steps(again[warm + steps])) == steps
    with pytest.raises(ValueError, match="no place for a trained CLIP trunk"):
        run_train(cfg, export_released=str(tmp_path / "released"))


STEP_LINE = (r"\[train\] step {step}/6 \(\d+%\)  loss [-+.\deEinf]+  [\d.]+ images/s  elapsed \d+s  "
             r"ETA (\d+s|\?)")


def test_progress_lines_and_quiet(ray_local, tmp_path, capsys):
    """A tiny ``ovsam train`` (3 trunk warm-up + 3 CLIP2SAM steps on 2 workers, 2 held-out scenes) with
    ``--progress-every 0``: a line per step through both phases, each evaluation as it starts and ends; then one
    step in one process with ``-q``: no progress lines, the summary still printed. About 50 s on 2 busy shared cores,
    most of it starting the Ray Train workers."""
    import re

    from jobs.cli import main
    from pipeline.training.packers.synthetic import pack_synthetic

    data = tmp_path / "data"
    pack_synthetic(str(data), kind="mask", num_train=8, num_heldout=2, samples_per_shard=4)
    argv = ["train", "--dataset", f"synthetic={data / 'train'}:mask:1", "--heldout", f"synthetic={data / 'heldout'}",
            "--eval-samples", "2", "--eval-at-start", "--storage-path", str(tmp_path / "runs"), "--trunk-warmup", "3",
            "--steps", "3", "--batch-size", "2", "--num-prompts", "4", "--mask-points", "64", "--templates", "plain",
            "--checkpoint-every", "10", "--progress-every", "0"]
    capsys.readouterr()
    assert main(argv + ["--name", "progress", "--num-workers", "2"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[train]")]
    assert lines[0].startswith("[train] starting Ray and 2 Ray Train worker(s) for run 'progress'")
    assert any(line.startswith("[train] 2 worker(s) ready: ovsam-tiny, 3 trunk warm-up steps, then 3 CLIP2SAM")
               for line in lines)
    steps = [line for line in lines if line.startswith("[train] step ")]
    assert len(steps) == 6, steps  # --progress-every 0: every step
    for step, line in enumerate(steps, 1):
        assert re.fullmatch(STEP_LINE.format(step=step) + (r" \+ 3 CLIP2SAM steps  \(trunk warm-up\)" if step <= 3
                                                           else r"  \(CLIP2SAM\)"), line), line
    assert steps[-1].startswith("[train] step 6/6 (100%)")
    evals = [line for line in lines if "held-out" not in line and ": synthetic" in line]
    assert [line.split(":")[0] for line in evals] == ["[train] before training (step 0)",
                                                       "[train] trunk warm-up done (step 3)",
                                                       "[train] after training (step 6)"], lines
    assert re.search(r"synthetic/box mIoU [\d.]+ top-1 [\d.]+; synthetic/point mIoU [\d.]+ top-1 [\d.]+ \(\d+ s\)$",
                     evals[-1]) and "synthetic probe top-1" in evals[1]
    assert lines.index(evals[0]) < lines.index(steps[0]) and lines.index(evals[2]) > lines.index(steps[-1])
    assert "trained 6 steps in" in out and "held-out synthetic/box/miou" in out

    # -q, in one process and as short as a run gets: no progress lines, the summary as before
    quiet = [a for a in argv if a not in ("--eval-at-start",)]
    quiet[quiet.index("--trunk-warmup") + 1] = "0"
    quiet[quiet.index("--steps") + 1] = "1"
    assert main(quiet + ["--name", "quiet", "--num-workers", "0", "-q"]) == 0
    out = capsys.readouterr().out
    assert "[train]" not in out and "trained 1 steps in" in out and "held-out synthetic/box/miou" in out
