"""A run's output folder and its record: one run per folder, a resume that goes on with the recorded run, and
nothing half-done after a kill, at any write of an epoch or inside one (train.checkpoint_every_steps)."""
import json
import os
import signal
import traceback
from pathlib import Path

import pytest
import torch

from cvt import engine
from cvt.cli import main
from cvt.engine import RunFolder, load_config, train
from cvt.files import TEMPORARY_NAME
from test_data import write_imagefolder

# 24 training images of 3 classes in batches of 8: 3 steps an epoch, in well under a second.
RECIPE = ["train.progress=false", "data.dataset=imagefolder", "data.img_size=32", "train.batch_size=8",
          "train.warmup_epochs=0.5", "train.keep_epoch_checkpoints=5"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("images"), per_class=8)


def recipe(images: Path, *overrides: str) -> dict:
    return load_config(None, [*RECIPE, f"data.root={images}", *overrides])


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`cvt ARGS`: its exit code, stdout and stderr."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "last.pth", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(images, tmp_path):
    first = RunFolder(tmp_path / "run")
    first.claim(resume=None, overwrite=False)
    try:
        with pytest.raises(FileExistsError, match=f"a run in progress \\(cvt train, PID {os.getpid()} on "):
            train(recipe(images, "train.epochs=1"), tmp_path / "run")
    finally:
        first.release()
    assert not (tmp_path / "run" / "last.pth").exists()
    train(recipe(images, "train.epochs=1"), tmp_path / "run")  # the lock goes with its holder


def test_a_new_run_into_an_earlier_runs_folder_is_refused_and_overwrite_clears_it(images, tmp_path):
    out = tmp_path / "run"
    train(recipe(images, "train.epochs=3"), out)
    with pytest.raises(FileExistsError, match="holds an earlier run .*--resume.*--overwrite"):
        train(recipe(images, "train.epochs=1"), out)
    assert len(rows(out)) == 3
    train(recipe(images, "train.epochs=1"), out, overwrite=True)
    assert len(rows(out)) == 1
    assert sorted(p.name for p in out.glob("epoch_*.pth")) == ["epoch_0001.pth"]  # none of the old run's


@pytest.mark.parametrize("make_output, message", [
    (lambda tmp: (tmp / "file").touch() or tmp / "file", "is a file: give --output a folder"),
    (lambda tmp: (tmp / "file").touch() or tmp / "file" / "run", "cannot write to the output folder"),
])
def test_an_output_that_cannot_be_a_run_folder_is_refused_before_training(images, tmp_path, capsys, monkeypatch,
                                                                          make_output, message):
    monkeypatch.setattr(engine, "build_data", lambda *a: pytest.fail("the run started"))
    code, _, err = cli(capsys, "train", "--output", str(make_output(tmp_path)), *RECIPE, f"data.root={images}")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_resume_goes_on_with_the_recorded_fine_tuning_run(images, tmp_path, capsys):
    # A fine-tune to 2 classes from a 3-class run, stopped by train.epochs_per_run, resumed by a bare --resume:
    # the model, head, data and length all come from the checkpoint.
    two_classes = write_imagefolder(tmp_path / "two", classes=("a", "b"), per_class=8)
    train(recipe(images, "train.epochs=1"), tmp_path / "base")
    code, _, err = cli(capsys, "train", "--output", str(tmp_path / "fine"), *RECIPE, f"data.root={two_classes}",
                       f"model.pretrained={tmp_path / 'base' / 'last.pth'}", "train.epochs=3",
                       "train.epochs_per_run=2")
    assert code == 0, err
    code, out, err = cli(capsys, "train", "--output", str(tmp_path / "fine"), "--resume")
    assert code == 0, err
    assert "resumed from" in out and "changed:" not in out
    assert [r["epoch"] for r in rows(tmp_path / "fine")] == [1, 2, 3]
    summary = json.loads((tmp_path / "fine" / "summary.json").read_text())
    assert summary["finished"] and summary["num_classes"] == 2 and summary["total_epochs"] == 3


def test_resume_refuses_to_change_the_run_and_lists_every_difference(images, tmp_path, capsys):
    out = tmp_path / "run"
    train(recipe(images, "train.epochs=2", "train.epochs_per_run=1"), out)
    code, _, err = cli(capsys, "train", "--output", str(out), "--resume", "train.batch_size=4",
                       "model.args.depths=[1,1,1]")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "train.batch_size (recorded 8, given 4)" in err and "model.args (recorded" in err
    assert len(rows(out)) == 1  # nothing ran


