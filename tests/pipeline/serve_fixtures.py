"""A real ``ovsam serve`` application (Ray Serve, HTTP on loopback) for the serving tests, and a small client."""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from PIL import Image

TOKEN_ENV = "OVSAM_TEST_SERVE_TOKEN"
TOKEN = "test-token-5f1c2a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def scene(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    """A noisy image with a few bright rectangles, different per seed."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    for _ in range(3):
        y0, x0 = int(rng.integers(0, height - 20)), int(rng.integers(0, width - 20))
        img[y0 : y0 + int(rng.integers(10, 30)), x0 : x0 + int(rng.integers(10, 40))] = rng.integers(150, 255, 3)
    return img


class Client:
    """JSON over HTTP with the standard library (so nothing else sits between the test and the server)."""

    def __init__(self, base: str, token: str | None = TOKEN) -> None:
        self.base = base.rstrip("/")
        self.token = token

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                content_type: str | None = None, headers: dict[str, str] | None = None,
                timeout: float = 120) -> tuple[int, Any]:
        data = raw
        hdrs = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode() if not isinstance(body, (bytes, str)) else (
                body.encode() if isinstance(body, str) else body)
            hdrs.setdefault("Content-Type", "application/json")
        if content_type is not None:
            hdrs["Content-Type"] = content_type
        if self.token is not None:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = resp.read()
                status = resp.status
                kind = resp.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            payload, status, kind = e.read(), e.code, e.headers.get("content-type", "")
        if "json" in kind:
            return status, json.loads(payload)
        return status, payload.decode(errors="replace")

    def upload(self, image: np.ndarray) -> dict[str, Any]:
        status, out = self.request("POST", "/v1/images", raw=png_bytes(image), content_type="image/png")
        assert status == 200, out
        return out

    def segment(self, image_id: str, **body: Any) -> tuple[int, Any]:
        return self.request("POST", f"/v1/images/{image_id}/segment", body)
