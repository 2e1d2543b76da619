"""The ablation variants (build, train at two resolutions, exact parameter and MAC differences), the paper's
GMACs in the dry run, and a smoke run of `cvt ablate` that writes every output and resumes."""
from __future__ import annotations

import csv
import json
import re
import shutil

import pytest
import torch
import torch.nn as nn

from cvt.ablations import PAPER_GMACS, STUDIES, describe_study, run_study, variant_macs_and_params
from cvt.cli import main
from cvt.flops import count_macs, count_params, macs_by_module
from cvt.model import create_model
from helpers import TINY as TINY_LAYOUT

TINY = dict(TINY_LAYOUT, img_size=32)
DIMS = TINY["embed_dims"]
# Token-embedding convs (kernel, stride) per stage, and the maps they give: sides 32/4, /2, /2 at 32 px and
# 224/4, /2, /2 at 224 px.
EMBED = ((7, 4), (3, 2), (3, 2))
GRID_32 = (8, 4, 2)
GRID_224 = (56, 28, 14)
ALL_VARIANTS = [(study, variant) for study, variants in STUDIES.items() for variant in variants]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny models gain nothing from a second thread, and on cores shared with other jobs two threads run
    many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(study: str, variant: str) -> nn.Module:
    return create_model("cvt_13_224", num_classes=10, **TINY, **STUDIES[study][variant])


@pytest.mark.parametrize("study,variant", ALL_VARIANTS)
def test_variant_trains_at_two_resolutions(study, variant):
    torch.manual_seed(0)
    model = tiny(study, variant).train()
    for size in ((32, 32), (48, 40)):
        model.zero_grad()
        logits = model(torch.randn(2, 3, *size))
        assert logits.shape == (2, 10)
        nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{study}/{variant} @ {size}: {name}"


def pos_embed_params(stages) -> int:
    return sum(side * side * dim for i, (side, dim) in enumerate(zip(GRID_32, DIMS)) if i in stages)


def test_position_embedding_adds_exactly_its_parameters_and_no_macs():
    base = tiny("pos_embed", "none")
    stages = {"none": (), "first": (0,), "last": (2,), "all": (0, 1, 2)}
    for variant, with_pos in stages.items():
        model = tiny("pos_embed", variant)
        assert count_params(model) - count_params(base) == pos_embed_params(with_pos)
        assert [s.pos_embed is not None for s in model.stages] == [i in with_pos for i in range(3)]
        assert count_macs(model, 224) == count_macs(base, 224)


def test_patch_token_embedding_keeps_resolutions_and_drops_the_overlap():
    models = {v: tiny("token_embed", v) for v in STUDIES["token_embed"]}
    for size in (32, 224, 50):
        assert models["patch"].feature_sizes(size, size) == models["conv"].feature_sizes(size, size)
    for model in (models["patch"], models["patch_pos"]):
        assert [(s.patch_embed.proj.kernel_size[0], s.patch_embed.proj.stride[0], s.patch_embed.proj.padding[0])
                for s in model.stages] == [(stride, stride, 0) for _, stride in EMBED]
    in_chans = (3,) + DIMS[:2]
    # Each embedding conv shrinks from k x k to s x s taps (k^2 - s^2 weights per input/output channel pair).
    overlap = [c_in * c_out * (k * k - s * s) for c_in, c_out, (k, s) in zip(in_chans, DIMS, EMBED)]
    assert count_params(models["conv"]) - count_params(models["patch"]) == sum(overlap)
    assert count_macs(models["conv"], 224) - count_macs(models["patch"], 224) == sum(
        n * side * side for n, side in zip(overlap, GRID_224))
    every_stage = pos_embed_params((0, 1, 2))
    assert count_params(models["patch_pos"]) - count_params(models["patch"]) == every_stage
    assert count_params(models["conv_pos"]) - count_params(models["conv"]) == every_stage


