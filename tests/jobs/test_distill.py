"""``ovsam distill``: SAM2CLIP distillation of ``sam-tiny`` into ``ovsam-tiny`` on synthetic shards.

Without Ray: the distillation input equals ``prepare_image``'s; mismatched teacher/student shapes are refused naming
both models; the resumed data stream continues exactly where the skipped one was, with DataLoader workers; the
teacher dump holds the online teacher's embeddings to float16 precision, leaves bad samples out with a reason,
skips committed shards on a rerun (rewriting an uncommitted one byte for byte) and refuses another teacher.
On 2 local Ray Train workers: the held-out MSE drops by more than 30 %, the project-format student rebuilds the
trained model and the exported ``neck_student.*`` file loaded into a fresh ``ovsam-tiny`` reproduces its embeddings
exactly; training from the dumped cache also drops the MSE, and after a crash that ends the run a relaunch with the
same --name continues from the last checkpoint. The driver prints rank 0's progress lines (a line per step with
``--progress-every 0``: step/total, loss, images/s, elapsed, ETA; each held-out MSE), none with ``-q``.

About 60-120 s on 2 shared cores (Ray start and three short training runs; timings vary with machine load).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import distill
from ovsam import build_ovsam
from ovsam.batch import prepare_image
from ovsam.checkpoint import export_released
from ovsam.convert import convert_official
from pipeline.training.distill_data import EMBEDDING_EXT, DistillStream, InputSpec, decode_embedding
from pipeline.inputs.sources import iter_samples
from pipeline.training.synthetic import draw_scene, write_shards
from tests.s3server import moto_s3

STUDENT, TEACHER = "ovsam-tiny", "sam-tiny"
INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill-data")
    write_shards(root / "train", num_shards=4, samples_per_shard=6, seed=1, prefix="train")
    write_shards(root / "heldout", num_shards=1, samples_per_shard=8, seed=2, prefix="heldout")
    write_shards(root / "bad", num_shards=1, samples_per_shard=2, seed=3, prefix="bad", bad_samples=True)
    return {"root": root, "train": root / "train" / "*.tar", "heldout": root / "heldout" / "*.tar",
            "bad": root / "bad" / "*.tar"}


def _args(argv: list[str]):
    from jobs.cli import build_parser

    return build_parser().parse_args(["distill", *argv])


def _inputs(model, n: int = 3, seed: int = 7) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([prepare_image(model, draw_scene(rng, 200, 300, 2)[0]).tensor for _ in range(n)])


def _embed(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.neck(model.backbone(x))


# ---------------------------------------------------------------------------------------------------------------
# Without Ray


def test_input_spec_is_prepare_image():
    student = build_ovsam(STUDENT)
    image = draw_scene(np.random.default_rng(0), 170, 301, 3)[0]
    assert torch.equal(InputSpec.of(student.config).prepare(image), prepare_image(student, image).tensor)
    # the dump prepares for the teacher with the published (OpenCV) resize: the student's input exactly
    teacher = build_ovsam(TEACHER)
    assert torch.equal(InputSpec.of(teacher.config, resize="cv2").prepare(image), prepare_image(student, image).tensor)


def test_mismatched_embedding_shapes_name_both_models(shards):
    cfg = distill.config_from_args(_args(["--student", STUDENT, "--teacher", "sam-vit-b", "--input",
                                          str(shards["train"]), "--steps", "1"]))
    with pytest.raises(ValueError, match=r"student 'ovsam-tiny' produces a 64x16x16 .* teacher 'sam-vit-b' gives "
                                         r"256x64x64"):
        distill.plan_distill(cfg)
    with pytest.raises(ValueError, match="must be a SAM model"):
        distill.plan_distill(distill.config_from_args(_args(["--student", STUDENT, "--teacher", STUDENT,
                                                             "--input", str(shards["train"])])))


def test_resumed_stream_continues_where_it_stopped(shards):
    urls = sorted(str(p) for p in (shards["root"] / "train").glob("*.tar"))
    spec = InputSpec.of(build_ovsam(STUDENT).config)

    def keys(skip: int, n: int) -> list[str]:
        stream = DistillStream(urls, spec, with_target=False, seed=5, skip=skip, shuffle_buffer=4)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        out = []
        for item in loader:
            out.append(item["key"])
            if len(out) == n:
                return out
        return out

    full = keys(0, 40)  # 24 samples per epoch: crosses into the second epoch
    assert len(set(full[:24])) == 24 and full[24:] != full[:16]  # each epoch sees every sample, in a new order
    assert keys(14, 26) == full[14:]  # a multiple of the loader workers, as step x batch size is in training


def test_dump_matches_online_teacher_and_resumes(shards, tmp_path):
    out = tmp_path / "cache"
    argv = ["--dump-teacher", "--teacher", TEACHER, "--input", str(shards["heldout"]), "--input", str(shards["bad"]),
            "--output", str(out), "--num-workers", "0", "--batch-size", "3"]
    summary = distill.run_dump(distill.config_from_args(_args(argv)))
    assert (summary["shards"], summary["written_shards"], summary["samples"], summary["left_out"]) == (2, 2, 11, 1)
    bad = json.loads((out / "bad-000000.idx.json").read_text())
    assert bad["num_samples"] == 3 and bad["num_items"] == 4
    assert [s["key"] for s in bad["skipped"]] == ["000000/truncated-jpeg"]
    index = json.loads((out / "_index.json").read_text())
    assert {k: v["num_samples"] for k, v in index.items()} == {"bad-000000.tar": 3, "heldout-000000.tar": 8}
    assert json.loads((out / "_teacher.json").read_text())["embedding_shape"] == [64, 16, 16]

    teacher, student = build_ovsam(TEACHER), build_ovsam(STUDENT)
    originals = {s.key: s.files for s in iter_samples(str(next((shards["root"] / "heldout").glob("*.tar"))))}
    cached = list(iter_samples(str(out / "heldout-000000.tar")))
    assert [s.key for s in cached] == list(originals)
    for sample in cached:
        assert sample.files["jpg"] == originals[sample.key]["jpg"]  # original bytes, not re-encoded
        assert sample.files["json"] == originals[sample.key]["json"]
        raw = np.load(__import__("io").BytesIO(sample.files[EMBEDDING_EXT]))
        assert raw.dtype == np.float16 and raw.shape == (64, 16, 16)
        from pipeline.inputs.decode import decode_image

        x = prepare_image(student, decode_image(sample.files["jpg"])[0]).tensor[None]
        with torch.no_grad():
            online = teacher.encode_image(x)[0]
        assert torch.allclose(decode_embedding(sample.files[EMBEDDING_EXT]), online, rtol=1e-3, atol=2e-3)

    # a rerun skips committed shards; a shard whose commit record is missing is written again, identically
    tar = (out / "heldout-000000.tar").read_bytes()
    (out / "heldout-000000.idx.json").unlink()
    again = distill.run_dump(distill.config_from_args(_args(argv)))
    assert (again["written_shards"], again["skipped_shards"]) == (1, 1)
    assert (out / "heldout-000000.tar").read_bytes() == tar
    assert not list((out / "_tmp").iterdir())
    with pytest.raises(ValueError, match="made differently"):
        distill.run_dump(distill.config_from_args(_args([a if a != TEACHER else "sam-vit-b" for a in argv])))


def test_student_clip_weights_load_into_the_frozen_towers(tmp_path):
    source = build_ovsam(STUDENT)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = source.state_dict()
    clip = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.visual.")}
    clip.update({k[len("text.clip."):]: v for k, v in state.items() if k.startswith("text.clip.")})
    torch.save(clip, tmp_path / "clip.pth")
    student = build_ovsam(STUDENT)
    distill.load_clip_weights(student, str(tmp_path / "clip.pth"))
    for k, v in student.named_parameters():  # the towers take the file's weights, nothing else changes
        assert torch.equal(v, state[k]) == k.startswith(("backbone.visual.", "text.clip.")), k
    torch.save({"visual.proj": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="do not fit student 'ovsam-tiny'"):
        distill.load_clip_weights(build_ovsam(STUDENT), str(tmp_path / "wrong.pth"))


ACCESS_KEY, SECRET_KEY, REGION = "ovsam-distill-key", "ovsam-distill-secret", "us-east-1"


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 with dummy credentials in the environment for this module only."""
    with moto_s3(ACCESS_KEY, SECRET_KEY, REGION) as endpoint:
        yield endpoint


