"""Checkpoint formats, head re-initialisation, mismatch errors, save_pretrained and `cvt convert`; damaged files
and bad configs."""
import copy
import functools
import inspect
import json
import os
import random
import shutil
import warnings

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

import cvt
import cvt.hf
from cvt.cli import main
from cvt.engine import DEFAULTS, read_training_checkpoint
from cvt.model import load_state_dict, load_weights, model_from_checkpoint
from cvt.weights import (TRAINING_FORMAT, Checkpoint, UnreadableCheckpointError, _rename, load_checkpoint,
                         save_pretrained)
from helpers import TINY, randomize_batchnorm
X = torch.randn(2, 3, 48, 40)


def tiny(num_classes: int = 7, seed: int = 0, **kwargs) -> cvt.CvT:
    torch.manual_seed(seed)
    model = cvt.create_model("cvt_13_224", num_classes=num_classes, **dict(TINY, **kwargs)).eval()
    return randomize_batchnorm(model)  # non-trivial BatchNorm state, so a buffer that fails to load shows


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


@pytest.fixture(scope="module")
def source() -> cvt.CvT:
    return tiny()


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_pth_bare_wrapped_and_prefixed(tmp_path, source, wrapper, prefix):
    state_dict = {prefix + k: v for k, v in source.state_dict().items()}
    obj = {wrapper: state_dict, "epoch": 300, "best_perf": 0.816} if wrapper else state_dict
    torch.save(obj, tmp_path / "ckpt.pth")
    loaded = cvt.create_model("cvt_13_224", pretrained=tmp_path / "ckpt.pth", **TINY)
    assert loaded.num_classes == 7
    torch.testing.assert_close(outputs(loaded), outputs(source), atol=0, rtol=0)


@pytest.mark.parametrize("names", ["official", "hf"])
def test_safetensors_file_in_official_or_hf_names(tmp_path, source, names):
    state_dict = source.state_dict()
    if names == "hf":
        state_dict = _rename(state_dict, to_hf=True)
        assert "cvt.encoder.stages.2.cls_token" in state_dict
    save_file(state_dict, tmp_path / "w.safetensors")
    loaded = cvt.create_model("cvt_13_224", pretrained=tmp_path / "w.safetensors", **TINY)
    torch.testing.assert_close(outputs(loaded), outputs(source), atol=0, rtol=0)


