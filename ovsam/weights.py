"""The released weight files OV-SAM is assembled from, and a verified, resumable downloader for them.

There is no single "OV-SAM checkpoint": the published model is put together from six files by three publishers
(OVSAM_SPEC §2.1). This module is the table of those files (official location, approximate size, what each holds
and which project model it feeds) and :func:`download`, which fetches one of them into a directory:

>>> from ovsam import weights
>>> [f.name for f in weights.RELEASED_FILES][:2]
['sam_vit_h_4b8939.pth', 'sam_vit_l_0b3195.pth']
>>> path = weights.download("clip2sam_coco_rn50x16.pth", "weights/")  # doctest: +SKIP

The files are not project checkpoints; ``ovsam convert-official`` (``ovsam.convert.convert_official``) turns
them into the project's single-file format.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_META_BASE = "https://dl.fbaipublicfiles.com/segment_anything"
_OVSAM_BASE = "https://huggingface.co/HarborYuan/ovsam_models/resolve/main/models"
_CLIP_RN50X16_URL = ("https://openaipublic.azureedge.net/clip/models/"
                     "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt")

_SAM_PAGE = "https://github.com/facebookresearch/segment-anything#model-checkpoints"
_OVSAM_PAGE = "https://huggingface.co/HarborYuan/ovsam_models"
_CLIP_PAGE = "https://github.com/openai/CLIP"

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ReleasedFile:
    """One released weight file.

    Attributes:
      name: the file name, as published; also the name it is saved under.
      url: the official download location.
      page: the publisher's page that documents the file.
      publisher: who publishes it.
      approx_size: human-readable size ("2.56 GB"), for display.
      holds: what the file contains: format and top-level state-dict key prefixes.
      feeds: the project models (``ovsam.list_models()`` names) and parts it provides.
      size_bytes: exact size in bytes when known; a download of another size is rejected.
      sha256: hex SHA-256 of the file when known; a download with another digest is rejected.
    """

    name: str
    url: str
    page: str
    publisher: str
    approx_size: str
    holds: str
    feeds: str
    size_bytes: int | None = None
    sha256: str | None = None

    def url_for(self, base_url: str | None = None) -> str:
        """The official URL, or ``<base_url>/<name>`` when a mirror's ``base_url`` is given."""
        if base_url is None:
            return self.url
        if "://" not in base_url:
            raise ValueError(f"base_url must be a URL such as 'https://mirror.example/ovsam' or "
                             f"'file:///data/weights'; got {base_url!r}")
        return f"{base_url.rstrip('/')}/{self.name}"