def test_dump_to_s3_equals_local_and_trains_from_it(shards, tmp_path, s3_endpoint):
    import boto3

    from pipeline.training.distill_data import iter_once
    from pipeline.training.teacher_cache import cache_shards

    storage = {"key": ACCESS_KEY, "secret": SECRET_KEY,
               "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": REGION}}
    boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                 aws_secret_access_key=SECRET_KEY).create_bucket(Bucket="cache")
    common = ["--dump-teacher", "--teacher", TEACHER, "--input", str(shards["heldout"]), "--num-workers", "0"]
    distill.run_dump(distill.config_from_args(_args(common + ["--output", str(tmp_path / "local")])))
    remote = ["--output", "s3://cache/sam-tiny", "--storage-options", json.dumps(storage)]
    first = distill.run_dump(distill.config_from_args(_args(common + remote)))
    again = distill.run_dump(distill.config_from_args(_args(common + remote)))
    assert (first["written_shards"], again["written_shards"], again["skipped_shards"]) == (1, 0, 1)
    import s3fs

    fs = s3fs.S3FileSystem(**storage)
    assert fs.cat_file("cache/sam-tiny/heldout-000000.tar") == (tmp_path / "local" / "heldout-000000.tar").read_bytes()
    assert json.loads(fs.cat_file("cache/sam-tiny/_index.json")) == json.loads(
        (tmp_path / "local" / "_index.json").read_text())
    assert not fs.glob("cache/sam-tiny/_tmp/*")

    # a training plan on the S3 cache reads the same targets as the local one
    cfg = distill.config_from_args(_args(["--student", STUDENT, "--teacher-cache", "s3://cache/sam-tiny",
                                          "--num-workers", "1", "--storage-options", json.dumps(storage)]))
    plan = distill.plan_distill(cfg)
    assert plan["train_urls"] == cache_shards("s3://cache/sam-tiny", storage) and plan["needs_teacher"] is False
    spec = InputSpec.from_dict(plan["spec"])
    remote_items = list(iter_once(plan["train_urls"], spec, with_target=True, storage_options=storage))
    local_items = list(iter_once([str(tmp_path / "local" / "heldout-000000.tar")], spec, with_target=True))
    assert [i["key"] for i in remote_items] == [i["key"] for i in local_items] and len(local_items) == 8
    for a, b in zip(remote_items, local_items):
        assert torch.equal(a["target"], b["target"]) and torch.equal(a["image"], b["image"])


