"""`cvt train`, `cvt eval` and `cvt predict` from the command line."""
import json
import shutil

import pytest
import torch
from PIL import Image

import cvt
from cvt.cli import main
from cvt.data import Digits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch of the default run, with --seed and --epochs from the command line."""
    out = tmp_path_factory.mktemp("run")
    main(["train", "--epochs", "1", "--seed", "7", "--output", str(out), "train.progress=false",
          "data.val_fraction=0.5"])
    return out


def test_train_flags_reach_the_config_and_the_result_is_printed(run, capsys):
    state = torch.load(run / "last.pth", weights_only=True)
    assert state["config"]["seed"] == 7 and state["config"]["train"]["epochs"] == 1
    summary = json.loads((run / "summary.json").read_text())
    # --resume of a finished run trains nothing more and reports the same result.
    main(["train", "--epochs", "1", "--seed", "7", "--output", str(run), "train.progress=false",
          "data.val_fraction=0.5", "--resume"])
    out = capsys.readouterr().out
    assert f"resumed from {run / 'last.pth'}: epoch 1" in out
    assert f"digits_cvt_tiny: top-1 {summary['top1']:.2f}%" in out


def test_train_rejects_unknown_keys_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "train.epoch=3"])
    assert exit_.value.code == 2
    assert "unknown config key 'train.epoch': did you mean train.epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # `--resume KEY=VALUE` is an override, checked like any other
        main(["train", "--resume", "train.epoch=3"])
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err


def test_eval_reproduces_the_training_evaluation(run, capsys):
    summary = json.loads((run / "summary.json").read_text())
    main(["eval", "--checkpoint", str(run / "last.pth"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 899 and result["dataset"] == "digits" and result["img_size"] == 32
    assert result["top1"] == summary["top1"] and result["top5"] == summary["top5"]
    assert result["loss"] == pytest.approx(summary["loss"], rel=1e-6)
    main(["eval", "--checkpoint", str(run / "last.pth")])
    assert f"top-1 {summary['top1']:.2f}%" in capsys.readouterr().out


def test_eval_knows_a_training_checkpoint_by_its_content_not_its_name(run, tmp_path, capsys):
    summary = json.loads((run / "summary.json").read_text())
    renamed = tmp_path / "digits_model.pt"
    shutil.copyfile(run / "last.pth", renamed)
    main(["eval", "--checkpoint", str(renamed), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "digits" and result["top1"] == summary["top1"]


def test_eval_of_a_foreign_checkpoint_needs_data_and_matching_classes(tmp_path, capsys):
    path = tmp_path / "cvt13.pth"
    torch.save(cvt.create_model("cvt_13_224").state_dict(), path)
    with pytest.raises(SystemExit):
        main(["eval", "--model", "cvt_13_224", "--checkpoint", str(path)])
    assert "not written by `cvt train`: say which data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", "cvt_13_224", "--checkpoint", str(path), "--data", "digits", "--img-size", "32"])
    assert "digits has 10 classes but the model predicts 1000" in capsys.readouterr().err


def test_eval_of_a_foreign_checkpoint_with_its_data(tmp_path, capsys):
    path = tmp_path / "cvt13_digits.pth"
    torch.save(cvt.create_model("cvt_13_224", num_classes=10).state_dict(), path)
    main(["eval", "--model", "cvt_13_224", "--checkpoint", str(path), "--data", "digits", "--img-size", "32",
          "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 360 and 0 <= result["top1"] <= 100


def test_predict_uses_the_checkpoints_class_names(run, tmp_path, capsys):
    digit, label = Digits(train=False)[0]
    digit.resize((32, 32)).save(tmp_path / "digit.png")
    main(["predict", str(tmp_path / "digit.png"), "--checkpoint", str(run / "last.pth"), "--topk", "3", "--json"])
    [result] = json.loads(capsys.readouterr().out)
    probs = [p["probability"] for p in result["predictions"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert all(p["label"] == str(p["index"]) for p in result["predictions"])  # the digits' names: "0".."9"
    main(["predict", str(tmp_path / "digit.png"), "--checkpoint", str(run / "last.pth"), "--topk", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / "digit.png") and len(lines) == 3
    assert lines[1].endswith(f"%  {result['predictions'][0]['label']}")


def test_predict_names_imagenet_classes_for_a_1000_class_model(tmp_path, capsys):
    from timm.data import ImageNetInfo

    path = tmp_path / "cvt13.pth"
    torch.save(cvt.create_model("cvt_13_224").state_dict(), path)
    Image.new("RGB", (64, 48), (120, 30, 200)).save(tmp_path / "purple.jpg")
    main(["predict", str(tmp_path / "purple.jpg"), "--model", "cvt_13_224", "--checkpoint", str(path), "--json"])
    [result] = json.loads(capsys.readouterr().out)
    names = ImageNetInfo().label_descriptions()
    assert len(result["predictions"]) == 5
    assert all(p["label"] == names[p["index"]] for p in result["predictions"])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path / "notes.txt"), "--model", "cvt_13_224", "--checkpoint", str(path)])
    assert "cannot read" in capsys.readouterr().err


def one_error_line(capsys, argv: list[str]) -> str:
    """The error `cvt ARGV` ends with: exit code 2 and one `error:` line, the last on stderr, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "Traceback (most recent call last):" not in lines, lines
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], lines
    return lines[-1]