RELEASED_FILES: tuple[ReleasedFile, ...] = (
    ReleasedFile(
        name="sam_vit_h_4b8939.pth", url=f"{_META_BASE}/sam_vit_h_4b8939.pth", page=_SAM_PAGE, publisher="Meta AI",
        approx_size="2.56 GB",
        holds="SAM ViT-H state dict: image_encoder.*, prompt_encoder.*, mask_decoder.*",
        feeds="sam-vit-h (whole model; the SAM2CLIP distillation teacher); ovsam-rn50x16 (prompt_encoder.* only)",
        size_bytes=2_564_550_879, sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    ReleasedFile(
        name="sam_vit_l_0b3195.pth", url=f"{_META_BASE}/sam_vit_l_0b3195.pth", page=_SAM_PAGE, publisher="Meta AI",
        approx_size="1.25 GB",
        holds="SAM ViT-L state dict: image_encoder.*, prompt_encoder.*, mask_decoder.*",
        feeds="sam-vit-l",
        size_bytes=1_249_524_607, sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    ReleasedFile(
        name="sam_vit_b_01ec64.pth", url=f"{_META_BASE}/sam_vit_b_01ec64.pth", page=_SAM_PAGE, publisher="Meta AI",
        approx_size="375 MB",
        holds="SAM ViT-B state dict: image_encoder.*, prompt_encoder.*, mask_decoder.*",
        feeds="sam-vit-b",
        size_bytes=375_042_383, sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    ReleasedFile(
        name="sam2clip_vith_rn50x16.pth", url=f"{_OVSAM_BASE}/sam2clip_vith_rn50x16.pth", page=_OVSAM_PAGE,
        publisher="OV-SAM authors (HarborYuan/ovsam_models)", approx_size="536 MB",
        holds="bare fp32 state dict: neck_student.* (the SAM2CLIP neck, pos_embed buffer included)",
        feeds="ovsam-rn50x16 (neck)",
    ),
    ReleasedFile(
        name="clip2sam_coco_rn50x16.pth", url=f"{_OVSAM_BASE}/clip2sam_coco_rn50x16.pth", page=_OVSAM_PAGE,
        publisher="OV-SAM authors (HarborYuan/ovsam_models)", approx_size="31.5 MB",
        holds="bare fp32 state dict: fpn_neck.*, mask_decoder.* (label-token decoder + CLIP2SAM head), "
              "perhaps pe.*; trained on COCO (80 classes)",
        feeds="ovsam-rn50x16 (FPN and head), COCO variant",
    ),
    ReleasedFile(
        name="clip2sam_lvis_rn50x16.pth", url=f"{_OVSAM_BASE}/clip2sam_lvis_rn50x16.pth", page=_OVSAM_PAGE,
        publisher="OV-SAM authors (HarborYuan/ovsam_models)", approx_size="31.5 MB",
        holds="bare fp32 state dict: fpn_neck.*, mask_decoder.* (label-token decoder + CLIP2SAM head), "
              "perhaps pe.*; trained on LVIS (1203 classes)",
        feeds="ovsam-rn50x16 (FPN and head), LVIS variant",
    ),
    ReleasedFile(
        # open_clip fetches the same weights for model 'RN50x16-quickgelu', pretrained tag 'openai'; the
        # directory component of OpenAI's URL is the file's SHA-256, which OpenAI's and open_clip's loaders check.
        name="RN50x16.pt", url=_CLIP_RN50X16_URL, page=_CLIP_PAGE, publisher="OpenAI", approx_size="0.6 GB",
        holds="TorchScript archive of CLIP RN50x16 (fp16): visual.*, transformer.*, token_embedding.*, "
              "positional_embedding, ln_final.*, text_projection, logit_scale",
        feeds="ovsam-rn50x16 (frozen CLIP image trunk and text tower); "
              "open_clip model 'RN50x16-quickgelu', pretrained='openai'",
        sha256="52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
    ),
)


class DownloadError(OSError):
    """A released file could not be fetched, or what arrived failed verification. The message names the URL."""


def released_file_names() -> list[str]:
    """Names of the released files, in table order."""
    return [f.name for f in RELEASED_FILES]


def get_released_file(name: str) -> ReleasedFile:
    """The table row called ``name``; ``ValueError`` listing the valid names otherwise."""
    for entry in RELEASED_FILES:
        if entry.name == name:
            return entry
    raise ValueError(f"Unknown released file {name!r}; available: {', '.join(released_file_names())}")


def download(
    name: str | ReleasedFile,
    dest: str | Path = ".",
    base_url: str | None = None,
    progress: bool = True,
    *,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Fetch a released file into directory ``dest`` and return its path ``dest/<name>``.

    ``name`` is a file name from :data:`RELEASED_FILES` (or a :class:`ReleasedFile`, for files outside the
    table). ``base_url`` replaces the official location with ``<base_url>/<name>`` (a mirror; any scheme urllib
    reads, ``file://`` included).

    Contract:
      * The bytes stream to ``dest/<name>.part``; the final name appears only through an atomic rename after the
        whole file arrived and passed verification, so ``dest/<name>`` is never a partial file.
      * An interrupted transfer keeps ``<name>.part``; the next call resumes it with an HTTP range request when
        the server supports ranges, and starts over otherwise.
      * Verification: the byte count must equal the server's ``Content-Length``, and the table's exact size and
        SHA-256 where known. A file that fails is deleted and :class:`DownloadError` is raised.
      * An existing ``dest/<name>`` of the expected size (any size when unknown) is returned without downloading,
        unless ``force``.
      * Unknown names raise ``ValueError`` listing the valid ones; network and HTTP failures raise
        :class:`DownloadError` (an ``OSError``) naming the URL.
    """
    entry = name if isinstance(name, ReleasedFile) else get_released_file(name)
    url = entry.url_for(base_url)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / entry.name
    part = dest / f"{entry.name}.part"

    if final.exists() and not force:
        size = final.stat().st_size
        if entry.size_bytes is None or size == entry.size_bytes:
            logger.info("%s already present (%d bytes); not downloading again", final, size)
            return final
        logger.warning("%s has %d bytes, expected %d; downloading it again", final, size, entry.size_bytes)

    if entry.size_bytes is not None and part.exists() and part.stat().st_size > entry.size_bytes:
        part.unlink()
    logger.info("downloading %s from %s to %s", entry.name, url, final)
    _fetch(url, part, entry, progress=progress, timeout=timeout)
    _verify(entry, part, url)
    os.replace(part, final)
    logger.info("saved %s (%d bytes)", final, final.stat().st_size)
    return final


def _fetch(url: str, part: Path, entry: ReleasedFile, *, progress: bool, timeout: float) -> None:
    """Bring ``part`` up to the complete file, resuming from its current length when possible."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "ovsam-weights"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            # Nothing past our offset: the partial file is whole if the server's total equals its length.
            total = _range_total(e.headers.get("Content-Range") if e.headers else None)
            if total == offset or (total is None and entry.size_bytes == offset):
                logger.info("%s: the partial file %s is already complete", url, part)
                return
            logger.info("%s: partial file %s (%d bytes) does not match the server's file; starting over",
                        url, part, offset)
            part.unlink()
            _fetch(url, part, entry, progress=progress, timeout=timeout)
            return
        hint = f": no {entry.name!r} there; check the file name and the base URL" if e.code == 404 else ""
        raise DownloadError(f"HTTP {e.code} {e.reason} for {url}{hint}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"could not download {url}: {reason}") from e

    with response:
        status = getattr(response, "status", None)
        if offset and (status != 206 or _range_start(response.headers.get("Content-Range")) != offset):
            logger.info("%s: server did not resume at byte %d; starting over", url, offset)
            offset = 0
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None and length.isdigit() else None
        total = expected if expected is not None else entry.size_bytes
        received = offset
        from tqdm import tqdm

        with open(part, "ab" if offset else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.name,
            disable=not progress, leave=False,
        ) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"transfer of {url} broke off after {received} bytes ({e}); the partial "
                                    f"file {part} is kept and the next download resumes it") from e
    if expected is not None and received != expected:
        raise DownloadError(f"transfer of {url} ended after {received} of {expected} bytes; the partial file "
                            f"{part} is kept and the next download resumes it")


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _range_total(content_range: str | None) -> int | None:
    match = re.match(r"bytes [^/]*/(\d+)", content_range or "")
    return int(match.group(1)) if match else None


def _verify(entry: ReleasedFile, part: Path, url: str) -> None:
    """Check size and digest of a finished transfer; delete it and raise :class:`DownloadError` if wrong."""
    size = part.stat().st_size if part.exists() else 0
    if entry.size_bytes is not None and size != entry.size_bytes:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url} gave {size} bytes, expected {entry.size_bytes} for {entry.name}; "
                            f"the download was deleted (is the base URL serving the right file?)")
    if entry.sha256 is not None:
        digest = _sha256(part)
        if digest != entry.sha256.lower():
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url} gave a file with SHA-256 {digest}, expected {entry.sha256} for "
                                f"{entry.name}; the download was deleted")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["DownloadError", "RELEASED_FILES", "ReleasedFile", "download", "get_released_file",
           "released_file_names"]
