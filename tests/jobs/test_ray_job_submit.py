"""The README's cluster command end to end: a local head node started from this install (``ray start --head``),
``ray job submit --working-dir . -- python -m jobs.annotate ...`` against its job server, and the job's output
committed. Ray 2.60 turns token authentication on for the clusters it starts, so both commands run with
``RAY_AUTH_MODE=token`` (the token is made in ``~/.ray/auth_token`` on first use), as the README says.

The head gets its own temp dir, so ``/tmp/ray/ray_current_cluster`` (which a bare ``ray.init()`` elsewhere would
follow) is not touched, and it is stopped by killing its own session, never with ``ray stop`` (which would stop
every Ray instance on the machine). About 40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from tests.pipeline.corpus import corrupt_jpeg, good_jpeg

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[3]) == sid:
                pids.append(int(name))
    return pids


def test_ray_job_submit_runs_the_annotation_job_on_a_local_head(tmp_path):
    images = tmp_path / "photos"
    (images / "a").mkdir(parents=True)
    for i in range(5):
        (images / "a" / f"{i}.jpg").write_bytes(good_jpeg(40 + 4 * i, 32))
    (images / "bad.jpg").write_bytes(corrupt_jpeg())
    out = tmp_path / "out"
    temp_dir = tempfile.mkdtemp(prefix="rayjs-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", PATH=bin_dir + os.pathsep + env.get("PATH", ""))
    port, dashboard = _free_port(), _free_port()
    # every port of its own: another Ray instance on the machine (a suite running beside this one) holds the
    # defaults, and a dashboard agent that cannot bind its port leaves the job server with no agent to submit to
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    head = subprocess.Popen([f"{bin_dir}/ray", "start", "--head", "--block", f"--port={port}",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                             *agent_ports, f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 90
        while True:  # the job server answers once the dashboard is up
            assert head.poll() is None, head.stdout.read()
            ok = subprocess.run([f"{bin_dir}/ray", "job", "list", "--address", address], env=env,
                                capture_output=True, text=True, timeout=60)
            if ok.returncode == 0:
                break
            assert time.monotonic() < deadline, ok.stdout + ok.stderr
            time.sleep(1.0)
        deadline = time.monotonic() + 90
        while True:  # the job server refuses a submission until the node's dashboard agent has registered
            job = subprocess.run(
                [f"{bin_dir}/ray", "job", "submit", "--address", address, "--working-dir", ".", "--", "python", "-m",
                 "jobs.annotate", "--input", str(images), "--output", str(out), "--prompts", "whole-image",
                 "--images-per-shard", "4", "--workers", "1", "--cpus-per-worker", "1", "-q"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            if job.returncode == 0 or "No available agent" not in job.stderr or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "succeeded" in job.stdout + job.stderr
    finally:
        for _ in range(50):
            pids = _session_pids(head.pid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        head.wait(timeout=30)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["inputs"] == [str(images)]
    rows = []
    for path in sorted((out / "images").glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    assert sorted((r["image_key"], r["status"]) for r in rows) == [
        *[(f"a/{i}.jpg", "ok") for i in range(5)], ("bad.jpg", "decode_error")]
    assert len(list((out / "_manifest").glob("*.json"))) == 2