@pytest.mark.parametrize("make_argv, message", [
    (lambda tmp: ["train", "train.lr=abc"], "config key 'train.lr' takes a number, e.g. train.lr=0.002; got \"abc\""),
    (lambda tmp: ["train", "train.epochs=1.5"], "'train.epochs' takes an integer"),
    (lambda tmp: ["train", "train.batch_size=0"], "'train.batch_size' must be at least 1, got 0"),
    (lambda tmp: ["train", "train.epochs=[1"], "the override 'train.epochs=[1', line 1, column 3: not valid YAML"),
    (lambda tmp: ["train", "--config", str(write(tmp / "bad.yaml", "train:\n  epochs: [1,\n"))],
     "bad.yaml, line 3, column 1: not valid YAML"),
    (lambda tmp: ["train", "--output", str(write(tmp / "file", ""))], "is a file: give --output a folder"),
    (lambda tmp: ["train", "--device", "cuda:99", "--output", str(tmp)], "device cuda:99 asked for"),
    (lambda tmp: ["train", "--device", "gpu", "--output", str(tmp)], "unknown device 'gpu'"),
    (lambda tmp: ["attention", str(write(tmp / "empty.png", "")), "--model", "cvt_13_224", "--output",
                  str(tmp / "a.png")], "empty.png"),
])
def test_a_bad_input_is_one_line_naming_it(tmp_path, capsys, make_argv, message):
    assert message in one_error_line(capsys, make_argv(tmp_path))


def write(path, text: str):
    path.write_text(text)
    return path


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="'train.lr' takes a number"):
        main(["train", "train.lr=abc", "--debug"])


def test_overrides_may_stand_anywhere_among_the_options(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("cvt.engine.train", lambda config, output, overwrite: seen.update(config=config) or {})
    monkeypatch.setattr("cvt.cli.print", lambda *a, **k: None, raising=False)
    with pytest.raises(KeyError):  # the stand-in summary has no result to print
        main(["train", "train.epochs=1", "--seed", "3", "train.progress=false", "--output", str(tmp_path),
              "data.workers=1", "--debug"])
    config = seen["config"]
    assert (config["train"]["epochs"], config["seed"], config["train"]["progress"]) == (1, 3, False)
    assert config["data"]["workers"] == 1


def test_a_bad_image_in_eval_is_one_line_with_the_eval_flag(run, tmp_path, capsys):
    root = tmp_path / "images"
    for c in range(10):
        (root / "val" / str(c)).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "val" / str(c) / "ok.png")
    (root / "val" / "3" / "broken.png").write_bytes(b"not a png")
    err = one_error_line(capsys, ["eval", "--checkpoint", str(run / "last.pth"), "--data", "imagefolder",
                                  "--root", str(root), "--workers", "1"])
    assert "broken.png" in err and "--bad-images skip" in err
