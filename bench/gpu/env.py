"""Make a bare GPU machine's Python able to run the benchmarks, and describe it.

    python bench/gpu/env.py --wheels bench/gpu/wheels --install --json out/env.json

For every module that ``import ovsam`` and the annotation stage need and that this Python lacks, installs its
distribution from the carried wheels (``bench/gpu/build_wheels.sh``) with ``pip install --no-deps --no-index
--find-links``; where pip itself is missing or fails, unpacks the fitting wheel into ``bench/gpu/site`` (put on
``PYTHONPATH`` by ``run.sh``). Then imports everything and reports versions, the GPU and what is still missing.
Exits 0 when the project imports, 1 otherwise. Uses only the standard library until torch is imported.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

# module -> distribution, in install order (each with --no-deps, so dependencies first)
NEEDED = {
    "wcwidth": "wcwidth", "ftfy": "ftfy", "regex": "regex", "tqdm": "tqdm", "fsspec": "fsspec",
    "braceexpand": "braceexpand", "webdataset": "webdataset", "segment_anything": "segment_anything",
    "pycocotools": "pycocotools", "open_clip": "open_clip_torch", "tokenizers": "tokenizers",
    "transformers": "transformers",
}
# already on the GPU machine; reported, never installed
PROVIDED = ("torch", "torchvision", "numpy", "PIL", "cv2", "pyarrow", "safetensors", "timm", "huggingface_hub", "yaml")
SITE = Path(__file__).resolve().parent / "site"


def missing(modules: list[str]) -> list[str]:
    out = []
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception:  # noqa: BLE001 - a broken install counts as missing
            out.append(m)
    return out


def _wheel_fits(name: str) -> bool:
    """Whether a wheel file name's tags fit this interpreter (enough of PEP 425 for manylinux x86_64 wheels)."""
    parts = name[:-4].split("-")
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    major, minor = sys.version_info[:2]
    here = f"cp{major}{minor}"
    if py.startswith("py3") or "py3" in py.split("."):
        return plat == "any" or "x86_64" in plat
    if "x86_64" not in plat or sysconfig.get_platform() != "linux-x86_64":
        return False
    if abi == "abi3":
        return int(py[2:] or 0) <= int(here[2:]) if py.startswith("cp3") else False
    return py == here


def unpack(dist: str, wheels: Path) -> bool:
    """Unpack the fitting wheel of ``dist`` into ``SITE`` (no pip); True if one was found."""
    stem = dist.replace("-", "_").lower()
    for whl in sorted(wheels.glob("*.whl"), reverse=True):
        if whl.name.lower().startswith(stem + "-") and _wheel_fits(whl.name):
            SITE.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(whl) as z:
                z.extractall(SITE)
            return True
    return False


def install(dists: list[str], wheels: Path) -> dict[str, str]:
    """Install ``dists`` from ``wheels``; returns how each went."""
    how: dict[str, str] = {}
    for dist in dists:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--find-links",
               str(wheels), dist]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            ok = proc.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok, proc = False, None
        if ok:
            how[dist] = "pip"
        elif unpack(dist, wheels):
            how[dist] = f"unpacked into {SITE}"
        else:
            err = "" if proc is None else (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            how[dist] = f"FAILED {err}"
    if SITE.is_dir() and str(SITE) not in sys.path:
        sys.path.insert(0, str(SITE))
    importlib.invalidate_caches()
    return how


def describe() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    versions = {}
    for m in (*PROVIDED, *NEEDED):
        try:
            versions[m] = getattr(importlib.import_module(m), "__version__", "?")
        except Exception as e:  # noqa: BLE001
            versions[m] = f"missing ({type(e).__name__}: {e})"
    info["versions"] = versions
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu/env.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", default=str(Path(__file__).resolve().parent / "wheels"))
    p.add_argument("--install", action="store_true", help="install what is missing from --wheels")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    before = missing(list(NEEDED))
    print(f"[env] python {sys.version.split()[0]} at {sys.executable}; missing before: {before or 'nothing'}")
    how = {}
    if before and args.install:
        wheels = Path(args.wheels)
        if not wheels.is_dir():
            print(f"[env] no wheel folder {wheels}: build it with bash bench/gpu/build_wheels.sh", file=sys.stderr)
        else:
            how = install([NEEDED[m] for m in before], wheels)
            for dist, result in how.items():
                print(f"[env] {dist}: {result}")
    info = describe()
    project = missing(["ovsam", "ovsam.batch", "pipeline.annotate.stages", "pipeline.inputs.decode", "bench.corpus"])
    info.update(missing_before=before, installed=how, missing_after=missing(list(NEEDED)), project_import_errors=project)
    for m, v in info["versions"].items():
        print(f"[env]   {m:18} {v}")
    print(f"[env] GPU: {info.get('gpu', 'none')}  torch {info['torch']}  CUDA {info.get('cuda')}  "
          f"missing after: {info['missing_after'] or 'nothing'}  project imports: {'ok' if not project else project}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(info, indent=2))
    return 0 if not project else 1


if __name__ == "__main__":
    raise SystemExit(main())
