"""jobs.trainer: the shared Ray Train scaffolding, on a toy regression loop.

Checks: the helpers in a plain process (rank 0 of 1); on 2 local Ray Train workers: ranks, disjoint shard slices,
mean all-reduce of values and gradients (absent gradients stay absent), a checkpoint holding ``state.pt`` and the
job's extra file; a worker that dies mid-run resumes from the last checkpoint and ends where an uninterrupted run
ends; a relaunch with the same name continues from the saved step (these two are marked slow: the training job's
tests cover both in the default suite); run_local checkpoints and resumes in one process. Progress: rank 0's
``progress`` lines reach the driver's callback in order (with the workers' output not forwarded), other ranks' are
dropped; the time-based ``ProgressMeter`` on a fake clock. Default suite: about
1 min on 2 shared cores (one Ray Train launch); with the slow tests about 5 min under load (each launch spends
~45 s starting its workers there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from jobs import trainer
from jobs.trainer import TrainerConfig


def _toy_loop(config: dict) -> None:
    """Fit y = x @ w_true on rank-strided data, checkpointing every step; optionally die once at a step."""
    rank, size = trainer.world()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    unused = torch.nn.Parameter(torch.zeros(2))  # never receives a gradient
    opt = torch.optim.Adam(list(model.parameters()) + [unused], lr=0.05)
    step = 0
    restored = trainer.restore()
    if restored is not None:
        model.load_state_dict(restored["model"])
        opt.load_state_dict(restored["optimizer"])
        step = restored["step"]
    log = Path(config["log_dir"])
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(64, 4, generator=g)
    y_all = x_all @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    rows = trainer.shard_slice(list(range(64)))
    while step < config["steps"]:
        if config.get("fail_at") == step and rank == 1 and not (log / "failed").exists():
            (log / "failed").write_text("1")
            os._exit(1)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x_all[rows]), y_all[rows])
        loss.backward()
        local_grad = model.weight.grad.clone()
        trainer.all_reduce_gradients([model.weight, unused])
        opt.step()
        step += 1
        means = trainer.all_reduce_mean({"rank": float(rank), "loss": float(loss)})
        with open(log / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "rank": rank, "size": size, "rows": rows, "mean_rank": means["rank"],
                                "local_grad": local_grad.tolist(), "grad": model.weight.grad.tolist(),
                                "unused_grad_none": unused.grad is None, "weight": model.weight.tolist(),
                                "restored_step": None if restored is None else restored["step"]}) + "\n")
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
        trainer.progress(f"toy step {step} of rank {rank}")
        trainer.report({"step": step, "loss": means["loss"]}, state=state,
                       files={"weights.json": lambda p: p.write_text(json.dumps(model.weight.tolist()))})
        if config.get("stop_at") == step:
            return


def _records(log: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (log / f"rank{rank}.jsonl").read_text().splitlines()]


def test_plain_process_is_rank_zero_of_one():
    assert trainer.world() == (0, 1)
    assert trainer.restore() is None
    assert trainer.shard_slice(["a", "b", "c"]) == ["a", "b", "c"]
    assert trainer.all_reduce_mean({"x": 2.5}) == {"x": 2.5}
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 4.0)
    trainer.all_reduce_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 4.0))
    trainer.report({"x": 1.0}, state={"step": 1})  # logs only, must not need Ray


def test_read_state_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="state.pt"):
        trainer.read_state(tmp_path)


def test_launch_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="num_workers"):
        trainer.launch(_toy_loop, {}, TrainerConfig(name="x", storage_path=str(tmp_path), num_workers=0))


def _cfg(tmp_path: Path, name: str, **kw) -> TrainerConfig:
    return TrainerConfig(name=name, storage_path=str(tmp_path / "runs"), num_workers=2, cpus_per_worker=1.0, **kw)


def test_two_workers_split_reduce_and_checkpoint(ray_local, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    lines: list[str] = []
    result = trainer.launch(_toy_loop, {"steps": 3, "log_dir": str(log)}, _cfg(tmp_path, "basic"),
                            on_progress=lines.append)
    # rank 0's progress lines, every one and in order, reached the driver (Ray forwards no worker output here)
    assert lines == [f"toy step {i} of rank 0" for i in (1, 2, 3)]
    r0, r1 = _records(log, 0), _records(log, 1)
    assert [r["step"] for r in r0] == [1, 2, 3] and [r["size"] for r in r0 + r1] == [2] * 6
    rows0, rows1 = r0[0]["rows"], r1[0]["rows"]
    assert not set(rows0) & set(rows1) and sorted(rows0 + rows1) == list(range(64))
    for a, b in zip(r0, r1):
        assert a["mean_rank"] == b["mean_rank"] == 0.5
        expected = (torch.tensor(a["local_grad"]) + torch.tensor(b["local_grad"])) / 2
        assert torch.allclose(torch.tensor(a["grad"]), expected, atol=1e-6)
        assert a["grad"] == b["grad"]
        assert a["unused_grad_none"] and b["unused_grad_none"]
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as d:
        state = trainer.read_state(d)
        assert state["step"] == 3
        assert json.loads((Path(d) / "weights.json").read_text()) == state["model"]["weight"].tolist()


@pytest.mark.slow  # the job-level twin in tests/jobs/test_train.py stays in the default suite
def test_worker_death_resumes_from_last_checkpoint(ray_local, tmp_path):
    ref_log, log = tmp_path / "ref", tmp_path / "log"
    ref_log.mkdir()
    log.mkdir()
    # the uninterrupted reference: one process on all rows (the mean of the two equal halves' gradients is the
    # full-batch gradient)
    _toy_loop({"steps": 6, "log_dir": str(ref_log)})
    reference = _records(ref_log, 0)[-1]["weight"]
    result = trainer.launch(_toy_loop, {"steps": 6, "log_dir": str(log), "fail_at": 3},
                            _cfg(tmp_path, "faulty", max_failures=1))
    assert (log / "failed").exists()
    r0 = _records(log, 0)
    # steps 1-3 before the failure; the restart continues after the newest checkpoint Ray registered (step 3, or
    # step 2 when the failure is seen before the last report is processed), not from scratch
    restored = {r["restored_step"] for r in r0 if r["restored_step"] is not None}
    assert len(restored) == 1
    k = restored.pop()
    assert k in (2, 3)
    assert [r["step"] for r in r0] == [1, 2, 3] + list(range(k + 1, 7))
    with result.checkpoint.as_directory() as d:
        state = trainer.read_state(d)
    assert state["step"] == 6
    # optimiser state continued (Adam's step count and moments), so the weights equal the uninterrupted run's
    assert state["optimizer"]["state"][0]["step"] == 6
    assert torch.allclose(state["model"]["weight"], torch.tensor(reference), atol=1e-5)


@pytest.mark.slow  # covered in the default suite by the driver-kill test of tests/jobs/test_train.py
def test_relaunch_with_same_name_continues(ray_local, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    first = trainer.launch(_toy_loop, {"steps": 5, "log_dir": str(log), "stop_at": 2}, _cfg(tmp_path, "again"))
    with first.checkpoint.as_directory() as d:
        assert trainer.read_state(d)["step"] == 2
    second = trainer.launch(_toy_loop, {"steps": 5, "log_dir": str(log)}, _cfg(tmp_path, "again"))
    r0 = _records(log, 0)
    assert [r["step"] for r in r0] == [1, 2, 3, 4, 5]
    assert [r["restored_step"] for r in r0][2:] == [2, 2, 2]
    with second.checkpoint.as_directory() as d:
        assert trainer.read_state(d)["step"] == 5


def test_run_local_checkpoints_and_resumes(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    cfg = TrainerConfig(name="local", storage_path=str(tmp_path / "runs"), num_to_keep=2)
    lines: list[str] = []
    first = trainer.run_local(_toy_loop, {"steps": 5, "log_dir": str(log), "stop_at": 3}, cfg,
                              on_progress=lines.append)
    assert lines == [f"toy step {i} of rank 0" for i in (1, 2, 3)]
    assert first.metrics["step"] == 3
    with first.checkpoint.as_directory() as d:
        assert trainer.read_state(d)["step"] == 3
    assert len(list((tmp_path / "runs" / "local").glob("checkpoint_*"))) == 2  # num_to_keep
    second = trainer.run_local(_toy_loop, {"steps": 5, "log_dir": str(log)}, cfg)
    records = _records(log, 0)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["restored_step"] for r in records] == [None] * 3 + [3, 3]
    with second.checkpoint.as_directory() as d:
        state = trainer.read_state(d)
    assert state["step"] == 5 and state["optimizer"]["state"][0]["step"] == 5
    assert trainer.world() == (0, 1) and trainer.restore() is None  # nothing leaks out of run_local


def test_progress_meter_lines_are_time_based():
    """A step line at the first step, at the last step, and often enough that no two are ``every_s`` apart; the loss is
    the mean since the previous line, the rate and the ETA leave out time spent aside (evaluations), and a phase
    that ends before the run names the steps after it."""
    from jobs.progress import ProgressMeter, duration

    now = [100.0]
    lines: list[str] = []
    meter = ProgressMeter("[t]", 10, 30.0, started=90.0, send=lines.append, clock=lambda: now[0],
                          phase="warm-up", phase_end=4, then="6 main steps")
    made = []
    for step in range(1, 11):
        now[0] += 10.0  # 10 s per step, 8 images per step
        if step == 4:
            with meter.aside() as timer:
                now[0] += 100.0  # an evaluation: in elapsed, not in the rate or the pace
            assert timer["seconds"] == 100.0
            meter.note("evaluated")
            meter.phase(step, "main")
        made.append(meter.step(step, loss=float(step), samples=8) is not None)
    # a line at the first and last steps, and at the last step before 30 s would have passed since the previous
    # line (10 s steps and the line's delivery time): never more than 30 s between lines
    assert made == [True, False, True, True, False, True, False, True, False, True]
    assert lines[0] == "[t] step 1/10 (10%)  loss 1  0.8 images/s  elapsed 20s  ETA 30s + 6 main steps  (warm-up)"
    assert lines[1] == "[t] step 3/10 (30%)  loss 2.5  0.8 images/s  elapsed 40s  ETA 10s + 6 main steps  (warm-up)"
    # step 4: 10 s of training (the 100 s aside left out); the main phase has not run a step yet
    assert lines[2] == "[t] evaluated"
    assert lines[3] == "[t] step 4/10 (40%)  loss 4  0.8 images/s  elapsed 2m30s  ETA ?  (main)"
    assert lines[4] == "[t] step 6/10 (60%)  loss 5.5  0.8 images/s  elapsed 2m50s  ETA 40s  (main)"
    assert lines[5] == "[t] step 8/10 (80%)  loss 7.5  0.8 images/s  elapsed 3m10s  ETA 20s  (main)"
    assert lines[6] == "[t] step 10/10 (100%)  loss 9.5  0.8 images/s  elapsed 3m30s  ETA 0s  (main)"
    every = ProgressMeter("[t]", 3, 0.0, send=lines.append, clock=lambda: now[0])
    assert all(every.step(i, 1.0, 1) for i in (1, 2, 3))  # every_s=0: a line at every step
    assert [duration(s) for s in (0.4, 59.6, 61, 3600 * 2 + 5 * 60)] == ["0s", "1m00s", "1m01s", "2h05m"]
    assert trainer.world() == (0, 1)
    trainer.progress("outside a run: the debug log only")  # must not need Ray or a driver
