"""The Ray Serve application of ``ovsam serve``: an ``Ingress`` deployment (the FastAPI app of :mod:`.api`) bound
to an ``OvsamModel`` deployment (model replicas, GPUs where the cluster has them).

``build_app(args)`` is the application builder for ``serve run pipeline.serving.app:build_app key=value ...`` and
``serve deploy`` config files (``args`` are :class:`ServeSettings` fields; strings are converted).

Requests about an image go to the replica that embedded it: every call carries the image id as Ray Serve's
multiplexed model id, and each replica registers the ids it has seen (``serve.multiplexed``), so the router
prefers it. A replica without the image's features computes them again from the bytes in the object store.
Segment calls are micro-batched across images (``serve.batch``); all model work of a replica runs on one
worker thread so the event loop keeps accepting requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from pipeline.serving.api import make_app, no_detector
from pipeline.serving.requests import ApiError, DetectParams, EverythingParams, SegmentParams, VocabularySpec
from pipeline.serving.service import SegmentCall
from pipeline.serving.settings import ServeSettings

logger = logging.getLogger(__name__)
ROUTED_IMAGES_PER_REPLICA = 100_000


def _env_secret(name: str | None, flag: str) -> str | None:
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"{flag} {name}: the environment variable is not set (or empty) where the server runs")
    return value


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@serve.deployment(name="OvsamModel")
class OvsamModelDeployment:
    """One model replica: a :class:`~.service.SegmentService` on this replica's device."""

    def __init__(self, settings: dict[str, Any]) -> None:
        s = ServeSettings(**settings)
        self.settings = s
        # Every torch call of the replica runs on this one thread, the model's construction included: each thread
        # that calls into torch gets its own OpenMP worker team, and two teams spin against each other on the
        # same cores (a click then costs twice as long).
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ovsam-model")
        self.service, self.detect_service = self._pool.submit(self._build, s).result()
        self._segment_batch.set_max_batch_size(s.max_batch_size)
        self._segment_batch.set_batch_wait_timeout_s(s.batch_wait_ms / 1000.0)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (never in production)
            self.replica = str(os.getpid())
        if s.warm_up:
            self._pool.submit(self._warm_up).result()
        self._metrics = _ReplicaMetrics(self.replica)

    @staticmethod
    def _build(s: ServeSettings) -> Any:
        import torch

        import ovsam

        from pipeline.serving.service import SegmentService

        if ray.get_gpu_ids():
            device = "cuda"
        else:
            device = "cpu"
            cpus = int(s.cpus_per_replica or 0) or os.cpu_count() or 1
            torch.set_num_threads(max(1, cpus))
        from pipeline.serving.detect import DetectService

        model = ovsam.build_ovsam(s.model, checkpoint=s.checkpoint, device=device, precision=s.precision)
        vocabulary = ovsam.Vocabulary.resolve(s.vocabulary, model, progress=False)
        service = SegmentService(model, vocabulary, cache_bytes=s.cache_bytes, cache_ttl_s=s.cache_ttl,
                                 max_pixels=s.max_pixels)
        return service, DetectService.build(service, s)  # the detector on the model's device, at its precision

    def _warm_up(self) -> None:
        """One embed and one click on a grey image, so the first user does not pay for lazy initialisation."""
        import io

        from PIL import Image

        from pipeline.serving.requests import parse_segment

        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 128, 128)).save(buf, "PNG")
        self.service.embed("warm-up", buf.getvalue())
        self.service.segment([SegmentCall("warm-up", parse_segment({"points": [[32, 24, 1]]}, 64, 48))])
        if self.detect_service is not None:
            self.detect_service.detect("warm-up", DetectParams(text=["object"]), buf.getvalue)
        self.service.cache.pop("warm-up")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @serve.multiplexed(max_num_models_per_replica=ROUTED_IMAGES_PER_REPLICA)
    async def _routed(self, image_id: str) -> str:
        return image_id  # registers the id with the router; the features live in the service's cache

    async def _note_route(self) -> None:
        image_id = serve.get_multiplexed_model_id()
        if image_id:
            await self._routed(image_id)

    async def _loader(self, image_id: str, data_box: list) -> Any:
        """``load()`` for the service: the bytes fetched now if the features are not cached, else fetched on
        demand (a concurrent eviction) on the model thread."""
        if not self.service.has_image(image_id):
            data = await data_box[0] if isinstance(data_box[0], ray.ObjectRef) else data_box[0]
            return lambda: data
        return lambda: ray.get(data_box[0]) if isinstance(data_box[0], ray.ObjectRef) else data_box[0]

    async def _vocabulary(self, params: Any, spec: VocabularySpec | None) -> None:
        if params.vocabulary and spec is not None and params.vocabulary not in self.service.vocabularies:
            await self._run(self.service.ensure_vocabulary, params.vocabulary, spec)

    async def embed(self, image_id: str, data_box: list) -> Any:
        await self._note_route()
        try:
            data = await data_box[0] if isinstance(data_box[0], ray.ObjectRef) else data_box[0]
            return await self._run(self.service.embed, image_id, data)
        except ApiError as e:
            return e
        finally:
            self._metrics.update(self.service)

    async def segment(self, image_id: str, data_box: list, params: SegmentParams,
                      spec: VocabularySpec | None) -> Any:
        await self._note_route()
        try:
            await self._vocabulary(params, spec)
            return await self._segment_batch(SegmentCall(image_id, params, await self._loader(image_id, data_box)))
        except ApiError as e:
            return e

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _segment_batch(self, calls: list[SegmentCall]) -> list[Any]:
        out = await self._run(self.service.segment, calls)
        self._metrics.update(self.service)
        return out

    async def everything(self, image_id: str, data_box: list, params: EverythingParams,
                         spec: VocabularySpec | None) -> Any:
        await self._note_route()
        try:
            await self._vocabulary(params, spec)
            load = await self._loader(image_id, data_box)
            return await self._run(self.service.everything, image_id, params, load)
        except ApiError as e:
            return e

    async def detect(self, image_id: str, data_box: list, params: DetectParams) -> Any:
        await self._note_route()
        try:
            if self.detect_service is None:
                raise no_detector()
            data = await data_box[0] if isinstance(data_box[0], ray.ObjectRef) else data_box[0]
            return await self._run(self.detect_service.detect, image_id, params, lambda: data)
        except ApiError as e:
            return e
        finally:
            self._metrics.update(self.service)

    async def add_vocabulary(self, vocab_id: str, spec: VocabularySpec) -> Any:
        try:
            return await self._run(self.service.add_vocabulary, vocab_id, spec)
        except ApiError as e:
            return e

    async def stats(self) -> dict[str, Any]:
        out = await self._run(self.service.stats)
        return {"replica": self.replica, "rss_bytes": _rss_bytes(), "device": str(self.service.model.device), **out}


