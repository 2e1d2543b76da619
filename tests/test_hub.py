"""The released weights from the Hugging Face Hub, offline: every entry point (cvt.create_model, timm.create_model,
torch.hub, the cvt command) reads a Hub cache filled with random CvT-13 weights that transformers saved.

huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported, so the library's entry points and
`cvt predict` run in fresh interpreters with those set, as a user runs them; `cvt eval` and `cvt convert`, whose
downloads are the CLI's own, run here with huggingface_hub.constants patched (each interpreter costs seconds).
Comparisons that need no Hub (transformers' outputs, our model read from the snapshot folder by path) run here."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import cvt
from cvt.cli import main
from cvt.model import ZOO
from cvt.predict import predict
from cvt.weights import official_names
from helpers import randomize_batchnorm

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"  # a revision of SAFETENSORS_REPO that main no longer names
SAFETENSORS_REPO, SAFETENSORS_TAG = "microsoft/cvt-13", "cvt_13_224.ms_in1k"
# cvt_13_384.ms_in22k_ft_in1k's repo, here holding pytorch_model.bin only, as the older uploads do
BIN_REPO = "microsoft/cvt-13-384-22k"
TIMEOUT_S = 300

# Every library entry point in one interpreter: the logits of the input in sys.argv[1] and what the tests compare,
# written to sys.argv[3]/outputs.safetensors; sys.argv[3]/offline-error.txt: the error for a repo not in the cache.
# sys.argv[2]: the repository root; sys.argv[4]: an older commit of microsoft/cvt-13.
ENTRY_POINTS = """
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

import cvt

x = load_file(sys.argv[1])["x"]
out = {}
with torch.no_grad():
    def logits(key, model, image=x):
        out[key] = model.eval()(image)

    logits("cvt.create_model(name)", cvt.create_model("cvt_13_224", pretrained=True))
    logits("cvt.create_model(name.tag)", cvt.create_model("cvt_13_224.ms_in1k", pretrained=True))
    logits("timm.create_model(name.tag)", timm.create_model("cvt_13_224.ms_in1k", pretrained=True))
    logits("torch.hub.load", torch.hub.load(sys.argv[2], "cvt_13_224", source="local", pretrained=True))
    logits("timm.create_model(name, revision)", timm.create_model(
        "cvt_13_224", pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=f"microsoft/cvt-13@{sys.argv[4]}")))
    logits("bin-only tag", cvt.create_model("cvt_13_384.ms_in22k_ft_in1k", pretrained=True))
    logits("gelu microsoft/cvt-13", cvt.create_model("cvt_13_224.ms_in1k", pretrained=True, act_layer="gelu"))
    logits("gelu microsoft/cvt-13-384-22k",
           cvt.create_model("cvt_13_384.ms_in22k_ft_in1k", pretrained=True, act_layer="gelu"))
    pretrained = cvt.create_model("cvt_13_224", pretrained=True).eval()
    gray = x.mean(dim=1, keepdim=True)
    logits("in_chans=1, gray", cvt.create_model("cvt_13_224", pretrained=True, in_chans=1), gray)
    logits("in_chans=3, gray as RGB", pretrained, gray.expand(-1, 3, -1, -1))
    features = cvt.create_model("cvt_13_224", pretrained=True, features_only=True).eval()
    for i, (a, b) in enumerate(zip(features(x), pretrained.forward_intermediates(x, intermediates_only=True))):
        out[f"features_only {i}"], out[f"forward_intermediates {i}"] = a, b
    ten_classes = cvt.create_model("cvt_13_224", pretrained=True, num_classes=10)
    out.update({f"num_classes=10 {k}": v for k, v in ten_classes.state_dict().items()})
save_file({k: v.contiguous() for k, v in out.items()}, Path(sys.argv[3]) / "outputs.safetensors")
try:
    cvt.create_model("cvt_21_224", pretrained=True, device="meta")  # microsoft/cvt-21: not in the cache
except FileNotFoundError as e:
    (Path(sys.argv[3]) / "offline-error.txt").write_text(str(e))
"""


def write_hub_repo(cache: Path, repo_id: str, seed: int, weights: str, commit: str = COMMIT) -> Path:
    """A CvT-13 repo in the Hub cache's layout (refs/main names the newest commit, snapshots/<commit>/ holds the
    files), with random weights and BatchNorm statistics saved by transformers; `weights` the file the repo holds.
    A `commit` other than COMMIT adds an older revision beside main."""
    from transformers import CvtConfig, CvtForImageClassification

    torch.manual_seed(seed)
    model = randomize_batchnorm(CvtForImageClassification(CvtConfig(num_labels=1000)))
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    model.save_pretrained(snapshot)
    if weights == "pytorch_model.bin":  # transformers 5 writes safetensors only
        torch.save(load_file(snapshot / "model.safetensors"), snapshot / weights)
        (snapshot / "model.safetensors").unlink()
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    """The Hub cache and its two repos' snapshot folders."""
    cache = tmp_path_factory.mktemp("hub-cache")
    return {"cache": cache,
            SAFETENSORS_REPO: write_hub_repo(cache, SAFETENSORS_REPO, 0, "model.safetensors"),
            BIN_REPO: write_hub_repo(cache, BIN_REPO, 1, "pytorch_model.bin"),
            OLD_COMMIT: write_hub_repo(cache, SAFETENSORS_REPO, 2, "model.safetensors", OLD_COMMIT)}


