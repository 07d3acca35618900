"""pipeline.training.train_data: dataset specs, shard sets, augmentation and prompt sampling, streaming over DataLoader
workers without duplicates, bad samples skipped, and the mixture sampler. About 15-25 s on 2 shared cores (most of
it packing the small synthetic shard sets and starting two DataLoader workers)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.training import train_data as TD
from schemas.training import TrainingRecord


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    from pipeline.training.packers.synthetic import pack_synthetic

    root = tmp_path_factory.mktemp("packed")
    for kind in ("mask", "image"):
        pack_synthetic(str(root / kind), kind=kind, num_train=8, num_heldout=2, samples_per_shard=2)
    return root


def test_parse_dataset_spec():
    s = TD.parse_dataset_spec("in21k=s3://bucket/in21k/:image:4")
    assert (s.name, s.url, s.kind, s.weight) == ("in21k", "s3://bucket/in21k/", "image", 4.0)
    s = TD.parse_dataset_spec("lvis=/data/lvis:mask")
    assert (s.url, s.kind, s.weight) == ("/data/lvis", "mask", 1.0)
    assert TD.parse_dataset_spec("o=s3://b/o365/*.tar:box:0.5").url == "s3://b/o365/*.tar"
    for bad in ("nolabel", "x=/p:points:1", "x=/p:box:heavy", "x=/p:box:-1", "=/p:box:1"):
        with pytest.raises(ValueError):
            TD.parse_dataset_spec(bad)
    assert TD.parse_heldout_spec("lvis=s3://b/val/") == ("lvis", "s3://b/val/")
    with pytest.raises(ValueError, match="name=URL"):
        TD.parse_heldout_spec("s3://b/val/")


def test_open_shard_set_root_and_glob(packed):
    root = TD.open_shard_set(str(packed / "mask" / "train"))
    assert len(root.shards) == 4 and root.num_samples == 8
    assert root.classes.kind == "mask" and len(root.classes.classes) == 12
    glob = TD.open_shard_set(str(packed / "mask" / "train" / "*.tar"))
    assert glob.shards == root.shards and glob.classes == root.classes
    with pytest.raises(ValueError, match="_index.json"):
        TD.open_shard_set(str(packed))


def test_prompt_selection_fix_and_published():
    rng = np.random.default_rng(0)
    # crowded image: the published code always takes the first 40 annotations, the fix a random 40
    pub = [TD.prompt_selection(50, 40, rng, published=True) for _ in range(20)]
    assert all(sorted(p) == list(range(40)) for p in pub)
    fixed = [TD.prompt_selection(50, 40, rng) for _ in range(20)]
    assert all(len(set(f)) == 40 for f in fixed)
    assert any(max(f) >= 40 for f in fixed)
    # few instances: repeated until there are 40, every instance used
    few = TD.prompt_selection(3, 40, rng)
    assert len(few) == 40 and set(few) == {0, 1, 2}
    assert list(TD.point_flags(40)) == [False] * 21 + [True] * 19
    assert list(TD.point_flags(5)) == [False] * 3 + [True] * 2


def _scene(kind: str, height: int = 120, width: int = 200):
    from ovsam.masks import encode_rle

    image = np.full((height, width, 3), 100, dtype=np.uint8)
    masks = np.zeros((3, height, width), dtype=bool)
    masks[0, 10:50, 20:70] = True
    masks[1, 60:110, 100:190] = True
    masks[2, 0:2, 0:2] = True  # 4 px: under the min area once scaled down
    boxes = [[20, 10, 70, 50], [100, 60, 190, 110], [0, 0, 2, 2]]
    if kind == "image":
        return image, TrainingRecord("d", "image", width, height, 0, image_labels=[5])
    return image, TrainingRecord("d", kind, width, height, 0, labels=[3, 7, 1], boxes=boxes,
                                 masks=encode_rle(masks) if kind == "mask" else [])


def test_prepare_mask_sample_prompts_follow_masks(seed):
    image, record = _scene("mask")
    cfg = TD.AugmentConfig(image_size=64, scale_range=(0.5, 1.5), min_area=8)
    for i in range(10):
        s = TD.prepare_sample(image, record, cfg, np.random.default_rng(i), dataset="d", key="k")
        assert s.image.shape == (3, 64, 64) and s.masks.shape == (40, 64, 64)
        h, w = s.input_hw
        assert s.image[:, h:, :].sum() == 0 and s.image[:, :, w:].sum() == 0
        assert set(s.labels.tolist()) <= {3, 7}  # the tiny instance is dropped
        from ovsam.modeling.recognition import boxes_from_masks

        assert torch.equal(boxes_from_masks(s.masks), s.boxes)  # boxes recomputed from the cropped masks
        assert s.is_point.tolist() == [False] * 21 + [True] * 19
        for j in torch.nonzero(s.is_point)[:, 0]:
            x, y = s.points[j].long().tolist()
            assert s.masks[j, y, x]
        # a prompt's label and mask come from the same instance: prompts with one label share one mask
        first = {}
        for j in range(40):
            ref = first.setdefault(int(s.labels[j]), j)
            assert torch.equal(s.masks[j], s.masks[ref]) and torch.equal(s.boxes[j], s.boxes[ref])


def test_flip_and_fixed_scale(seed):
    image, record = _scene("mask")
    cfg = TD.AugmentConfig(image_size=200, scale_range=(1.0, 1.0), min_area=1, flip_prob=1.0)
    flipped = TD.prepare_sample(image, record, cfg, np.random.default_rng(0))
    plain = TD.prepare_sample(image, record, TD.AugmentConfig(image_size=200, scale_range=(1.0, 1.0), min_area=1,
                                                              flip_prob=0.0), np.random.default_rng(0))
    assert flipped.input_hw == plain.input_hw == (120, 200)
    by_label = {}
    for s in (plain, flipped):
        for j in range(40):
            by_label.setdefault(int(s.labels[j]), []).append(s.masks[j][:120, :200])
    for label, masks in by_label.items():
        assert torch.equal(masks[-1], masks[0].flip(-1)), label


def test_image_level_box_and_published_swap(seed):
    image, record = _scene("image", height=120, width=200)
    cfg = TD.AugmentConfig(image_size=200, scale_range=(1.0, 1.0), flip_prob=0.0)
    s = TD.prepare_sample(image, record, cfg, np.random.default_rng(0))
    assert s.labels.tolist() == [5] and s.boxes.tolist() == [[0.0, 0.0, 200.0, 120.0]] and s.masks is None
    pub = TD.prepare_sample(image, record, TD.AugmentConfig(image_size=200, scale_range=(1.0, 1.0), flip_prob=0.0,
                                                            published_image_box=True), np.random.default_rng(0))
    assert pub.boxes.tolist() == [[0.0, 0.0, 120.0, 200.0]]


def test_box_level_samples_are_box_prompts_only(seed):
    image, record = _scene("box")
    s = TD.prepare_sample(image, record, TD.AugmentConfig(image_size=64, min_area=8), np.random.default_rng(1))
    assert not s.is_point.any() and s.masks is None and len(s.labels) == 40


def test_stream_splits_shards_over_loader_workers_without_duplicates(packed):
    shard_set = TD.open_shard_set(str(packed / "mask" / "train"))
    stream = TD.TrainStream("synthetic", list(shard_set.shards), TD.AugmentConfig(image_size=64), seed=3,
                            shuffle_buffer=4)
    loader = torch.utils.data.DataLoader(stream, batch_size=1, collate_fn=TD.collate, num_workers=2)
    keys = []
    for batch in loader:
        keys.extend(s.key for s in batch)
        if len(keys) == 16:
            break
    # the first epoch of both workers covers the 8 samples once; the second epoch repeats them once more
    assert sorted(keys[:8]) == sorted(set(keys[:8])) and len(set(keys[:8])) == 8
    assert Counter(keys) == Counter({k: 2 for k in set(keys)})


def test_bad_samples_are_skipped(tmp_path, packed, caplog):
    import shutil

    import webdataset as wds

    src = TD.open_shard_set(str(packed / "image" / "train"))
    good = list(src.shards[:1])
    bad = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(bad)) as sink:
        sink.write({"__key__": "broken", "jpg": b"not an image", "json": b'{"dataset": "x"}'})
        sink.write({"__key__": "nojson", "jpg": b"\xff\xd8"})
    shutil.copy(good[0], tmp_path / "good-000000.tar")
    stream = TD.TrainStream("x", [str(bad), str(tmp_path / "good-000000.tar")], TD.AugmentConfig(image_size=64))
    it = iter(stream)
    got = [next(it) for _ in range(4)]
    assert {s.key for s in got} == {k for k, _, _ in TD.iter_samples(good)}
    assert "skipping sample broken" in caplog.text


def test_stream_without_usable_samples_raises(tmp_path):
    import webdataset as wds

    bad = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(bad)) as sink:
        sink.write({"__key__": "broken", "jpg": b"junk", "json": b"{}"})
    with pytest.raises(ValueError, match="no usable sample"):
        next(iter(TD.TrainStream("x", [str(bad)], TD.AugmentConfig(image_size=64))))


def test_iter_samples_strides_ranks(packed):
    shards = list(TD.open_shard_set(str(packed / "mask" / "train")).shards)
    every = [k for k, _, _ in TD.iter_samples(shards)]
    parts = [[k for k, _, _ in TD.iter_samples(shards, rank=r, world=3)] for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(every) and len(every) == 8
    assert [k for k, _, _ in TD.iter_samples(shards, limit=3)] == every[:3]


def test_mixture_sampler_follows_weights_and_is_deterministic():
    sampler = TD.MixtureSampler(["a", "b", "c"], [4.0, 2.0, 1.0], seed=5)
    picks = [sampler.choice(step) for step in range(7000)]
    freq = Counter(picks)
    for name, p in zip("abc", (4 / 7, 2 / 7, 1 / 7)):
        assert abs(freq[name] / 7000 - p) < 4 * np.sqrt(p * (1 - p) / 7000)
    again = TD.MixtureSampler(["a", "b", "c"], [4.0, 2.0, 1.0], seed=5)
    assert [again.choice(s) for s in range(3000, 3100)] == picks[3000:3100]  # a resumed run continues alike
    with pytest.raises(ValueError, match="positive"):
        TD.MixtureSampler(["a"], [0.0])


def test_mixture_loader_batches_hold_one_dataset(packed):
    streams = {k: TD.TrainStream(k, list(TD.open_shard_set(str(packed / k / "train")).shards),
                                 TD.AugmentConfig(image_size=64)) for k in ("mask", "image")}
    loader = TD.MixtureLoader(streams, TD.MixtureSampler(["mask", "image"], [1, 1]), batch_size=3)
    for step in range(6):
        name, batch = loader.batch(step)
        assert len(batch) == 3 and {s.dataset for s in batch} == {name} and {s.kind for s in batch} == {name}


@pytest.fixture(scope="module")
def s3_bucket(packed):
    """moto's S3 server on 127.0.0.1 holding the packed mask shard set under s3://train-data/mask/."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                           "AWS_CONFIG_FILE": "/nonexistent/aws-config",
                           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
                           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            options = {"key": "test-key", "secret": "test-secret",
                       "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
            import boto3
            import s3fs

            boto3.client("s3", endpoint_url=options["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                         aws_access_key_id="test-key", aws_secret_access_key="test-secret"
                         ).create_bucket(Bucket="train-data")
            fs = s3fs.S3FileSystem(**options)
            fs.put(str(packed / "mask" / "train"), "train-data/mask/train", recursive=True)
            yield options
        finally:
            server.stop()


def test_shard_set_streams_from_s3(s3_bucket, packed):
    shard_set = TD.open_shard_set("s3://train-data/mask/train", s3_bucket)
    local = TD.open_shard_set(str(packed / "mask" / "train"))
    assert [s.rsplit("/", 1)[1] for s in shard_set.shards] == [s.rsplit("/", 1)[1] for s in local.shards]
    assert all(s.startswith("s3://train-data/mask/train/") for s in shard_set.shards)
    assert shard_set.classes == local.classes and shard_set.num_samples == 8
    assert [k for k, _, _ in TD.iter_samples(list(shard_set.shards), s3_bucket)] == \
        [k for k, _, _ in TD.iter_samples(list(local.shards))]
    stream = TD.TrainStream("s3", list(shard_set.shards), TD.AugmentConfig(image_size=64), storage_options=s3_bucket)
    it = iter(stream)
    assert len({next(it).key for _ in range(8)}) == 8
    glob = TD.open_shard_set("s3://train-data/mask/train/*.tar", s3_bucket)
    assert glob.shards == shard_set.shards and glob.classes == local.classes


def test_vocabulary_cache_on_s3(s3_bucket, packed):
    from jobs.train_loop import vocabulary_for
    from ovsam import build_ovsam

    model = build_ovsam("ovsam-tiny")
    classes = TD.open_shard_set(str(packed / "mask" / "train")).classes
    first = vocabulary_for(classes, model, "s3://train-data/runs", s3_bucket, templates=("{}",))
    import s3fs

    cached = s3fs.S3FileSystem(**s3_bucket).ls("train-data/runs/_vocab")
    assert len(cached) == 1
    again = vocabulary_for(classes, model, "s3://train-data/runs", s3_bucket, templates=("{}",))
    assert again == first and len(again) == 12 and again.split is not None and (again.split == 1).all()
    other = vocabulary_for(classes, model, "s3://train-data/runs", s3_bucket)  # other templates: another entry
    assert other != first and len(s3fs.S3FileSystem(**s3_bucket).ls("train-data/runs/_vocab")) == 2
