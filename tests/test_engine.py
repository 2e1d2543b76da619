"""The training engine on tiny data: the default run, recipes and their bases, typed config values, the training
state, exact resume, divergence, accumulation, the speed-ups, fine-tuning from a checkpoint made by `cvt train`."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from cvt import engine
from cvt.engine import DEFAULTS, build_model, load_config, read_training_checkpoint, train
from cvt.cli import main
from cvt.files import TEMPORARY_NAME, yaml_load
from test_data import write_cifar, write_corrupt_imagefolder

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUIET = ["train.progress=false"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The built-in default run, exactly as `cvt train` (and `make demo`) runs it."""
    out = tmp_path_factory.mktemp("digits")
    main(["train", "--output", str(out)])
    return out


def test_the_default_run_reaches_95_percent_and_writes_everything(digits_run, capsys):
    summary = json.loads((digits_run / "summary.json").read_text())
    assert summary["top1"] >= 95.0
    for key in ("top1", "top5", "loss", "epochs", "seconds", "params"):
        assert key in summary
    assert summary["epochs"] == DEFAULTS["train"]["epochs"] and summary["finished"]
    assert summary["dataset"] == "digits" and summary["num_classes"] == 10
    rows = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, summary["epochs"] + 1))
    assert rows[-1]["top1"] == summary["top1"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert math.isclose(rows[-1]["lr"], DEFAULTS["train"]["min_lr"], rel_tol=1e-6)  # the cosine ran to its end
    assert (digits_run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,lr,train_loss")
    assert (digits_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    names = {p.name for p in digits_run.iterdir()}
    keep = DEFAULTS["train"]["keep_epoch_checkpoints"]
    epochs = [f"epoch_{e:04d}.pth" for e in range(summary["epochs"] - keep + 1, summary["epochs"] + 1)]
    assert names == {"last.pth", "best.pth", "summary.json", "metrics.jsonl", "metrics.csv", "curves.png", *epochs,
                     ".lock"}
    best = read_training_checkpoint(digits_run / "best.pth")
    assert best["epoch"] == summary["best_epoch"] and best["history"][-1]["top1"] == summary["best_top1"]


def test_a_training_checkpoint_loads_with_weights_only_and_through_create_model(digits_run):
    import cvt

    state = torch.load(digits_run / "last.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scaler", "ema", "rng", "epoch", "step", "config"} <= set(state)
    assert state["pretrained_cfg"]["label_names"] == [str(d) for d in range(10)]
    # A plain create_model call: the architecture and the class names come with the checkpoint.
    model = cvt.create_model("cvt_13_224", pretrained=str(digits_run / "last.pth"))
    assert model.num_classes == 10 and model.stage0.patch_embed.proj.out_channels == 16
    assert model.pretrained_cfg["label_names"] == [str(d) for d in range(10)]
    assert torch.equal(model.state_dict()["head.weight"], state["model"]["head.weight"])


def test_recipes_load_and_the_digits_recipe_is_the_default():
    for path in CONFIGS.glob("*.yaml"):
        load_config(path)
    assert load_config(CONFIGS / "digits.yaml") == load_config(None)


@pytest.mark.parametrize("recipe, model, weight_decay", [
    ("cvt13_imagenet", "cvt_13_224", 0.05), ("cvt21_imagenet", "cvt_21_224", 0.1),
    ("cvtw24_imagenet", "cvt_w24_384", 0.1)])
def test_imagenet_recipes_are_the_papers(recipe, model, weight_decay):
    c = load_config(CONFIGS / f"{recipe}.yaml")
    t, d = c["train"], c["data"]
    assert c["model"]["name"] == model and d["dataset"] == "imagefolder" and d["img_size"] == 224
    assert c["model"]["args"] in ({}, {"img_size": 224})  # nothing of the digits model leaks in
    assert t["optimizer"] == "adamw" and t["weight_decay"] == weight_decay
    assert math.isclose(t["lr"] * t["batch_size"] / t["lr_base_batch"], 2e-3) and t["batch_size"] == 2048
    assert (t["epochs"], t["warmup_epochs"], t["cooldown_epochs"]) == (300, 5, 10)
    assert (t["warmup_lr"], t["min_lr"], t["label_smoothing"]) == (1e-6, 1e-5, 0.1)
    assert (t["mixup"], t["cutmix"], t["mixup_prob"], t["amp"]) == (0.8, 1.0, 1.0, "fp16")
    a = d["augment"]
    assert a["scale"] == [0.08, 1.0] and a["hflip"] == 0.5 and a["color_jitter"] == 0.4
    assert a["auto_augment"] == "rand-m9-mstd0.5-inc1" and a["interpolation"] == "bicubic"
    assert (a["re_prob"], a["re_mode"], a["re_count"]) == (0.25, "pixel", 1)
    assert (d["eval_crop_pct"], d["eval_crop_mode"]) == (0.875, "center")


@pytest.mark.parametrize("target, dataset, steps", [
    ("imagenet", "imagefolder", 20000), ("cifar10", "cifar10", 10000), ("cifar100", "cifar100", 10000),
    ("pets", "pets", 500), ("flowers102", "flowers102", 500)])
def test_finetune_recipes_are_the_papers(target, dataset, steps):
    c = load_config(CONFIGS / f"finetune_{target}.yaml")
    t, d = c["train"], c["data"]
    assert d["dataset"] == dataset and d["img_size"] == 384 and c["model"]["name"] == "cvt_13_384"
    assert c["model"]["pretrained"] and c["model"]["reset_head"] and c["model"]["args"] == {}
    assert (t["optimizer"], t["momentum"], t["batch_size"], t["steps"]) == ("momentum", 0.9, 512, steps)
    assert math.isclose(t["lr"] * t["batch_size"] / t["lr_base_batch"], 0.003)
    assert (d["eval_crop_pct"], d["eval_crop_mode"]) == (1.0, "squash")


def test_the_ablation_recipe_is_the_digits_recipe_for_20_epochs():
    assert load_config(CONFIGS / "ablate_digits.yaml") == load_config(None, [
        "name=ablate_digits", "train.epochs=20", "train.keep_epoch_checkpoints=0", "train.progress=false"])


def test_a_recipe_with_a_base_sets_only_what_differs_from_it():
    bases = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        recipe = yaml_load(path.read_text())
        if "base" not in recipe:
            continue
        bases[path.name] = recipe.pop("base")
        base = load_config(CONFIGS / bases[path.name])
        for key, value in engine.config_leaves(recipe):
            here = base
            for part in key.split("."):
                here = here[part]
            assert value != here, f"{path.name} sets {key} to its base's value"
    assert bases == {"ablate_digits.yaml": "digits.yaml", "cvt21_imagenet.yaml": "cvt13_imagenet.yaml",
                     "cvtw24_imagenet.yaml": "cvt13_imagenet.yaml",
                     **{f"finetune_{d}.yaml": "finetune_imagenet.yaml"
                        for d in ("cifar10", "cifar100", "flowers102", "pets")}}


def test_a_base_is_found_beside_its_recipe_and_chains_end_at_the_defaults(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "parent.yaml").write_text(f"base: {CONFIGS / 'digits.yaml'}\nseed: 5\ntrain: {{lr: 0.01}}\n")
    (tmp_path / "recipes" / "child.yaml").write_text("base: ../parent.yaml\ntrain: {lr: 0.02, epochs: 3}\n")
    assert load_config(tmp_path / "recipes" / "child.yaml", ["train.epochs=4"]) == load_config(
        None, ["seed=5", "train.lr=0.02", "train.epochs=4"])


def test_a_base_cycle_and_a_missing_base_are_errors_naming_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match=r"a\.yaml: a cycle of base recipes \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"no config file .*gone\.yaml \(the base of .*c\.yaml\)"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: c.yaml\ntrain: {epochs: many}\n")
    with pytest.raises(FileNotFoundError, match=r"gone\.yaml \(the base of .*c\.yaml\)"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("train: {epochs: many}\n")
    with pytest.raises(ValueError, match=r"e\.yaml: config key 'train\.epochs' takes an integer"):
        load_config(tmp_path / "e.yaml")


def test_overrides_are_typed_and_unknown_keys_suggest_close_ones():
    c = load_config(None, ["train.lr=1e-3", "model.args.depths=[1,1,1]", "train.amp=bf16", "seed=3"])
    assert c["train"]["lr"] == 1e-3 and c["train"]["amp"] == "bf16" and c["seed"] == 3
    assert c["model"]["args"] == dict(DEFAULTS["model"]["args"], depths=[1, 1, 1])
    with pytest.raises(ValueError, match="unknown config key 'train.lrr': did you mean train.lr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ValueError, match="unknown config key 'dataa': did you mean data"):
        load_config(None, ["dataa.root=x"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ValueError, match="'train' is a section"):
        load_config(None, ["train=3"])


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "'train.lr' takes a number, e.g. train.lr=0.002; got \"abc\""),
    ("train.epochs=1.5", "'train.epochs' takes an integer, e.g. train.epochs=15; got 1.5"),
    ("train.epochs=true", "'train.epochs' takes an integer, e.g. train.epochs=15; got true"),
    ("train.progress=3", "'train.progress' takes true or false, e.g. train.progress=true; got 3"),
    ("data.img_size=[1,2]", "'data.img_size' takes an integer, e.g. data.img_size=32; got [1, 2]"),
    ("data.augment.scale=0.5", "'data.augment.scale' takes a list of numbers, e.g. data.augment.scale=[0.6, 1.0]"),
    ("data.augment.scale=[a,1]", "'data.augment.scale' takes a list of numbers"),
    ("train.steps=1.5", "'train.steps' takes an integer or null, e.g. train.steps=10000; got 1.5"),
    ("train.amp=16", "'train.amp' takes a string or null, e.g. train.amp=bf16; got 16"),
    ("train.resume=3", "'train.resume' takes true or false, a path or null, e.g. train.resume=true; got 3"),
    ("model.pretrained=[x]", "'model.pretrained' takes a path or null"),
    ("name=7", "'name' takes a string, e.g. name=digits_cvt_tiny; got 7"),
])
def test_a_value_of_the_wrong_type_is_an_error_naming_the_key_the_type_and_an_example(override, message):
    with pytest.raises(ValueError) as error:
        load_config(None, [override])
    assert str(error.value).startswith(f"config key {message}")


@pytest.mark.parametrize("override, value", [
    ("train.lr=1e-3", 1e-3), ("train.lr=1", 1), ("train.epochs=2", 2), ("train.steps=null", None),
    ("train.warmup_epochs=0.5", 0.5), ("train.resume=true", True), ("train.resume=runs/a/last.pth", "runs/a/last.pth"),
    ("data.eval_crop_pct=null", None), ("data.augment.scale=[0, 1]", [0, 1]),
    ("data.augment.color_jitter=[0.4, 0.4, 0.4]", [0.4, 0.4, 0.4]), ("model.args.depths=[1, 1, 1]", [1, 1, 1]),
])
def test_a_value_of_the_right_type_is_taken(override, value):
    key, _, _ = override.partition("=")
    config = load_config(None, [override])
    for part in key.split("."):
        config = config[part]
    assert config == value


def test_train_checks_the_types_of_a_config_given_as_a_dict(tmp_path):
    with pytest.raises(ValueError, match="'train.epochs' takes an integer, e.g. train.epochs=15; got \"3\""):
        train({"train": {"epochs": "3"}}, tmp_path)
    assert not list(tmp_path.iterdir())


def tiny(out: Path, *overrides: str) -> dict:
    """A short digits run (checkpoints every epoch, nothing kept beyond last and best)."""
    config = load_config(None, [*QUIET, "train.keep_epoch_checkpoints=0", *overrides])
    return train(config, out)


def assert_same_tensors(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


def test_resume_continues_exactly(tmp_path):
    # Drop path, Mixup and EMA exercise torch's and numpy's generators and the EMA state across the resume.
    recipe = ["train.epochs=2", "model.args.drop_path_rate=0.2", "train.mixup=0.4", "train.ema_decay=0.9",
              "data.val_fraction=0.5"]
    tiny(tmp_path / "straight", *recipe)
    first = tiny(tmp_path / "split", *recipe, "train.epochs_per_run=1")
    assert first["epochs"] == 1 and not first["finished"]
    resumed = tiny(tmp_path / "split", *recipe, "train.resume=true")
    assert resumed["epochs"] == 2 and resumed["finished"]
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    for key in ("model", "ema", "optimizer", "scaler", "rng", "step", "epoch"):
        assert_same_tensors(a[key], b[key])
    assert [r["top1"] for r in a["history"]] == [r["top1"] for r in b["history"]]
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_from_a_missing_path_or_from_foreign_weights_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume from"):
        tiny(tmp_path, "train.epochs=1", f"train.resume={tmp_path / 'missing.pth'}")
    torch.save({"model": {}}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="not a training checkpoint written by `cvt train`"):
        tiny(tmp_path, "train.epochs=1", f"train.resume={tmp_path / 'foreign.pth'}")


def new_training_state(directory: Path, keep_epochs: int) -> engine.TrainingState:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return engine.TrainingState(
        directory=directory, keep_epochs=keep_epochs, model=model, optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False), ema=torch.nn.Linear(4, 3), model_name="cvt_13_224",
        model_args={"depths": [1, 1, 1]}, pretrained_cfg={"label_names": ["a", "b", "c"]}, config=DEFAULTS)


def test_the_training_state_saves_loads_back_and_keeps_the_last_epochs_and_the_best(tmp_path):
    state = new_training_state(tmp_path, keep_epochs=2)
    rng = [engine.rng_state()]
    for epoch, top1 in enumerate([10.0, 40.0, 20.0, 30.0], start=1):
        state.model(torch.randn(2, 4)).sum().backward()
        state.optimizer.step()
        state.step += 1
        state.record({"epoch": epoch, "top1": top1}, seconds=float(epoch))
        state.save(rng)
        state.copy_epoch()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "epoch_0003.pth", "epoch_0004.pth",
                                                          "last.pth"]
    assert state.best == {"top1": 40.0, "epoch": 2}
    assert read_training_checkpoint(tmp_path / "best.pth")["epoch"] == 2
    assert_same_tensors(torch.load(tmp_path / "epoch_0004.pth", weights_only=True), state.state_dict(rng))
    # The format `cvt.weights` and `model_from_checkpoint` read.
    assert list(torch.load(tmp_path / "last.pth", weights_only=True)) == [
        "format", "model", "model_name", "model_args", "pretrained_cfg", "optimizer", "scaler", "ema",
        "rng", "epoch", "step", "seconds", "history", "best", "epoch_progress", "config"]

    loaded = new_training_state(tmp_path, keep_epochs=2)
    loaded.load(tmp_path / "last.pth")
    assert_same_tensors(loaded.state_dict(rng), state.state_dict(rng))
    assert (loaded.epoch, loaded.step, loaded.seconds, loaded.best) == (4, 4, 4.0, state.best)


def test_train_accel_swaps_in_the_cpu_linears_and_off_trains_the_reference_model(tmp_path, monkeypatch):
    from cvt.accel import OneDNNLinear

    linear_types = []  # of the model trained, per run
    real = engine.train_one_epoch

    def recording(epoch, models, *args):
        linear_types.append({type(m) for m in models.model.modules() if isinstance(m, torch.nn.Linear)})
        return real(epoch, models, *args)

    monkeypatch.setattr(engine, "train_one_epoch", recording)
    tiny(tmp_path / "default", "train.steps=1")
    tiny(tmp_path / "reference", "train.steps=1", "train.accel=false")
    assert linear_types == [{OneDNNLinear}, {torch.nn.Linear}]


def test_gradient_checkpointing_and_layer_decay_are_config_keys(tmp_path, monkeypatch):
    seen = []
    real = engine.train_one_epoch

    def recording(epoch, models, optimization, *args):
        seen.append(({s.grad_checkpointing for s in models.model.stages},
                     sorted({g["lr_scale"] for g in optimization.optimizer.param_groups if "lr_scale" in g})))
        return real(epoch, models, optimization, *args)

    monkeypatch.setattr(engine, "train_one_epoch", recording)
    tiny(tmp_path / "default", "train.steps=1")
    tiny(tmp_path / "both", "train.steps=1", "model.grad_checkpointing=true", "train.layer_decay=0.5")
    assert seen[0] == ({False}, [])
    checkpointing, scales = seen[1]
    assert checkpointing == {True} and scales[-1] == 1.0 and scales[0] == 0.5 ** (len(scales) - 1)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    steps_per_epoch = 1437 // 64
    calls = []
    real_forward = torch.nn.CrossEntropyLoss.forward

    def forward(self, logits, targets):  # the loss turns NaN on the first step of epoch 2
        calls.append(1)
        loss = real_forward(self, logits, targets)
        return loss * float("nan") if len(calls) > steps_per_epoch else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forward)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--epochs", "2", "--output", str(tmp_path), *QUIET])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"the loss is nan at epoch 2, step {steps_per_epoch + 1}" in err
    assert f"the last good checkpoint is {tmp_path / 'last.pth'} (step {steps_per_epoch})" in err
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "summary.json").exists()
    assert not [p for p in tmp_path.iterdir() if TEMPORARY_NAME.match(p.name)]  # no half-written file