def run_offline(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`args` run with the Hub offline and this cache; `cwd` keeps a repo id from naming a local path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)


def go_offline(monkeypatch, cache: Path) -> None:
    """This process's huggingface_hub offline, with this cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def entry_points_run(hub, x, tmp_path_factory) -> Path:
    """The folder ENTRY_POINTS wrote its results to."""
    folder = tmp_path_factory.mktemp("entry-points")
    save_file({"x": x}, folder / "x.safetensors")
    done = run_offline([sys.executable, "-c", ENTRY_POINTS, str(folder / "x.safetensors"), str(REPO_ROOT),
                        str(folder), OLD_COMMIT], hub["cache"], folder)
    assert done.returncode == 0, done.stderr
    return folder


@pytest.fixture(scope="module")
def entry_points(entry_points_run) -> dict[str, torch.Tensor]:
    return load_file(entry_points_run / "outputs.safetensors")


def local_logits(folder: Path, x: torch.Tensor, name: str = "cvt_13_224") -> torch.Tensor:
    """Our model read from a folder by path (no Hub involved)."""
    with torch.no_grad():
        return cvt.create_model(name, pretrained=folder).eval()(x)


@pytest.mark.parametrize("entry_point", ["cvt.create_model(name)", "cvt.create_model(name.tag)",
                                         "timm.create_model(name.tag)", "torch.hub.load"])
def test_every_entry_point_loads_the_hub_weights_with_the_official_numerics(hub, x, entry_points, entry_point):
    # the default numerics (QuickGELU): what our model computes from the same files read by path
    expected = local_logits(hub[SAFETENSORS_REPO], x)
    torch.testing.assert_close(entry_points[entry_point], expected, atol=1e-5, rtol=0)


def test_a_repo_with_only_pytorch_model_bin_loads(hub, x, entry_points):
    expected = local_logits(hub[BIN_REPO], x, "cvt_13_384")
    torch.testing.assert_close(entry_points["bin-only tag"], expected, atol=1e-5, rtol=0)
    # the two repos hold different weights: each tag read its own repo
    assert not torch.allclose(entry_points["bin-only tag"], entry_points["cvt.create_model(name.tag)"])


def test_a_revision_loads_that_commit_not_main(hub, x, entry_points):
    revision = entry_points["timm.create_model(name, revision)"]
    torch.testing.assert_close(revision, local_logits(hub[OLD_COMMIT], x), atol=1e-5, rtol=0)
    assert not torch.allclose(revision, entry_points["cvt.create_model(name)"])


@pytest.mark.parametrize("repo", [SAFETENSORS_REPO, BIN_REPO])
def test_with_exact_gelu_the_logits_are_transformers(hub, x, entry_points, repo):
    from transformers import CvtForImageClassification

    hf_model = CvtForImageClassification.from_pretrained(hub[repo], local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(entry_points[f"gelu {repo}"], hf_model(x).logits, atol=1e-4, rtol=0)


def test_in_chans_1_sums_the_rgb_stem(entry_points):
    # conv(gray, sum over RGB of W) == conv(gray repeated as RGB, W): the same logits
    torch.testing.assert_close(entry_points["in_chans=1, gray"], entry_points["in_chans=3, gray as RGB"],
                               atol=1e-4, rtol=0)
    assert entry_points["in_chans=1, gray"].shape == (1, 1000)


def test_features_only_gives_the_pretrained_stage_maps(entry_points):
    shapes = []
    for i in range(3):
        torch.testing.assert_close(entry_points[f"features_only {i}"], entry_points[f"forward_intermediates {i}"],
                                   atol=0, rtol=0)
        shapes.append(tuple(entry_points[f"features_only {i}"].shape))
    assert shapes == [(1, 64, 16, 16), (1, 192, 8, 8), (1, 384, 4, 4)]  # strides 4, 8, 16 of a 64x64 input


def test_num_classes_10_reinitialises_the_head_and_loads_the_rest(hub, entry_points):
    loaded = {k.removeprefix("num_classes=10 "): v for k, v in entry_points.items() if k.startswith("num_classes=10 ")}
    released = official_names(load_file(hub[SAFETENSORS_REPO] / "model.safetensors"))
    assert loaded["head.weight"].shape == (10, 384)
    assert torch.equal(loaded["head.bias"], torch.zeros(10))  # freshly initialised: zero bias, small weights
    assert loaded["head.weight"].std() < 0.05
    body = [k for k in loaded if not k.startswith("head.")]
    assert set(body) == set(released) - {"head.weight", "head.bias"}
    for key in body:
        assert torch.equal(loaded[key], released[key]), key


def test_hubconf_has_an_entry_point_per_zoo_model():
    spec = importlib.util.spec_from_file_location("hubconf", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # what torch.hub.list lists (for a GitHub repo only): the public callables
    assert sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")) == sorted(ZOO)
    model = torch.hub.load(str(REPO_ROOT), "cvt_21_384", source="local", num_classes=10, device="meta")
    assert model.model_name == "cvt_21_384" and model.config["depths"] == [1, 4, 16] and model.num_classes == 10


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "picture.png"
    Image.fromarray(torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8).numpy()).save(path)
    return path


def test_cli_predict_downloads_the_tagged_weights_by_default(hub, image, tmp_path):
    done = run_offline([sys.executable, "-m", "cvt", "predict", str(image), "--model", SAFETENSORS_TAG, "--topk", "3",
                        "--json"], hub["cache"], tmp_path)
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)
    [expected] = predict([image], hub[SAFETENSORS_REPO], "cvt_13_224", topk=3)
    assert [p["index"] for p in result["predictions"]] == [p["index"] for p in expected["predictions"]]
    for got, want in zip(result["predictions"], expected["predictions"]):
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)
    assert result["predictions"][0]["label"] == expected["predictions"][0]["label"]  # ImageNet's names


def test_cli_eval_pretrained_evaluates_the_hub_weights(hub, image, tmp_path, monkeypatch, capsys):
    # ImageNet's 1000 classes with one image each, the same image: whatever the model predicts for it is right
    # exactly once, so top-1 is 1/1000 and top-5 5/1000
    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True)
    for i in range(1000):
        (root / "val" / f"n{i:04d}").mkdir(parents=True)
        os.link(image, root / "val" / f"n{i:04d}" / "a.png")
    go_offline(monkeypatch, hub["cache"])
    main(["eval", "--model", "cvt_13_224", "--pretrained", "--data", "imagefolder", "--root", str(root),
          "--img-size", "16", "--batch-size", "500", "--workers", "0", "--device", "cpu", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == str(hub[SAFETENSORS_REPO])
    assert result["images"] == 1000
    assert result["top1"] == pytest.approx(0.1) and result["top5"] == pytest.approx(0.5)


def test_cli_convert_reads_a_hub_repo_id(hub, x, tmp_path, monkeypatch, capsys):
    go_offline(monkeypatch, hub["cache"])
    monkeypatch.chdir(tmp_path)  # where no folder microsoft/cvt-13 is
    main(["convert", SAFETENSORS_REPO, "--output", str(tmp_path / "converted")])
    assert f"from {SAFETENSORS_REPO} (hf)" in capsys.readouterr().out
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["model"] == "cvt_13_224"  # the zoo model the released repo holds
    torch.testing.assert_close(local_logits(tmp_path / "converted", x), local_logits(hub[SAFETENSORS_REPO], x),
                               atol=0, rtol=0)


def test_offline_without_the_repo_cached_says_how_to_get_the_weights(entry_points_run):
    message = (entry_points_run / "offline-error.txt").read_text()
    assert "microsoft/cvt-21" in message and "model.safetensors" in message
    assert "`hf download microsoft/cvt-21`" in message and "pretrained=PATH" in message


@pytest.mark.parametrize("command", [["predict", "picture.png", "--model", SAFETENSORS_TAG],
                                     ["eval", "--model", SAFETENSORS_TAG, "--pretrained", "--data", "imagefolder"],
                                     ["convert", SAFETENSORS_REPO, "--output", "converted"]])
def test_cli_offline_with_nothing_cached_is_one_error_line(tmp_path, image, monkeypatch, capsys, command):
    (tmp_path / "empty-cache").mkdir()
    go_offline(monkeypatch, tmp_path / "empty-cache")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error  # the message alone, no traceback
    assert "`hf download microsoft/cvt-13`" in error


@pytest.mark.parametrize("command, error", [
    (["predict", "picture.png"], "no weights to classify with: name the released ones to download (--model NAME"),
    (["eval", "--pretrained", "--data", "imagefolder"], "--pretrained evaluates the released weights of --model"),
    (["eval", "--model", "cvt_13_224.in1k", "--pretrained"], "unknown model 'cvt_13_224.in1k'; did you mean"),
])
def test_cli_says_which_weights_are_missing(capsys, command, error):
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {error}")