# ---------------------------------------------------------------------------------------------------------------
# On Ray Train


@pytest.fixture(scope="module")
def ray_local():
    import os

    import ray

    # Ray Train's controller collects reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s) and a report waits for
    # the previous one to be collected; the Ray processes started here inherit a shorter interval
    saved = os.environ.get(INTERVAL)
    os.environ[INTERVAL] = "0.2"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop(INTERVAL)
    else:
        os.environ[INTERVAL] = saved


def _train_argv(tmp: Path, name: str, steps: int, *data: str) -> list[str]:
    return ["--student", STUDENT, "--teacher", TEACHER, *data, "--steps", str(steps), "--batch-size", "2",
            "--lr", "5e-4", "--num-workers", "2", "--checkpoint-every", "4", "--eval-every", "0", "--name", name,
            "--storage-path", str(tmp / "runs"), "--output", str(tmp / "student.safetensors"),
            "--export-released", str(tmp / "released")]


def test_online_distillation_lowers_heldout_mse_and_exports(ray_local, shards, tmp_path, capsys):
    import re

    argv = _train_argv(tmp_path, "online", 10, "--input", str(shards["train"]), "--heldout", str(shards["heldout"]))
    capsys.readouterr()
    s = distill.run_distill(distill.config_from_args(_args(argv + ["--progress-every", "0"])))
    assert s.steps == 10 and s.resumed_from == 0
    # the progress lines reached the driver (Ray forwards no worker output here): every step, and each held-out MSE
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[distill]")]
    steps = [line for line in lines if line.startswith("[distill] step ") and "MSE" not in line]
    assert len(steps) == 10, lines
    for step, line in enumerate(steps, 1):
        assert re.fullmatch(rf"\[distill\] step {step}/10 \(\d+%\)  loss [\d.e+-]+  [\d.]+ images/s  "
                            r"elapsed \d+s  ETA \d+s", line), line
    mse = [line for line in lines if "held-out MSE" in line and "measuring" not in line]
    assert re.fullmatch(r"\[distill\] step 0: held-out MSE [\d.]+ \(\d+ s\)", mse[0]), mse
    assert re.fullmatch(r"\[distill\] step 10: held-out MSE [\d.]+, [\d.]+% below step 0's \(\d+ s\)", mse[1]), mse
    assert lines.index(mse[0]) < lines.index(steps[0]) and lines.index(mse[1]) > lines.index(steps[-1])
    assert [e["step"] for e in s.evals] == [0, 10]
    # per-step losses travel with the reports: the final one holds steps 9 and 10 (the last report was at step 8)
    assert len(s.metrics["losses"]) == 2 and all(np.isfinite(s.metrics["losses"]))
    assert s.heldout_mse < 0.7 * s.heldout_mse_initial, s.evals

    trained = build_ovsam(checkpoint=tmp_path / "student.safetensors")
    fresh = build_ovsam(STUDENT)
    x = _inputs(fresh)
    assert not torch.allclose(_embed(trained, x), _embed(fresh, x))  # the neck did train
    # only the neck trains: everything else is the fresh model's
    for k, v in trained.state_dict().items():
        if not k.startswith("neck."):
            assert torch.equal(v, fresh.state_dict()[k]), k

    # the released neck file, assembled with a fresh ovsam-tiny's other parts by the project's loader
    parts = export_released(fresh, tmp_path / "fresh")
    state = fresh.state_dict()
    torch.save({k: v for k, v in state.items() if k.startswith("prompt_encoder.")}, tmp_path / "sam.pth")
    clip = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.visual.")}
    clip.update({k[len("text.clip."):]: v for k, v in state.items() if k.startswith("text.clip.")})
    torch.save(clip, tmp_path / "clip.pth")
    released = tmp_path / "released" / "sam2clip.pth"
    assert {k.split(".", 1)[0] for k in torch.load(released, weights_only=True)} == {"neck_student"}
    loaded = convert_official(clip=tmp_path / "clip.pth", sam=tmp_path / "sam.pth", sam2clip=released,
                              clip2sam=parts["clip2sam"], model=STUDENT)
    assert torch.equal(_embed(loaded, x), _embed(trained, x))