def test_kv_stride_changes_only_the_key_value_path():
    stride_1, stride_2 = (macs_by_module(tiny("kv_stride", v), 224) for v in ("stride_1", "stride_2"))
    assert count_params(tiny("kv_stride", "stride_1")) == count_params(tiny("kv_stride", "stride_2"))
    key_value = re.compile(r"attn\.(conv_proj_[kv]\.conv|proj_[kv]|matmul)$")
    assert stride_1.keys() == stride_2.keys()
    for name in stride_1:
        if key_value.search(name):
            assert stride_1[name] > stride_2[name], name
            if "conv_proj" in name:  # every stage's map side is even at 224: stride 2 keeps a quarter
                assert stride_1[name] == 4 * stride_2[name], name
        else:
            assert stride_1[name] == stride_2[name], name


def test_linear_projection_removes_the_depthwise_convs_and_batchnorms():
    conv_stages = {"linear": (), "conv_last": (2,), "conv_last_two": (1, 2), "conv_all": (0, 1, 2)}
    reference = tiny("projection", "conv_all")
    for variant, with_conv in conv_stages.items():
        model = tiny("projection", variant)
        for i, stage in enumerate(model.stages):
            convs = [m for m in stage.blocks.modules() if isinstance(m, nn.Conv2d)]
            norms = [m for m in stage.blocks.modules() if isinstance(m, nn.BatchNorm2d)]
            # q, k and v each: a depth-wise 3x3 conv and a BatchNorm in every block of a convolutional stage.
            expected = 3 * TINY["depths"][i] if i in with_conv else 0
            assert len(convs) == len(norms) == expected, (variant, i)
        # Per block: 3 x (depth-wise weights dim * 3 * 3 + BatchNorm weight and bias 2 * dim).
        removed = sum(3 * TINY["depths"][i] * (DIMS[i] * 9 + 2 * DIMS[i]) for i in range(3) if i not in with_conv)
        assert count_params(reference) - count_params(model) == removed
        projected = {name.split(".")[0] for name in macs_by_module(model, 224) if "conv_proj" in name}
        assert projected == {f"stage{i}" for i in with_conv}


def test_dry_run_matches_the_papers_gmacs_for_cvt_13():
    rows = {r["variant"]: r for r in describe_study("kv_stride")}
    for variant, row in rows.items():
        paper = PAPER_GMACS[("kv_stride", variant)]
        assert row["paper_gmacs"] == paper
        assert abs(row["gmacs_224"] - paper) / paper < 0.02, row
    assert 0.25 < 1 - rows["stride_2"]["gmacs_224"] / rows["stride_1"]["gmacs_224"] < 0.35  # paper: about 30%
    # The paper's other figures are for CvT-13 itself, which each study's default variant is.
    default = rows["stride_2"]
    for (study, variant), paper in PAPER_GMACS.items():
        if study != "kv_stride":
            macs, params = variant_macs_and_params("cvt_13_224", STUDIES[study][variant], 1000)
            assert (macs / 1e9, params, paper) == (default["gmacs_224"], default["params"], default["paper_gmacs"])
    assert all(r["paper_gmacs"] is None for r in describe_study("kv_stride", "cvt_13_224", {"depths": [1, 1, 2]}))


