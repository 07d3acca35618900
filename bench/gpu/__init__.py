"""GPU benchmark scripts: `bash bench/gpu/run.sh` (see bench/README.md)."""