def test_save_pretrained_round_trip(tmp_path, source):
    source.pretrained_cfg["label_names"] = [f"class {i}" for i in range(7)]
    source.save_pretrained(tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == "cvt_13_224" and config["model_args"]["embed_dims"] == [16, 32, 48]
    # the saved config dictates the architecture: no overrides needed to read it back
    loaded = cvt.create_model("cvt_13_224", pretrained=tmp_path / "run")
    torch.testing.assert_close(outputs(loaded), outputs(source), atol=0, rtol=0)
    assert loaded.pretrained_cfg["label_names"][6] == "class 6"
    assert loaded.pretrained_cfg["num_classes"] == 7
    torch.testing.assert_close(outputs(model_from_checkpoint(tmp_path / "run")), outputs(source), atol=0, rtol=0)


@pytest.mark.parametrize("zoo_name", [True, False])
def test_save_pretrained_folder_is_read_by_timms_local_dir_loader(tmp_path, source, zoo_name):
    # a model built with cvt.CvT has no zoo name: its model_args alone describe it
    model = source if zoo_name else randomize_batchnorm(cvt.CvT(num_classes=5, **TINY)).eval()
    model.save_pretrained(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["architecture"] == "cvt_13_224" and config["num_classes"] == model.num_classes
    loaded = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True)
    assert type(loaded) is cvt.CvT and loaded.pretrained_cfg["source"] == "local-dir"
    torch.testing.assert_close(outputs(loaded), outputs(model), atol=0, rtol=0)
    assert timm.create_model(f"local-dir:{tmp_path / 'run'}").config == model.config  # random weights, same model
    torch.testing.assert_close(outputs(cvt.create_model("cvt_13_224", pretrained=tmp_path / "run")), outputs(model),
                               atol=0, rtol=0)


def test_save_pretrained_folder_of_the_first_format_still_loads(tmp_path, source):
    # before timm could read them: no "architecture" nor "num_classes", and any pretrained_cfg keys
    source.save_pretrained(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    first_format = {k: config[k] for k in ("format", "model", "model_args")}
    first_format["pretrained_cfg"] = dict(config["pretrained_cfg"], paper_top1=81.6, hf_hub_id="microsoft/cvt-13")
    (tmp_path / "run" / "config.json").write_text(json.dumps(first_format))
    loaded = cvt.create_model("cvt_13_224", pretrained=tmp_path / "run")
    torch.testing.assert_close(outputs(loaded), outputs(source), atol=0, rtol=0)
    assert loaded.pretrained_cfg["num_classes"] == 7


def test_saved_model_name_must_match(tmp_path, source):
    source.save_pretrained(tmp_path / "run")
    with pytest.raises(ValueError, match=r"holds cvt_13_224 weights, not cvt_21_384: call "
                                         r"cvt.create_model\('cvt_13_224'"):
        cvt.create_model("cvt_21_384", pretrained=tmp_path / "run")


def test_hf_config_of_another_zoo_model_names_the_right_call():
    arch = dict(embed_dims=[64, 192, 384], depths=[1, 4, 16], num_heads=[1, 3, 6])
    checkpoint = Checkpoint({}, "hf-dir", "hf", arch)
    with pytest.raises(ValueError, match="holds cvt_21_224 / cvt_21_384 weights, not cvt_13_224"):
        model_from_checkpoint(checkpoint, "cvt_13_224")


def test_load_weights_into_a_model_built_directly(tmp_path, source):
    source.save_pretrained(tmp_path / "run")
    model = cvt.CvT(num_classes=7, **TINY)
    assert load_weights(model, tmp_path / "run" / "model.safetensors") is model
    torch.testing.assert_close(outputs(model), outputs(source), atol=0, rtol=0)


def test_other_num_classes_reinitialises_the_head_and_says_so(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "ckpt.pth")
    with pytest.warns(UserWarning, match="has a 7-class head, the model 3 classes: its head is freshly initialised"):
        model = cvt.create_model("cvt_13_224", pretrained=tmp_path / "ckpt.pth", num_classes=3, **TINY)
    assert model.head.weight.shape == (3, 48)
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(model.state_dict()[key], value), key
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # leaving the head out (a backbone) is no surprise: no warning
        features = cvt.create_model("cvt_13_224", pretrained=tmp_path / "ckpt.pth", features_only=True, **TINY)
    with torch.no_grad():
        maps = source.forward_intermediates(X, intermediates_only=True)
        torch.testing.assert_close(features.eval()(X)[2], maps[2], atol=0, rtol=0)


def test_mismatch_lists_missing_unexpected_and_wrongly_shaped_keys(source):
    state_dict = dict(source.state_dict())
    del state_dict["stage2.blocks.1.mlp.fc2.bias"]
    state_dict["stage2.blocks.1.extra.weight"] = torch.zeros(3)
    state_dict["stage1.patch_embed.proj.weight"] = torch.zeros(32, 16, 5, 5)
    with pytest.raises(ValueError) as e:
        load_state_dict(tiny(), state_dict, "ckpt.pth")
    message = str(e.value)
    assert "1 missing keys: stage2.blocks.1.mlp.fc2.bias" in message
    assert "1 unexpected keys: stage2.blocks.1.extra.weight" in message
    assert ("1 wrongly-shaped keys: stage1.patch_embed.proj.weight (32, 16, 5, 5) in the checkpoint, "
            "(32, 16, 3, 3) in the model") in message


def test_checkpoint_of_another_cvt_says_which_it_looks_like():
    with torch.device("meta"):  # shapes are all the check reads
        cvt_13 = cvt.create_model("cvt_13_224").state_dict()
        cvt_21 = cvt.create_model("cvt_21_224")
    with pytest.raises(ValueError, match=r"(?s)248 missing keys: stage1.blocks.2.*looks like cvt_13_224 / "
                                         r"cvt_13_384 \(embed_dims \[64, 192, 384\], depths \[1, 2, 10\]\)"):
        load_state_dict(cvt_21, cvt_13, "CvT-13-224x224-IN-1k.pth")


def test_checkpoint_of_another_architecture(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not a CvT checkpoint: it has no stage0.patch_embed.proj.weight "
                                         r"\(its first keys: conv1.weight"):
        cvt.create_model("cvt_13_224", pretrained=tmp_path / "resnet.pth", **TINY)
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(ValueError, match="model_type 'vit'.*another architecture"):
        cvt.create_model("cvt_13_224", pretrained=tmp_path / "vit")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere.pth: pass the path"):
        cvt.create_model("cvt_13_224", pretrained=tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        cvt.create_model("cvt_13_224", pretrained=tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        cvt.create_model("cvt_13_224", pretrained=tmp_path / "junk.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds list, not a state dict"):
        cvt.create_model("cvt_13_224", pretrained=tmp_path / "list.pth")


class Payload:
    """A pickle that would run code when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_load_with_weights_only(tmp_path, source):
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": source.state_dict(), "extra": Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True refuses"):
        cvt.create_model("cvt_13_224", pretrained=tmp_path / "evil.pth", **TINY)
    assert not marker.exists()


def test_bare_state_dict_without_a_name_is_a_clear_error(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="does not say which model it is: name it"):
        model_from_checkpoint(tmp_path / "ckpt.pth")


def test_save_pretrained_is_atomic(tmp_path, source):
    source.pretrained_cfg["label_names"] = [object()]  # not JSON: writing the config fails
    with pytest.raises(TypeError):
        save_pretrained(source, tmp_path / "run")
    assert os.listdir(tmp_path) == []  # neither the directory nor a temporary one left behind
    del source.pretrained_cfg["label_names"]
    # an existing directory keeps what is not ours (a training run's log)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text("epoch 1")
    save_pretrained(source, tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["config.json", "log.txt", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_timm_create_model_with_a_local_file(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "ckpt.pth")
    overlay = dict(file=str(tmp_path / "ckpt.pth"))
    model = timm.create_model("cvt_13_224", pretrained=True, pretrained_cfg_overlay=overlay, **TINY)
    torch.testing.assert_close(outputs(model), outputs(source), atol=0, rtol=0)


def test_cli_convert_official_to_ours_safetensors_and_hf(tmp_path, source, capsys):
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pth")
    tiny_set = ["--set", "embed_dims=[16,32,48]", "depths=[1,1,2]", "num_heads=[1,2,3]"]
    main(["convert", str(tmp_path / "ckpt.pth"), "--model", "cvt_13_224", "--output", str(tmp_path / "ours"),
          *tiny_set])
    assert "wrote" in capsys.readouterr().out
    torch.testing.assert_close(outputs(cvt.create_model("cvt_13_224", pretrained=tmp_path / "ours")),
                               outputs(source), atol=0, rtol=0)
    main(["convert", str(tmp_path / "ours"), "--output", str(tmp_path / "w.safetensors")])
    loaded = cvt.create_model("cvt_13_224", pretrained=tmp_path / "w.safetensors", **TINY)
    torch.testing.assert_close(outputs(loaded), outputs(source), atol=0, rtol=0)
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "x"), *tiny_set])
    assert "does not say which model it is" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "ours"), "--from", "hf", "--output", str(tmp_path / "y")])
    assert "is a 'cvt' checkpoint, not 'hf'" in capsys.readouterr().err


def test_cli_convert_to_hf_and_back(tmp_path):
    from transformers import CvtForImageClassification

    model = tiny(num_classes=4, depths=(1, 2, 3), act_layer="gelu")  # HF needs depths[i] > i
    model.save_pretrained(tmp_path / "ours")
    main(["convert", str(tmp_path / "ours"), "--to", "hf", "--output", str(tmp_path / "hf")])
    hf_model = CvtForImageClassification.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(X).logits, outputs(model), atol=1e-5, rtol=0)
    main(["convert", str(tmp_path / "hf"), "--from", "hf", "--output", str(tmp_path / "back"),
          "--set", "act_layer=gelu"])
    back = model_from_checkpoint(tmp_path / "back")
    torch.testing.assert_close(outputs(back), outputs(model), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Untrusted files: every damaged weights file and every bad config gives one clear error naming the file

def training_checkpoint(model: cvt.CvT) -> dict:
    """What `cvt train` writes (engine.TrainingState.state_dict), less the optimisation state."""
    return {"format": TRAINING_FORMAT, "model": model.state_dict(), "model_name": "cvt_13_224",
            "model_args": {k: v for k, v in model.config.items() if k != "num_classes"},
            "pretrained_cfg": {"label_names": ["a", "b", "c"]}, "epoch": 1, "step": 10, "config": DEFAULTS}


def write_hf_directory(model: cvt.CvT, directory) -> None:
    """A Hugging Face CvT directory as transformers writes it: its config's names, pytorch_model.bin and the image
    processor's config."""
    directory.mkdir()
    config = {"model_type": "cvt", "embed_dim": model.config["embed_dims"], "depth": model.config["depths"],
              "num_heads": model.config["num_heads"], "id2label": {"0": "a", "1": "b", "2": "c"}}
    (directory / "config.json").write_text(json.dumps(config))
    processor = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224}, "crop_pct": 0.875}
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    torch.save(_rename(model.state_dict(), to_hf=True), directory / "pytorch_model.bin")


@pytest.fixture(scope="module")
def three_classes() -> cvt.CvT:
    return tiny(num_classes=3)


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory, three_classes):
    """One valid file of every format the readers take."""
    root = tmp_path_factory.mktemp("valid")
    model = three_classes
    torch.save({"state_dict": model.state_dict(), "epoch": 300}, root / "official.pth")  # the official release's
    torch.save(model.state_dict(), root / "bare.pth")
    torch.save(training_checkpoint(model), root / "last.pth")
    save_file(model.state_dict(), root / "w.safetensors")
    write_hf_directory(model, root / "hf")
    model.save_pretrained(root / "ours")  # also what timm's local-dir loader reads
    return root


# (what a reader is given, the file in it that is damaged)
DAMAGED_FILES = [("official.pth", None), ("bare.pth", None), ("last.pth", None), ("w.safetensors", None),
                 ("hf", "config.json"), ("hf", "pytorch_model.bin"), ("hf", "preprocessor_config.json"),
                 ("ours", "config.json"), ("ours", "model.safetensors")]
TRUNCATIONS = 5  # the first damages cut the file short, the others are random bytes


def damages(data: bytes) -> list[bytes]:
    rng = random.Random(len(data))  # a fixed seed per file
    cut = [0, 1, rng.randrange(2, len(data) // 2), rng.randrange(len(data) // 2, len(data) - 1), len(data) - 1]
    noise = [rng.randbytes(len(data)), rng.randbytes(100)]
    return [data[:n] for n in cut] + noise


READERS = {
    "create_model": lambda p: cvt.create_model("cvt_13_224", pretrained=p, **TINY),
    "load_checkpoint": load_checkpoint,
    # the model built once, on the meta device: no file reaches the loading
    "load_weights": functools.partial(load_weights, cvt.CvT(num_classes=3, device="meta", **TINY)),
    "from_hf": cvt.hf.from_hf,
    "model_from_checkpoint": model_from_checkpoint,
    "read_training_checkpoint": read_training_checkpoint,
}


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("damage", range(TRUNCATIONS + 2))
@pytest.mark.parametrize("given, member", DAMAGED_FILES)
def test_every_weights_reader_calls_a_damaged_file_by_its_name(valid_files, tmp_path, given, member, damage):
    duplicate = shutil.copytree if (valid_files / given).is_dir() else shutil.copyfile
    duplicate(valid_files / given, tmp_path / given)
    bad = tmp_path / given / member if member else tmp_path / given
    bad.write_bytes(damages(bad.read_bytes())[damage])
    before = files_under(tmp_path)
    for name, read in READERS.items():
        if name == "read_training_checkpoint" and (member or bad.suffix == ".safetensors"):
            continue  # a directory or a safetensors file is no training checkpoint: None, as for other weights
        with pytest.raises(UnreadableCheckpointError) as e:
            read(tmp_path / given)
        message = str(e.value)
        assert str(bad) in message and "\n" not in message, (name, message)
        for wrong in ("PytorchStreamReader", "Weights only load failed", "weights_only=False", "pickled Python objects",
                      "not written by"):
            assert wrong not in message, (name, message)
        if damage < TRUNCATIONS and bad.suffix in (".pth", ".bin"):
            assert "truncated or corrupt" in message, (name, message)
        assert files_under(tmp_path) == before, name  # the readers write nothing, not even temporary files


DELETE = object()  # a change that removes the key


def changed(config: dict, changes: dict) -> dict:
    """`config` with dotted keys set (or removed, DELETE)."""
    config = copy.deepcopy(config)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        if value is DELETE:
            del section[key]
        else:
            section[key] = value
    return config


def write_bad_config(model: cvt.CvT, kind: str, change: dict | bytes, folder):
    """A checkpoint of `model` in `kind`'s format whose config has `change` (a dict of dotted keys, or the config
    file's whole text); returns what the reader is given and the file that must be named."""
    if kind == "train":
        path = folder / "last.pth"
        torch.save(changed(training_checkpoint(model), change), path)
        return path, path
    directory = folder / "model"
    if kind == "hf":
        write_hf_directory(model, directory)
    else:
        model.save_pretrained(directory)
    config_path = directory / "config.json"
    if isinstance(change, bytes):
        config_path.write_bytes(change)
    else:
        config_path.write_text(json.dumps(changed(json.loads(config_path.read_text()), change)))
    return directory, config_path


BAD_CONFIGS = [
    # (checkpoint kind: "ours" (save_pretrained), "hf", "train" (cvt train) or "timm" (our folder through timm's
    # local-dir loader), the change, what the error says)
    ("ours", {"model_args.depths": [1, -1, 2]}, r"depths takes whole numbers from 1 to 256 .*got \[1, -1, 2\]"),
    ("ours", {"model_args.depths": [1, 1, 10**6]}, "depths takes whole numbers from 1 to 256"),
    ("ours", {"model_args.embed_dims": [16, 32, 10**9]}, "embed_dims takes whole numbers from 1 to 8192"),
    ("ours", {"model_args.embed_dims": 1e9}, "embed_dims takes whole numbers"),
    ("ours", {"model_args.num_heads": [1, 2, 0]}, "num_heads takes whole numbers from 1"),
    ("ours", {"model_args.num_heads": [1, 2, 5]}, r"embed_dims \[16, 32, 48\] are not divisible by num_heads"),
    ("ours", {"model_args.depths": "deep"}, "depths takes whole numbers"),
    ("ours", {"model_args.img_size": 10**5}, "img_size takes whole numbers from 1 to 4096"),
    ("ours", {"model_args.kernel_qkv": 1001}, "kernel_qkv takes whole numbers from 1 to 32"),
    ("ours", {"model_args.stride_kv": [2, 2]}, "stride_kv needs one value per stage"),
    ("ours", {"model_args.colour": "red"}, r"unknown CvT arguments \['colour'\]"),
    ("ours", {"model_args": DELETE}, "model_args is NoneType, not a mapping"),
    ("ours", {"model_args": [16, 32, 48]}, "model_args is list, not a mapping"),
    ("ours", {"model_args.depths": [1, 1, 3]}, r"depths \[1, 1, 3\] are not those of its weights"),
    ("ours", {"model": "cvt_99"}, "model 'cvt_99' is none of the zoo's"),
    ("ours", {"pretrained_cfg.label_names": 7}, "label_names are not a list of names"),
    ("ours", b"[1, 2]", "holds a JSON list, not an object"),
    ("ours", b'{"format": "cvt-pytorch", "model_args": {', "is not valid JSON"),
    ("ours", b"\xff\xfe\x00garbage", "is not valid JSON"),
    ("hf", {"depth": [1, -1, 2]}, "depths takes whole numbers from 1 to 256"),
    ("hf", {"embed_dim": [16, 32, 10**9]}, "embed_dims takes whole numbers from 1 to 8192"),
    ("hf", {"num_heads": [1, 2, 0]}, "num_heads takes whole numbers from 1"),
    ("hf", {"id2label": {"cat": "0"}}, "id2label is not a mapping of class numbers to names"),
    ("train", {"model_args.depths": [1, 1, 10**6]}, "depths takes whole numbers from 1 to 256"),
    ("train", {"model_args": DELETE}, r"without \['model_args'\]"),
    ("timm", {"model_args.depths": [1, -1, 2]}, "depths takes whole numbers from 1 to 256"),
    ("timm", {"model_args.embed_dims": [16, 32, 10**9]}, "embed_dims takes whole numbers from 1 to 8192"),
]


@pytest.mark.parametrize("kind, change, says", BAD_CONFIGS)
def test_a_bad_config_is_refused_naming_it_before_a_model_is_built(three_classes, tmp_path, monkeypatch, kind, change,
                                                                  says):
    given, named = write_bad_config(three_classes, "ours" if kind == "timm" else kind, change, tmp_path)

    def build_stage(*args, **kwargs):
        raise AssertionError("a stage was built from a config that is refused")

    monkeypatch.setattr(cvt.model.Stage, "__init__", build_stage)
    if kind == "timm":  # timm reads the file, then CvT's own checks refuse its arguments
        with pytest.raises(ValueError, match=says):
            timm.create_model(f"local-dir:{given}", pretrained=True)
        return
    for read in (load_checkpoint, model_from_checkpoint, lambda p: cvt.create_model("cvt_13_224", pretrained=p)):
        with pytest.raises(UnreadableCheckpointError, match=says) as e:
            read(given)
        assert str(e.value).startswith(str(named)) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, says", [
    (dict(depths=(1, -1, 2)), r"depths takes whole numbers from 1 to 256 .*got \[1, -1, 2\]"),
    (dict(depths=(1, 1, 10**6)), "depths takes whole numbers from 1 to 256"),
    (dict(embed_dims=(16, 32, 10**9)), "embed_dims takes whole numbers from 1 to 8192"),
    (dict(num_heads=(1, 2, 0)), "num_heads takes whole numbers from 1"),
    (dict(num_classes=-1), "num_classes takes whole numbers from 0"),
    (dict(patch_sizes=(7, 3, 301)), "patch_sizes takes whole numbers from 1 to 32"),
    (dict(mlp_ratio=1e6), "mlp_ratio takes numbers from 0 to 16"),
    (dict(drop_path_rate=1.5), "drop_path_rate takes numbers from 0 to 1"),
    (dict(cls_token="yes"), "cls_token takes true or false"),
    (dict(global_pool="max"), "global_pool takes one of None, 'token', 'avg'"),
    (dict(global_pool="token", cls_token=False), "global_pool 'token' needs a class token"),
    (dict(img_size=2), "img_size 2 leaves the last stage no tokens: .* at least 3x3"),
])
def test_cvt_arguments_are_checked_before_anything_is_built(monkeypatch, args, says):
    monkeypatch.setattr(cvt.model.Stage, "__init__", lambda *a, **k: pytest.fail("a stage was built"))
    with pytest.raises(ValueError, match=says):
        cvt.CvT(**dict(TINY, **args))


def test_a_geometry_needing_a_large_input_still_builds():
    model = cvt.CvT(**dict(TINY, patch_strides=16, patch_sizes=16, patch_paddings=0, img_size=4096), device="meta")
    assert model.min_input_size == 16 ** 3


def test_cli_calls_a_truncated_training_checkpoint_truncated_in_eval_and_on_resume(valid_files, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    last = tmp_path / "run" / "last.pth"
    last.write_bytes((valid_files / "last.pth").read_bytes()[:2000])
    for argv in (["eval", "--checkpoint", str(last)], ["train", "--output", str(last.parent), "--resume"]):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert f"{last} is truncated or corrupt" in err and len(err.strip().splitlines()) == 1, err
        assert sorted(os.listdir(last.parent)) == ["last.pth"]


def test_every_cvt_argument_has_a_rule():
    assert set(cvt.model.ARG_RULES) == set(inspect.signature(cvt.CvT).parameters)