def test_cli_dry_run_prints_params_and_gmacs(capsys):
    main(["ablate", "kv_stride", "--dry-run"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| stride_")}
    assert set(rows) == {"stride_1", "stride_2"}
    for _overrides, params, gmacs, paper in rows.values():
        assert params == f"{count_params(create_model('cvt_13_224')):,}"
        assert abs(float(gmacs) - float(paper)) / float(paper) < 0.02


def test_unknown_study_names_the_close_one():
    with pytest.raises(ValueError, match="did you mean kv_stride"):
        describe_study("kv_strides")


def test_training_a_study_without_a_recipe_says_what_to_pass(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "kv_stride"])
    assert exit_info.value.code == 2
    assert "needs --config FILE" in capsys.readouterr().err


def test_cli_study_choices_are_the_studies():
    from cvt.cli import build_parser

    ablate = build_parser()._subparsers._group_actions[0].choices["ablate"]
    study = next(a for a in ablate._actions if a.dest == "study")
    assert list(study.choices) == list(STUDIES)


# About a second per run: the tiny model at 16 x 16, 5% of digits to train on and one epoch (two steps of 32).
TINY_RECIPE = """
name: smoke
model:
  args: {embed_dims: [16, 32, 48], depths: [1, 1, 2], num_heads: [1, 2, 3], img_size: 16}
data: {val_fraction: 0.95, img_size: 16}
train: {epochs: %d, epochs_per_run: %s, batch_size: 32, warmup_epochs: 0, keep_epoch_checkpoints: 0, progress: false}
"""


def recipe(tmp_path, epochs: int = 1, epochs_per_run: str = "null") -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(TINY_RECIPE % (epochs, epochs_per_run))
    return str(path)


def spy_on_training(monkeypatch) -> list[tuple[str, bool]]:
    """Record (run directory relative to the study's, resume flag) of every run the harness starts."""
    import cvt.ablations

    calls = []
    real_train = cvt.ablations.train

    def train(config, output_dir):
        calls.append(("/".join(output_dir.parts[-2:]), bool(config["train"]["resume"])))
        return real_train(config, output_dir)

    monkeypatch.setattr(cvt.ablations, "train", train)
    return calls


def test_cli_ablate_writes_every_output_and_skips_finished_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    main(["ablate", "kv_stride", "--config", recipe(tmp_path), "--seeds", "2", "--output", str(out)])
    printed = capsys.readouterr().out

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"]) for r in rows] == [("stride_1", "0"), ("stride_1", "1"), ("stride_2", "0"),
                                                         ("stride_2", "1")]
    for r in rows:
        summary = json.loads((out / r["variant"] / f"seed{r['seed']}" / "summary.json").read_text())
        assert float(r["top1"]) == pytest.approx(summary["top1"]) and 0 <= summary["top1"] <= 100
        assert int(r["params"]) == summary["params"]
    by_variant = {r["variant"]: r for r in rows}
    assert float(by_variant["stride_1"]["gmacs_224"]) > float(by_variant["stride_2"]["gmacs_224"])
    assert by_variant["stride_1"]["params"] == by_variant["stride_2"]["params"]
    table = (out / "results.md").read_text()
    for variant in ("stride_1", "stride_2"):
        top1 = [float(r["top1"]) for r in rows if r["variant"] == variant]
        mean, std = sum(top1) / 2, abs(top1[0] - top1[1]) / 2 ** 0.5
        line = next(line for line in table.splitlines() if line.startswith(f"| {variant} "))
        assert f"{mean:.2f} +/- {std:.2f}" in line and line in printed
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # An interrupted study: its last run never happened. Only that one is trained again.
    shutil.rmtree(out / "stride_2" / "seed1")
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")}
    calls = spy_on_training(monkeypatch)
    main(["ablate", "kv_stride", "--config", recipe(tmp_path), "--seeds", "2", "--output", str(out)])
    assert calls == [("stride_2/seed1", False)]
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in finished.items())
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_a_run_stopped_part_way_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from cvt.engine import load_config

    config = load_config(recipe(tmp_path, epochs=2, epochs_per_run="1"))
    calls = spy_on_training(monkeypatch)
    out = tmp_path / "study"
    assert run_study("kv_stride", config, seeds=1, output_dir=out) == []  # stopped after one epoch
    assert not (out / "results.csv").exists()
    assert run_study("kv_stride", config, seeds=1, output_dir=out) == []
    rows = run_study("kv_stride", config, seeds=1, output_dir=out)
    assert calls == [("stride_1/seed0", False), ("stride_1/seed0", True), ("stride_2/seed0", False),
                     ("stride_2/seed0", True)]
    assert [r["epochs"] for r in rows] == [2, 2]
    for variant in ("stride_1", "stride_2"):
        metrics = (out / variant / "seed0" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(m)["epoch"] for m in metrics] == [1, 2]


def test_an_output_directory_keeps_its_recipe(tmp_path, monkeypatch):
    import cvt.ablations
    from cvt.engine import load_config

    def no_training(config, output_dir):
        raise AssertionError("a refused study must not train")

    monkeypatch.setattr(cvt.ablations, "train", no_training)
    config = load_config(recipe(tmp_path))
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"study": "kv_stride", "config": config}))
    changed = load_config(recipe(tmp_path), ["train.lr=0.01"])
    with pytest.raises(ValueError, match=r"another recipe \(differing: train.lr\)"):
        run_study("kv_stride", changed, output_dir=out)
    with pytest.raises(ValueError, match="holds the 'kv_stride' study, not 'pos_embed'"):
        run_study("pos_embed", config, output_dir=out)
