"""``ovsam serve`` under load: N concurrent clients on loopback, each embedding its own images and clicking on them.

Launch (from the repository root):

    .venv/bin/python bench/serve.py                                  # ovsam-tiny, 8 clients x 2 images x 25 clicks
    .venv/bin/python bench/serve.py --model ovsam-rn50x16 --precision bf16 --clients 4 --clicks 10 --images 1
    .venv/bin/python bench/serve.py --soak --clients 4 --images 60 --clicks 10 --cache-bytes 50000000
    .venv/bin/python bench/serve.py --url http://127.0.0.1:8000 --token-env OVSAM_TOKEN  # a running server

What it does: starts ``ovsam serve`` in this process (a local Ray instance with ``--ray-cpus`` CPUs, the model
replica with all of them, random weights unless ``--checkpoint``), or uses ``--url``. Each client (a thread with
its own keep-alive HTTP connection) uploads ``--images`` images of its own (640 x 480 photo-like PNGs, different
per client; the upload embeds them) and then makes ``--clicks`` clicks on each: the first a positive point, the
next ones alternate a negative and a positive point with ``previous`` (SAM-style refinement of the same mask),
every fifth a box. ``--soak`` gives every image fewer clicks and far more images, so the feature cache fills and
evicts. A sampler thread reads ``/v1/stats`` every ``--sample-s`` seconds: the image store's and the replica's
cache bytes, entries, evictions, and the replica's resident memory. The run stops at ``--max-requests`` or
``--max-seconds``, whichever comes first.

Numbers: embed latency (an upload: transfer, decode, the image encoder) and click latency (a segment request:
parse, route, micro-batch, decoder, recognition, RLE), p50/p90/p99 in ms from the client's side; requests/s over
the clicking phase; errors by status; the cache's and the replica's memory over the run (first, peak, last).
``--json PATH`` writes all of it.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="see the module docstring for exactly what is measured")
    p.add_argument("--url", default=None, help="a running server (default: start one in this process)")
    p.add_argument("--token-env", default=None, help="environment variable with the server's bearer token")
    p.add_argument("--model", default="ovsam-tiny")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--vocabulary", default="coco")
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--cpus-per-replica", type=float, default=None,
                   help="the model replica's CPUs, and its torch threads (default: --ray-cpus)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--cache-bytes", type=int, default=4 * 1024 ** 3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--images", type=int, default=2, help="images per client")
    p.add_argument("--clicks", type=int, default=25, help="clicks per image")
    p.add_argument("--image-size", default="640x480", help="WxH of the generated images")
    p.add_argument("--think-ms", type=float, default=0.0,
                   help="pause between a client's clicks, like a person looking at each mask (default 0: each "
                        "client clicks again as soon as it has its answer)")
    p.add_argument("--soak", action="store_true", help="many images, few clicks each: fills and evicts the cache")
    p.add_argument("--max-requests", type=int, default=20_000)
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--sample-s", type=float, default=1.0)
    p.add_argument("--json", default=None, metavar="PATH")
    return p


def photo(seed: int, width: int, height: int) -> bytes:
    """A PNG with smooth gradients and a few shapes (a stand-in for a photo), different per seed."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * rng.uniform(0.1, 0.4) + y * rng.uniform(0.1, 0.4) + rng.uniform(0, 255)) % 255
                     for _ in range(3)], -1).astype(np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        draw.ellipse([x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 160))],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class Conn:
    """One keep-alive HTTP connection (one per client thread)."""

    def __init__(self, base: str, token: str | None) -> None:
        u = urlparse(base)
        self.host, self.port, self.prefix = u.hostname, u.port or 80, u.path.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
             ) -> tuple[int, Any, float]:
        headers = {**self.headers, "Content-Type": content_type}
        start = time.perf_counter()
        for attempt in range(2):
            try:
                self.conn.request(method, self.prefix + path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
                if attempt:
                    raise
        elapsed = time.perf_counter() - start
        try:
            payload = json.loads(data)
        except ValueError:
            payload = data.decode(errors="replace")
        return resp.status, payload, elapsed


def start_server(args: argparse.Namespace) -> str:
    import ray

    from jobs.serve import start
    from pipeline.serving.settings import ServeSettings

    port = _free_port()
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    settings = ServeSettings(model=args.model, checkpoint=args.checkpoint, vocabulary=args.vocabulary,
                             precision=args.precision, max_batch_size=args.max_batch_size,
                             batch_wait_ms=args.batch_wait_ms, cache_bytes=args.cache_bytes,
                             cpus_per_replica=args.cpus_per_replica or args.ray_cpus)
    start(settings, "127.0.0.1", port)
    return f"http://127.0.0.1:{port}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None}
    a = np.asarray(samples) * 1000
    return {"n": len(samples), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p90_ms": round(float(np.percentile(a, 90)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    token = os.environ.get(args.token_env) if args.token_env else None
    base = args.url or start_server(args)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    images_per_client = args.images * (10 if args.soak else 1)
    clicks = max(1, args.clicks // (5 if args.soak else 1))
    lock = threading.Lock()
    embeds: list[float] = []
    click_lat: list[float] = []
    errors: dict[str, int] = {}
    requests = [0]
    deadline = time.monotonic() + args.max_seconds
    stop = threading.Event()
    samples: list[dict[str, Any]] = []
    click_window: list[float] = []

    def budget() -> bool:
        with lock:
            if requests[0] >= args.max_requests or time.monotonic() > deadline:
                return False
            requests[0] += 1
            return True

    def record(kind: str, status: int, payload: Any, elapsed: float) -> bool:
        with lock:
            if status != 200:
                key = f"{kind} {status} {payload.get('error', {}).get('code') if isinstance(payload, dict) else ''}"
                errors[key] = errors.get(key, 0) + 1
                return False
            (embeds if kind == "embed" else click_lat).append(elapsed)
            if kind == "click":
                click_window.append(time.perf_counter())
            return True

    def client(c: int) -> None:
        conn = Conn(base, token)
        rng = np.random.default_rng(1000 + c)
        for i in range(images_per_client):
            if not budget():
                return
            status, up, elapsed = conn.call("POST", "/v1/images", photo(c * 10_000 + i, width, height), "image/png")
            if not record("embed", status, up, elapsed):
                continue
            previous = None
            for k in range(clicks):
                if k and args.think_ms:
                    time.sleep(args.think_ms / 1000)
                if not budget():
                    return
                x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
                if k % 5 == 4:
                    x0, y0 = float(rng.uniform(0, width / 2)), float(rng.uniform(0, height / 2))
                    body: dict[str, Any] = {"box": [x0, y0, x0 + width / 3, y0 + height / 3]}
                    previous = None
                else:
                    body = {"points": [[x, y, 1 if previous is None or k % 2 == 0 else 0]]}
                    if previous is not None:
                        body["previous"] = previous
                status, ans, elapsed = conn.call("POST", f"/v1/images/{up['image_id']}/segment",
                                                 json.dumps(body).encode())
                if record("click", status, ans, elapsed):
                    previous = ans["previous_id"]

    def sampler() -> None:
        conn = Conn(base, token)
        t0 = time.perf_counter()
        while not stop.is_set():
            status, stats, _ = conn.call("GET", "/v1/stats")
            if status == 200:
                rep = stats["replicas"][0]
                samples.append({"t_s": round(time.perf_counter() - t0, 2), "store_bytes": stats["image_store"]["bytes"],
                                "cache_bytes": rep["cache"]["bytes"], "cache_entries": rep["cache"]["entries"],
                                "evictions": rep["cache"]["evictions"], "rss_bytes": rep.get("rss_bytes")})
            stop.wait(args.sample_s)

    sampling = threading.Thread(target=sampler, daemon=True)
    sampling.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    stop.set()
    sampling.join()
    final = Conn(base, token).call("GET", "/v1/stats")[1]
    span = (click_window[-1] - click_window[0]) if len(click_window) > 1 else 0.0
    rss = [s["rss_bytes"] for s in samples if s.get("rss_bytes")]
    cache = [s["cache_bytes"] for s in samples]
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "token_env"},
        "embed": percentiles(embeds), "click": percentiles(click_lat),
        "clicks_per_s": round((len(click_window) - 1) / span, 2) if span > 0 else None,
        "requests": requests[0], "errors": errors, "error_count": sum(errors.values()), "wall_s": round(wall, 2),
        "distinct_images": len(embeds),
        "cache": {"bound_bytes": final["replicas"][0]["cache"]["max_bytes"],
                  "first_bytes": cache[0] if cache else None, "peak_bytes": max(cache) if cache else None,
                  "last_bytes": cache[-1] if cache else None, "final": final["replicas"][0]["cache"]},
        "rss": {"first_bytes": rss[0] if rss else None, "peak_bytes": max(rss) if rss else None,
                "last_bytes": rss[-1] if rss else None},
        "samples": samples,
    }


def format_table(r: dict[str, Any]) -> str:
    mib = 1024 ** 2
    s = r["settings"]
    think = f" ({s['think_ms']:g} ms between clicks)" if s.get("think_ms") else ""
    lines = [f"ovsam serve: {s['model']} {s['precision']}, {s['clients']} clients{think}, "
             f"{r['distinct_images']} images, {r['requests']} requests in {r['wall_s']} s, errors {r['error_count']}",
             "| latency | n | p50 ms | p90 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
    for name in ("embed", "click"):
        p = r[name]
        lines.append(f"| {name} | {p['n']} | {p['p50_ms']} | {p['p90_ms']} | {p['p99_ms']} |")
    c, m = r["cache"], r["rss"]
    lines.append(f"clicks/s {r['clicks_per_s']}; feature cache: bound {c['bound_bytes'] / mib:.1f} MiB, peak "
                 f"{(c['peak_bytes'] or 0) / mib:.1f} MiB, last {(c['last_bytes'] or 0) / mib:.1f} MiB, evictions "
                 f"{c['final']['evictions']}; replica RSS first {(m['first_bytes'] or 0) / mib:.0f} MiB, peak "
                 f"{(m['peak_bytes'] or 0) / mib:.0f} MiB, last {(m['last_bytes'] or 0) / mib:.0f} MiB")
    if r["errors"]:
        lines.append(f"errors: {r['errors']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.url:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return 0 if result["error_count"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
