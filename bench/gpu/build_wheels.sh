#!/usr/bin/env bash
# Build the wheels that bench/gpu/run.sh installs on a GPU machine without network access.
#
#   bash bench/gpu/build_wheels.sh            # into bench/gpu/wheels/ (git-ignored)
#   WHEELS=/some/dir bash bench/gpu/build_wheels.sh
#
# That machine's Python already has torch, torchvision, numpy, pillow, opencv, pyarrow, safetensors and timm
# (with timm's huggingface_hub and PyYAML). What `import ovsam` and the annotation stage need besides is carried
# here, at the versions installed in this checkout's .venv (so the benchmark runs what the tests ran):
#   pure Python: open_clip_torch, segment-anything, ftfy, fsspec, tqdm, webdataset, braceexpand, transformers (the
#                open-world systems' detectors and SAM 3; it needs the machine's huggingface_hub to be >= 1.31);
#   compiled:    regex, pycocotools, wcwidth (ftfy's) and tokenizers (transformers'), as manylinux x86_64 wheels for CPython 3.9-3.13 (the
#                GPU machine's Python version is not known in advance; pip picks the one that fits), the
#                checkout's version where it has a wheel for that Python, else the newest that has one.
# The project itself is not carried as a wheel: run.sh runs it from the checkout (PYTHONPATH), so the benchmark
# measures the code in the working tree. Needs network access to PyPI (here, not on the GPU machine).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
WHEELS="${WHEELS:-$REPO/bench/gpu/wheels}"
mkdir -p "$WHEELS"

version() {  # the installed version of a distribution in $PY's environment
  "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

PURE="open_clip_torch segment-anything ftfy fsspec tqdm webdataset braceexpand transformers"
COMPILED="regex pycocotools wcwidth tokenizers"

for dist in $PURE; do
  spec="$dist==$(version "$dist")"
  echo "[wheels] $spec"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" "$spec" \
    || "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" "$spec"
done

for dist in $COMPILED; do
  spec="$dist==$(version "$dist")"
  for pyver in 3.9 3.10 3.11 3.12 3.13; do
    echo "[wheels] $spec for CPython $pyver"
    for want in "$spec" "$dist"; do
      if "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
           --python-version "$pyver" --implementation cp --platform manylinux2014_x86_64 \
           --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "$want" 2>/dev/null; then
        break
      fi
      echo "[wheels]   no wheel of $want for CPython $pyver"
    done
  done
done

ls -l "$WHEELS"
du -sh "$WHEELS"