def test_the_loop_reads_the_loss_on_the_host_every_few_steps_not_every_step(tmp_path, monkeypatch):
    # On a GPU each read of a device tensor waits for all queued work. The reads are counted here in the loop of
    # `train` itself and in what it calls, except the data loader (host tensors) and the evaluation.
    reads = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code is not engine.evaluate.__code__ \
                    and "torch/utils/data" not in frame.f_code.co_filename:
                if frame.f_code is engine.run_training.__code__:
                    reads.append(name)
                    break
                frame = frame.f_back
            return real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        counting(name)
    summary = tiny(tmp_path, "train.epochs=2", "data.val_fraction=0.5", "train.micro_batch_size=16")
    steps = summary["steps"] // 2  # per epoch, each of 4 accumulated micro-batches
    # one read per CHECK_EVERY steps and at the end of the epoch; the loss summed for the epoch is read once
    assert len(reads) <= 2 * (math.ceil(steps / engine.CHECK_EVERY) + 1) < 2 * 4 * steps


def test_gradient_accumulation_reaches_the_global_batch(tmp_path):
    # Without BatchNorm (position-wise projections) 4 accumulated micro-batches of 16 make the same steps as
    # batches of 64.
    recipe = ["train.epochs=1", "model.args.proj_method=linear", "model.args.drop_path_rate=0",
              "data.val_fraction=0.5"]
    whole = tiny(tmp_path / "whole", *recipe)
    accumulated = tiny(tmp_path / "accumulated", *recipe, "train.micro_batch_size=16")
    assert whole["steps"] == accumulated["steps"] == 898 // 64
    a = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "accumulated" / "last.pth", weights_only=True)["model"]
    # oneDNN sums a product's gradient in an order that depends on the batch it is given, and Adam moves a
    # parameter whose gradient is near zero by about the learning rate whatever its size: hence 5e-5.
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=5e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size 24"):
        tiny(tmp_path / "bad", *recipe, "train.micro_batch_size=24")


