"""What ``ovsam serve`` reads from a request before a replica sees it: the body within its byte limit, JSON, and
image URLs under the operator's allowed prefixes (read through fsspec). Failures are :class:`~.requests.ApiError`
naming the field."""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from fastapi import Request

from pipeline.serving.requests import ApiError


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 beyond ``limit`` bytes (by its Content-Length, or while it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid_request", f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise ApiError(413, "body_too_large", f"the body has {size} bytes; the limit is {limit}", "body")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "body_too_large", f"the body exceeds the limit of {limit} bytes", "body")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's own cache: request.form() and request.body() read it instead of the stream
    return body


def parse_json(data: bytes) -> Any:
    try:
        return json.loads(data, parse_constant=lambda c: float(c))  # NaN / Infinity reach the finite checks
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None


def check_url(url: str, prefixes: list[str]) -> str:
    """``url`` if it lies under one of the allowed ``prefixes``: local paths and ``file://`` only where a prefix
    names them, and no ``..`` segments. Raises 403 ``url_not_allowed``."""
    if "\x00" in url or any(part == ".." for part in url.replace("\\", "/").split("/")):
        raise ApiError(403, "url_not_allowed", "the URL has '..' segments", "url")
    local = "://" not in url or url.startswith("file://")
    if local:
        path = url[len("file://"):] if url.startswith("file://") else url
        if not path.startswith("/"):
            raise ApiError(403, "url_not_allowed", "relative local paths are not allowed", "url")
        url = "file://" + posixpath.normpath(os.path.realpath(path))
    for prefix in prefixes:
        p = prefix
        if "://" not in p:
            p = "file://" + posixpath.normpath(os.path.realpath(p))
        if url.startswith(p if p.endswith("/") else p + "/") or url == p:
            return url
    allowed = ", ".join(prefixes) if prefixes else "none (start the server with --allow-url-prefix)"
    raise ApiError(403, "url_not_allowed", f"{url[:200]} is not under an allowed prefix; allowed: {allowed}", "url")


def read_url(url: str, limit: int, storage_options: dict[str, Any]) -> bytes:
    import fsspec

    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            data = f.read(limit + 1)
    except Exception as e:  # any storage failure is the URL's problem, named in the answer
        raise ApiError(422, "url_unreadable", f"cannot read {url[:200]}: {type(e).__name__}: {e}"[:500],
                       "url") from None
    if len(data) > limit:
        raise ApiError(413, "body_too_large", f"{url[:200]} is larger than the limit of {limit} bytes", "url")
    return data


__all__ = ["check_url", "parse_json", "read_body", "read_url"]
