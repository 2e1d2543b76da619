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