def test_compiled_training_matches_eager_training(tmp_path):
    eager = tiny(tmp_path / "eager", "train.epochs=1", "data.val_fraction=0.5")
    compiled = tiny(tmp_path / "compiled", "train.epochs=1", "data.val_fraction=0.5", "model.compile=true")
    assert compiled["steps"] == eager["steps"]
    assert abs(compiled["loss"] - eager["loss"]) < 1e-3 and abs(compiled["top1"] - eager["top1"]) <= 0.6


def test_bf16_autocast_ema_and_clipping_run_and_are_evaluated(tmp_path):
    summary = tiny(tmp_path, "train.epochs=1", "train.amp=bf16", "train.ema_decay=0.5", "train.clip_grad=1.0",
                   "data.val_fraction=0.5")
    assert {"ema_top1", "ema_top5", "ema_loss"} <= set(summary) and 0 <= summary["ema_top1"] <= 100
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "ema_top1" in header
    with pytest.raises(ValueError, match="train.amp must be null, bf16 or fp16"):
        tiny(tmp_path / "x", "train.amp=fp8")


def test_skipped_images_are_reported_at_the_end_of_the_epoch(tmp_path, capsys):
    write_corrupt_imagefolder(tmp_path / "data")
    # 12 readable training images and one broken one, all in one batch.
    summary = tiny(tmp_path / "run", "data.dataset=imagefolder", f"data.root={tmp_path / 'data'}",
                   "data.bad_images=skip", "train.batch_size=13", "train.epochs=1")
    assert summary["epochs"] == 1
    assert "skipped 1 unreadable images" in capsys.readouterr().out
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["skipped_images"] == 1


