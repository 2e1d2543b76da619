"""Every weights format in every command that takes weights, with the preprocessing the weights carry.

A run trained at `data.img_size` 48 on a model whose native size is 32 (so the two differ), its checkpoint, the
folders `cvt convert` makes of it (ours and Hugging Face's), and a folder transformers' `save_pretrained` wrote:
`cvt predict`, `eval`, `export`, `attention` and `convert` each take every one, and predict and eval prepare
images at the size the weights were trained or evaluated at.
"""
import json

import pytest
import timm.data
import torch
from PIL import Image

import cvt
import cvt.predict
from cvt.cli import main
from cvt.model import load_model

LABELS = ["cat", "dog"]
# A tiny CvT that transformers' CvT can hold too (it needs depths[i] > i).
ARGS = ["model.args.embed_dims=[16,32,48]", "model.args.depths=[1,2,3]", "model.args.num_heads=[1,2,3]"]
NATIVE, TRAINED = 32, 48


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An image folder of two classes, two images each in train/ and val/, and one odd-sized image to classify."""
    root = tmp_path_factory.mktemp("images")
    for split in ("train", "val"):
        for c, name in enumerate(LABELS):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (200 * (1 - c), 60 * i, 200 * c)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def weights(images, tmp_path_factory):
    """Each format -> (its path, the input size it should be run at)."""
    from transformers import CvtConfig, CvtForImageClassification

    root = tmp_path_factory.mktemp("weights")
    main(["train", "--output", str(root / "run"), "data.dataset=imagefolder", f"data.root={images}",
          f"data.img_size={TRAINED}", f"model.args.img_size={NATIVE}", *ARGS, "train.epochs=1", "train.batch_size=2",
          "train.warmup_epochs=0", "train.keep_epoch_checkpoints=0", "train.progress=false"])
    main(["convert", str(root / "run" / "last.pth"), "--output", str(root / "cvt")])
    main(["convert", str(root / "run" / "last.pth"), "--to", "hf", "--output", str(root / "hf_converted")])
    torch.manual_seed(0)
    hf = CvtForImageClassification(CvtConfig(embed_dim=[16, 32, 48], depth=[1, 2, 3], num_heads=[1, 2, 3],
                                             id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in
                                                                                          enumerate(LABELS)}))
    hf.save_pretrained(root / "hf")  # the model alone, no image processor: CvT's native 224
    return {"train": (root / "run" / "last.pth", TRAINED), "cvt": (root / "cvt", TRAINED),
            "hf_converted": (root / "hf_converted", TRAINED), "hf": (root / "hf", 224)}


FORMATS = ["train", "cvt", "hf_converted", "hf"]


@pytest.fixture
def input_sizes(monkeypatch):
    """The (H, W) of every batch `cvt predict` runs."""
    seen, optimize = [], cvt.predict.optimize_for_inference

    def spy(model, **options):
        fast = optimize(model, **options)
        fast.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[-2:])))
        return fast

    monkeypatch.setattr(cvt.predict, "optimize_for_inference", spy)
    return seen


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_takes_every_format_at_its_trained_size(fmt, weights, images, input_sizes, capsys):
    path, size = weights[fmt]
    main(["predict", str(images / "val" / "cat" / "0.png"), "--checkpoint", str(path), "--topk", "2", "--json"])
    (result,) = json.loads(capsys.readouterr().out)
    assert sorted(p["label"] for p in result["predictions"]) == LABELS
    assert input_sizes == [(size, size)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_eval_takes_every_format_at_its_trained_size(fmt, weights, images, capsys):
    path, size = weights[fmt]
    main(["eval", "--checkpoint", str(path), "--data", "imagefolder", "--root", str(images), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 4 and result["img_size"] == size


def test_export_and_attention_take_a_hugging_face_folder(weights, images, tmp_path, capsys):
    """They load weights as predict and eval do (`cvt.model.load_model`), so one folder shows the way works."""
    path, _ = weights["hf_converted"]
    main(["export", "--checkpoint", str(path), "--format", "torchscript", "--output", str(tmp_path / "m.pt")])
    main(["attention", str(images / "val" / "cat" / "0.png"), "--model", "cvt_13_224", "--checkpoint", str(path),
          "--output", str(tmp_path / "attention.png")])
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'm.pt'}" in printed and f"wrote {tmp_path / 'attention.png'}" in printed


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_takes_every_format_and_keeps_labels_and_size(fmt, weights, tmp_path):
    path, size = weights[fmt]
    main(["convert", str(path), "--output", str(tmp_path / "again")])
    again = load_model(tmp_path / "again")
    assert again.pretrained_cfg["label_names"] == LABELS
    assert timm.data.resolve_model_data_config(again)["input_size"] == (3, size, size)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_data_config_travels_with_the_weights(fmt, weights):
    """timm's resolver reads the size the weights were trained at (not the model's native 32) off every format,
    whether loaded by name or by path."""
    path, size = weights[fmt]
    for model in (load_model(path), cvt.create_model("cvt_13_224", pretrained=path)):
        cfg = timm.data.resolve_model_data_config(model)
        assert cfg["input_size"] == (3, size, size), fmt
        assert model.pretrained_cfg["label_names"] == LABELS


def test_a_run_records_its_training_size_and_eval_crop(weights):
    saved = torch.load(weights["train"][0], map_location="cpu", weights_only=True)
    assert tuple(saved["pretrained_cfg"]["input_size"]) == (3, TRAINED, TRAINED)
    assert saved["model_args"]["img_size"] == NATIVE
    assert (saved["pretrained_cfg"]["crop_pct"], saved["pretrained_cfg"]["crop_mode"]) == (1.0, "squash")


def test_topk_beyond_the_classes_says_so_once(weights, images, capsys):
    main(["predict", str(images / "val" / "dog" / "0.png"), "--checkpoint", str(weights["train"][0])])
    captured = capsys.readouterr()
    assert captured.err.strip() == "note: --topk 5, but the model has 2 classes: showing 2"
    assert len([line for line in captured.out.splitlines() if "%" in line]) == 2


@pytest.mark.parametrize("topk", ["0", "-3"])
def test_topk_below_one_is_an_error(topk, weights, images, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(images / "val" / "dog" / "0.png"), "--checkpoint", str(weights["train"][0]),
              "--topk", topk])
    assert exit_.value.code == 2
    assert "topk (--topk) must be a whole number of at least 1" in capsys.readouterr().err


def test_no_weights_and_no_model_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--format", "torchscript", "--output", "never.pt"])
    assert "no weights and no model" in capsys.readouterr().err
