"""One table from a ``bench/gpu/run.sh`` output folder: the steps (status, seconds), the machine, the model rows of
every ``model_*.json`` and the model stage's line.

    python bench/gpu/summarize.py OUT_DIR [--json OUT_DIR/summary.json]

Reads what is there: a step that failed or timed out leaves no JSON (or a partial one: ``bench/model.py`` rewrites
its JSON after every system), and the table says so instead of failing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from typing import Any


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"


def summarize(out: Path) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    data: dict[str, Any] = {"steps": [], "rows": [], "ceilings": {}, "model_stage": None, "env": None}
    steps = out / "steps.tsv"
    if steps.exists():
        lines.append(f"{'step':16}{'status':>9}{'rc':>5}{'seconds':>9}")
        for line in steps.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                name, status, rc, seconds = parts
                data["steps"].append({"step": name, "status": status, "rc": int(rc), "seconds": int(seconds)})
                lines.append(f"{name:16}{status:>9}{rc:>5}{seconds:>9}")
        lines.append("")
    env = _load(out / "env.json")
    data["env"] = env
    if env:
        lines.append(f"machine: {env.get('gpu', 'no GPU')} ({env.get('gpu_memory_gib', '?')} GiB), "
                     f"{env.get('cpu_count')} CPUs, python {env.get('python')}, torch {env.get('torch')}, "
                     f"CUDA {env.get('cuda')}")
    for path in sorted(out.glob("model_*.json"), key=lambda p: ("compile" in p.name, p.name)):  # eager first
        if path.name == "model_stage.json":
            continue
        r = _load(path)
        if r is None:
            lines.append(f"{path.name}: unreadable")
            continue
        data["ceilings"].update(r.get("ceilings", {}))
        for row in r.get("rows", []):
            data["rows"].append({**row, "source": path.name})
        for e in r.get("errors", []):
            lines.append(f"{path.name}: FAILED {e['system']} {e['precision']} batch {e.get('batch')}: {e['error']}")
        if r.get("partial"):
            lines.append(f"{path.name}: partial (the step stopped before its last system)")
    if data["ceilings"]:
        lines.append("matmul ceilings (GFLOP/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in data["ceilings"].items()))
    if data["rows"]:
        lines += ["", f"{'system':21}{'prec':>5}{'compile':>8}{'batch':>6}{'boxes':>6}{'classes':>8}{'GFLOPs/img':>11}"
                      f"{'p50 ms':>9}{'p90 ms':>9}{'ms/img':>8}{'img/s':>8}{'x floor':>8}"]
        for row in data["rows"]:
            classes = f"{row.get('classes', '-')}{'*' if row.get('extrapolated') else ''}"
            lines.append(f"{row['system']:21}{row['precision']:>5}{'yes' if row['compile'] else 'no':>8}"
                         f"{row['batch']:>6}{row['boxes']:>6}{classes:>8}{_num(row['gflops_per_image']):>11}"
                         f"{1000 * row['p50_s']:9.1f}{1000 * row['p90_s']:9.1f}"
                         f"{1000 * row['p50_s'] / row['batch']:8.1f}{row['images_per_s']:8.1f}{row['ratio']:8.1f}")
        if any(row.get("extrapolated") for row in data["rows"]):
            lines.append("* extrapolated from fewer calls (bench/model.py --max-calls)")
        for row in data["rows"]:
            if row.get("text_gflops") is not None:
                lines.append(f"once per vocabulary: {row['system']} {row['precision']} {row['classes']} classes: "
                             f"text {_num(row['text_gflops'])} GFLOPs, {1000 * row['text_s']:.1f} ms")
    else:
        lines.append("no model rows")
    stage = _load(out / "model_stage.json")
    data["model_stage"] = stage
    lines.append("")
    if stage:
        from bench.gpu.model_stage import format_line

        lines.append(format_line(stage))
    else:
        lines.append("model stage: no result")
    return "\n".join(lines), data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu/summarize.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="run.sh's output folder")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    text, data = summarize(Path(args.out))
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