def test_a_new_lr_or_length_on_resume_replans_the_schedule_and_is_recorded(images, tmp_path):
    from timm.scheduler import CosineLRScheduler

    out = tmp_path / "run"
    train(recipe(images, "train.epochs=2", "train.epochs_per_run=1"), out)
    resumed = recipe(images, "train.epochs=4", "train.lr=0.01", "train.resume=true")
    train(resumed, out)
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["config"]["train"]["lr"] == 0.01 and state["config"]["train"]["epochs"] == 4
    # the lr of each resumed epoch's end: a fresh schedule for lr 0.01 over 4 epochs at that step
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    t = resumed["train"]
    schedule = CosineLRScheduler(optimizer, t_initial=12, lr_min=t["min_lr"], warmup_t=round(t["warmup_epochs"] * 3),
                                 warmup_lr_init=t["warmup_lr"], t_in_epochs=False)
    for row in rows(out)[1:]:
        schedule.step_update(row["step"])
        assert row["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)


def test_the_divergence_message_says_how_to_go_on_and_following_it_works(images, tmp_path, capsys):
    out = tmp_path / "run"
    train(recipe(images, "train.epochs=2", "train.epochs_per_run=1"), out)
    code, _, err = cli(capsys, "train", "--output", str(out), "--resume", "train.lr=1e12")
    assert code == 2 and "training diverged" in err and "Lower train.lr" in err
    advice = err.split("`")[1]  # cvt train --resume --output DIR KEY=VALUE
    assert advice == f"cvt train --resume --output {out} KEY=VALUE"
    code, _, err = cli(capsys, *advice.split()[1:-1], "train.lr=1e-3")
    assert code == 0, err
    assert [r["epoch"] for r in rows(out)] == [1, 2]


def run_in_child(work) -> int:
    """`work()` in a forked process with one thread (so that every run sums in the same order); its exit code,
    -9 when it was SIGKILLed."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            torch.set_num_threads(1)
            work()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def record_writes(then: int | None = None) -> list[str]:
    """The names of the files written, in order (atomic_path's renames into place); SIGKILL this process at write
    number `then` (from 1), after the temporary file is written and before the rename, where a kill leaves the
    most behind."""
    real, writes = os.replace, []

    def replace(src, dst):
        writes.append(Path(dst).name)
        if len(writes) == then:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)

    os.replace = replace
    return writes


def test_a_kill_at_any_write_resumes_to_the_same_run_with_nothing_left_over(images, tmp_path):
    # Two epochs of three steps with a checkpoint inside each (after steps 2 and 4). A kill at each write of the
    # second epoch (every file of a run is written in it) is followed by `--resume`, which finishes the run.
    # The first epoch's writes are the same as the second's.
    config = recipe(images, "train.epochs=2", "train.checkpoint_every_steps=2", "model.args.drop_path_rate=0.1",
                    "train.mixup=0.4", "train.resume=true")
    straight = tmp_path / "straight"

    def uninterrupted():
        writes = record_writes()
        train(config, straight)
        (tmp_path / "writes.json").write_text(json.dumps(writes))

    assert run_in_child(uninterrupted) == 0
    writes = json.loads((tmp_path / "writes.json").read_text())
    second_epoch = writes.index("curves.png") + 1
    assert set(writes[second_epoch:]) - {"best.pth"} == {"last.pth", "epoch_0002.pth", "metrics.jsonl",
                                                         "metrics.csv", "curves.png", "summary.json"}
    assert writes[second_epoch:].count("last.pth") == 2  # inside the epoch and at its end
    for kill_at in range(second_epoch + 1, len(writes) + 1):
        out = tmp_path / f"killed_at_{kill_at}"

        def killed():
            record_writes(then=kill_at)
            train(config, out)

        assert run_in_child(killed) == -signal.SIGKILL
        assert run_in_child(lambda: train(config, out)) == 0
        left = [p.name for p in out.iterdir() if TEMPORARY_NAME.match(p.name)]
        assert not left, f"killed at write {kill_at}: {left} left behind"
        assert_same_weights(out, straight)
        assert [(r["epoch"], r["step"], r["top1"]) for r in rows(out)] == [
            (r["epoch"], r["step"], r["top1"]) for r in rows(straight)], f"killed at write {kill_at}"
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
            p.name for p in straight.iterdir() if not p.name.startswith(".")), f"killed at write {kill_at}"


def test_tensorboard_logs_each_epochs_metrics_beside_metrics_jsonl(images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(recipe(images, "train.epochs=2", "train.tensorboard=true"), out)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    for key in ("top1", "val_loss", "train_loss", "lr"):
        scalars = events.Scalars(key)
        assert [e.step for e in scalars] == [r["step"] for r in rows(out)]
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in rows(out)], rel=1e-6)


def test_on_the_cpu_fp16_trains_in_float32_and_workers_fit_the_cores(capsys, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cfg = load_config(None, ["train.amp=fp16", "data.workers=8"])
    processes = engine.Processes(0, 1, torch.device("cpu"), started_group=False)
    run = engine.adapted_to_device(cfg, processes)
    assert run["train"]["amp"] is None and run["data"]["workers"] == 2
    assert cfg["train"]["amp"] == "fp16" and cfg["data"]["workers"] == 8  # the recipe, as checkpoints record it
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "train.amp=fp16 on the CPU" in out[0] and "using 2 loader workers" in out[1]
    assert engine.adapted_to_device(load_config(None, ["train.amp=bf16", "data.workers=2"]), processes) == \
        load_config(None, ["train.amp=bf16", "data.workers=2"])
