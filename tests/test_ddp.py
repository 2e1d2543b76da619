"""Distributed data parallel through torchrun on the CPU (gloo): two processes on one node, two nodes of one process
each (two torchrun agents meeting by c10d rendezvous on loopback), and an elastic restart after a rank is killed
inside an epoch. All three end with the same weights."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvt.engine import evaluate_checkpoint
from test_data import write_imagefolder

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 300
# 48 training images in global batches of 8 (4 per process): 6 steps an epoch, a checkpoint inside each epoch.
RUN = ["train.progress=false", "data.dataset=imagefolder", "data.img_size=32", "train.batch_size=8",
       "train.epochs=2", "train.warmup_epochs=0.5", "train.checkpoint_every_steps=4", "train.mixup=0.4",
       "model.args.drop_path_rate=0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*launcher: str, script: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, *script], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(*launches: subprocess.Popen) -> list[str]:
    """Wait for the launches; their output, each having succeeded."""
    outputs = []
    for launch in launches:
        output, _ = launch.communicate(timeout=TIMEOUT_S)
        assert launch.returncode == 0, output[-12000:]
        outputs.append(output)
    return outputs


def cvt_train(out: Path, images: Path, *extra: str) -> list[str]:
    return ["-m", "cvt", "train", "--output", str(out), "--device", "cpu", *RUN, f"data.root={images}", *extra]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("images"), per_class=16)


@pytest.fixture(scope="module")
def one_node(images, tmp_path_factory) -> tuple[Path, str]:
    """Two processes on one node: the run's folder and its output."""
    out = tmp_path_factory.mktemp("one-node") / "run"
    output, = finish(torchrun("--standalone", "--nproc-per-node", "2", script=cvt_train(out, images)))
    return out, output


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "last.pth", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_processes_train_checkpoint_once_and_evaluate_like_one_process(one_node):
    out, output = one_node
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2 and summary["steps"] == 12
    # Logs and files from rank 0 only: one result line, one checkpoint of each kind, nothing half-written.
    assert output.count("digits_cvt_tiny: top-1") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "best.pth", "curves.png", "epoch_0001.pth", "epoch_0002.pth", "last.pth", "metrics.csv",
        "metrics.jsonl", "summary.json"]
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["epoch"] == 2 and len(state["rng"]) == 2  # every process's generators, for an exact resume
    # The distributed evaluation (each process its own shard, summed) equals one process evaluating it all.
    single = evaluate_checkpoint(out / "last.pth", device="cpu")
    assert single["images"] == 6
    assert single["top1"] == summary["top1"] and single["top5"] == summary["top5"]
    assert single["loss"] == pytest.approx(summary["loss"], rel=1e-6)


def test_two_nodes_by_c10d_rendezvous_train_as_one_node_of_two(one_node, images, tmp_path):
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [torchrun("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                       endpoint, "--rdzv-id", "two-nodes", script=cvt_train(out, images)) for _ in range(2)]
    finish(*agents)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert_same_weights(out, one_node[0])


def test_a_rank_killed_inside_an_epoch_restarts_and_ends_as_if_never_killed(one_node, images, tmp_path):
    # Rank 1 SIGKILLs itself after step 9, inside epoch 2 and after its checkpoint at step 8. torchrun restarts
    # both processes with the same command, which resumes from that checkpoint.
    out = tmp_path / "run"
    killing = ["kill_rank_after_step.py", "1", "9", *cvt_train(out, images, "--resume")[2:]]
    output, = finish(torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                              "--monitor-interval", "0.5", script=[str(TESTS / killing[0]), *killing[1:]]))
    assert "resumed from" in output and "epoch 1 and part of the next, step 8" in output
    assert_same_weights(out, one_node[0])
    assert [json.loads(line)["top1"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        json.loads(line)["top1"] for line in (one_node[0] / "metrics.jsonl").read_text().splitlines()]
