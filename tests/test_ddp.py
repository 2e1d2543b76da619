"""Distributed data parallel: `torchrun --nproc_per_node 2` on the CPU (gloo)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cvt.engine import evaluate_checkpoint


def test_torchrun_two_processes_trains_checkpoints_once_and_evaluates_like_one_process(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cvt", "train", "--epochs", "1", "--output", str(out), "--device", "cpu",
           "train.progress=false", "data.val_fraction=0.5"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 1
    # 898 training images: each process takes 449 per epoch, in micro-batches of 32 (the global batch of 64).
    assert summary["steps"] == 449 // 32
    # Logs and files from rank 0 only: one result line, one checkpoint of each kind, nothing half-written.
    assert done.stdout.count("digits_cvt_tiny: top-1") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pth", "curves.png", "epoch_0001.pth", "last.pth", "metrics.csv", "metrics.jsonl", "summary.json"]
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and len(state["rng"]) == 2  # every process's generators, for an exact resume
    # The distributed evaluation (each process its own shard, summed) equals one process evaluating it all.
    single = evaluate_checkpoint(out / "last.pth", device="cpu")
    assert single["images"] == 899
    assert single["top1"] == summary["top1"] and single["top5"] == summary["top5"]
    assert single["loss"] == pytest.approx(summary["loss"], rel=1e-6)