class _ReplicaMetrics:
    """The feature cache's size and hit counts as Ray metrics (exported with Ray Serve's own on Ray's metrics
    port)."""

    def __init__(self, replica: str) -> None:
        from ray.util import metrics

        tags = {"replica": replica}
        self._gauges = {name: metrics.Gauge(f"ovsam_serve_feature_cache_{name}", description=f"feature cache {name}",
                                            tag_keys=("replica",)) for name in ("bytes", "entries", "hits", "misses")}
        for g in self._gauges.values():
            g.set_default_tags(tags)

    def update(self, service: Any) -> None:
        stats = service.cache.stats()
        for name, gauge in self._gauges.items():
            gauge.set(float(stats[name]))


class RayBackend:
    """The app's :class:`~.api.Backend` over the model deployment's handle."""

    def __init__(self, handle: Any, replicas: int) -> None:
        self.handle = handle
        self.replicas = replicas

    def store(self, data: bytes) -> Any:
        return ray.put(data)

    @staticmethod
    def _checked(result: Any) -> Any:
        if isinstance(result, ApiError):
            raise result
        return result

    def _for(self, image_id: str):
        return self.handle.options(multiplexed_model_id=image_id)

    async def embed(self, image_id: str, data: Any) -> dict[str, int]:
        return self._checked(await self._for(image_id).embed.remote(image_id, [data]))

    async def segment(self, image_id, data, params, vocabulary):
        return self._checked(await self._for(image_id).segment.remote(image_id, [data], params, vocabulary))

    async def everything(self, image_id, data, params, vocabulary):
        return self._checked(await self._for(image_id).everything.remote(image_id, [data], params, vocabulary))

    async def add_vocabulary(self, vocab_id, spec):
        return self._checked(await self.handle.add_vocabulary.remote(vocab_id, spec))

    async def detect(self, image_id, data, params):
        return self._checked(await self._for(image_id).detect.remote(image_id, [data], params))

    async def stats(self) -> list[dict[str, Any]]:
        """Each replica's stats, as far as a few calls reach them (the router picks the replica)."""
        seen: dict[str, dict[str, Any]] = {}
        for _ in range(4 * self.replicas if self.replicas > 1 else 1):
            rep = await self.handle.stats.remote()
            seen[rep["replica"]] = rep
            if len(seen) == self.replicas:
                break
        return list(seen.values())


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class Ingress:
    """The HTTP entry: :func:`.api.make_app` over the model deployment."""

    def __init__(self, model_handle: Any, settings: dict[str, Any]) -> None:
        from ovsam.precision import resolve_precision

        s = ServeSettings(**settings)
        self.settings = s
        self.backend = RayBackend(model_handle, s.replicas)
        self.token = _env_secret(s.token_env, "--token-env")
        self.label_studio_key = _env_secret(s.label_studio_key_env, "--label-studio-key-env")
        self.precision = resolve_precision(s.precision, "cuda" if (s.num_gpus_per_replica or 0) > 0 else "cpu")

    def __serve_build_asgi_app__(self):
        return make_app(self.backend, self.settings, token=self.token, label_studio_key=self.label_studio_key,
                        precision=self.precision)


def build_app(args: dict[str, Any] | ServeSettings) -> Any:
    """The application (``Ingress`` bound to ``OvsamModel``) for ``serve.run``, ``serve run`` and ``serve
    deploy``. GPUs per replica default to 1 where the cluster has GPUs, else 0 (CPU replicas, each with
    ``cpus_per_replica`` CPUs: by default all of a node's CPUs shared among the replicas)."""
    s = args if isinstance(args, ServeSettings) else ServeSettings.from_args(dict(args))
    if s.replicas < 1 or s.max_batch_size < 1:
        raise ValueError(f"replicas and max_batch_size must be >= 1, got {s.replicas}, {s.max_batch_size}")
    s.detector_options()  # an unknown detector, one without weights or a bad option fails here, not in a replica
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    gpus = s.num_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    cpus = s.cpus_per_replica
    if cpus is None:
        cpus = 1.0 if gpus > 0 else max(1.0, float(resources.get("CPU", os.cpu_count() or 1)) / s.replicas)
    s = dataclasses.replace(s, num_gpus_per_replica=gpus, cpus_per_replica=cpus)
    model = OvsamModelDeployment.options(
        num_replicas=s.replicas, ray_actor_options={"num_gpus": gpus, "num_cpus": cpus},
        max_ongoing_requests=max(64, 4 * s.max_batch_size)).bind(s.to_dict())
    return Ingress.bind(model, s.to_dict())


__all__ = ["Ingress", "OvsamModelDeployment", "RayBackend", "ServeSettings", "build_app"]