def test_finetuning_from_a_cvt_train_checkpoint_replaces_the_head_and_the_loss_falls(digits_run, tmp_path, capsys):
    write_cifar(tmp_path / "cifar", num_classes=100, per_class=2)
    checkpoint = digits_run / "last.pth"
    config = load_config(CONFIGS / "finetune_cifar100.yaml", [
        f"model.pretrained={checkpoint}", f"data.root={tmp_path / 'cifar'}", "data.img_size=32", "data.workers=0",
        "model.args.img_size=32", "train.steps=60", "train.batch_size=40", "train.amp=null", "train.lr=0.05",
        *QUIET])
    # The model as fine-tuning starts: the digits weights everywhere but a fresh 100-class head.
    with pytest.warns(UserWarning, match="freshly initialised"):
        model, note = build_model(config["model"], num_classes=100)
    source = torch.load(checkpoint, weights_only=True)["model"]
    assert note == {"pretrained": str(checkpoint), "pretrained_classes": 10, "head_replaced": True}
    assert model.head.weight.shape == (100, 48) and source["head.weight"].shape == (10, 48)
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, source[k]), k

    summary = train(config, tmp_path / "run")
    assert summary["head_replaced"] and summary["num_classes"] == 100 and summary["steps"] == 60
    assert "new 100-class head (the checkpoint's had 10)" in capsys.readouterr().out
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train_loss"] for line in rows]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.2
    saved = read_training_checkpoint(tmp_path / "run" / "last.pth")
    assert saved["pretrained_cfg"]["label_names"][:2] == ["class_0", "class_1"]