def test_cache_training_resumes_after_a_crash(ray_local, shards, tmp_path, capsys):
    from ray.train import TrainingFailedError

    cache = tmp_path / "cache"
    for split in ("train", "heldout"):
        distill.run_dump(distill.config_from_args(_args(["--dump-teacher", "--teacher", TEACHER, "--input",
                                                         str(shards[split]), "--output", str(cache / split),
                                                         "--num-workers", "1" if split == "train" else "0"])))
    data = ["--teacher-cache", str(cache / "train"), "--heldout-cache", str(cache / "heldout")]
    # rank 0 dies after step 6 and no restart is allowed: the run fails with its step-4 checkpoint saved (the
    # report at step 5 waits until Ray Train has taken in the step-4 checkpoint, so the crash cannot overtake it)
    with pytest.raises(TrainingFailedError):
        distill.run_distill(distill.config_from_args(_args(
            _train_argv(tmp_path, "cached", 8, *data) + ["--max-failures", "0", "--fail-at-step", "6",
                                                         "--report-every", "5"])))
    assert not (tmp_path / "student.safetensors").exists()
    out = capsys.readouterr().out
    assert "[distill] teacher dump: shard 4/4 committed (train-" in out  # a line per shard the dump commits
    assert "[distill] step 1/8 (12%)  loss " in out  # the crashed run's progress up to the crash
    # the relaunch with the same name continues from step 4, with the held-out MSE measured before the crash
    s = distill.run_distill(distill.config_from_args(_args(_train_argv(tmp_path, "cached", 8, *data) + ["-q"])))
    assert s.steps == 8 and s.resumed_from == 4
    assert "[distill]" not in capsys.readouterr().out  # -q: no progress lines
    assert [e["step"] for e in s.evals] == [0, 8]
    assert s.heldout_mse < 0.7 * s.heldout_mse_initial, s.evals
    assert build_ovsam(checkpoint=tmp_path / "student.safetensors").config.name == STUDENT


def test_bf16_distillation_trains_the_fp32_neck_and_records_its_precision(ray_local, shards, tmp_path):
    from ovsam.checkpoint import read_metadata

    argv = _train_argv(tmp_path, "bf16", 4, "--input", str(shards["train"])) + ["--precision", "bf16", "-q"]
    s = distill.run_distill(distill.config_from_args(_args(argv)))
    assert s.steps == 4 and all(np.isfinite(s.metrics["losses"]))
    assert read_metadata(tmp_path / "student.safetensors")["training_precision"] == "bf16"
    trained = build_ovsam(checkpoint=tmp_path / "student.safetensors")
    assert all(v.dtype == torch.float32 for v in trained.neck.state_dict().values() if v.is_floating_point())
    x = _inputs(build_ovsam(STUDENT))
    assert not torch.allclose(_embed(trained, x), _embed(build_ovsam(STUDENT), x))  # the neck did train
