"""The pictures, checked on the matplotlib Figure each drawing function returns: the training curves (a marker on
each point, whole-epoch ticks, the run and its model in the title), the attention maps (a colour bar per map, no
empty cell, titles clear of each other, the prediction, panels of the input's shape) and the ablation plots (the
setting in the title, labelled axes, the worth of one held-out image, tied seeds shown)."""
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from PIL import Image

import cvt
import cvt.inspect
from cvt import engine
from cvt.ablations import StudySetting, plot_results, study_setting, summarize
from cvt.cli import main
from cvt.engine import load_config, plot_curves, train
from cvt.inspect import attention_maps, draw_attention, load_image
from helpers import TINY

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def draw(fig):
    """Lay `fig` out and draw it as savefig does; returns the renderer to measure its artists with."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    return renderer


def visible_xticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


@pytest.mark.parametrize("epochs", [1, 7])
def test_curves_mark_every_epoch_on_whole_epoch_ticks(tmp_path, epochs):
    rows = [dict(epoch=e, train_loss=2 / e, val_loss=1.8 / e, top1=100 - 30 / e, ema_top1=100 - 35 / e)
            for e in range(1, epochs + 1)]
    fig = plot_curves(rows, tmp_path / "curves.png", title="a run: its model")
    draw(fig)
    loss_ax, acc_ax = fig.axes
    assert len(loss_ax.lines) == 2 and len(acc_ax.lines) == 2  # training and held-out; model and EMA
    for line in loss_ax.lines + acc_ax.lines:
        assert len(line.get_xdata()) == epochs and line.get_marker() not in (None, "", "None")
    for ax in (loss_ax, acc_ax):
        ticks = visible_xticks(ax)
        assert ticks and all(float(t).is_integer() for t in ticks) and 1 in ticks
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel()
    assert fig.get_suptitle() == "a run: its model"
    assert Image.open(tmp_path / "curves.png").format == "PNG"


def test_a_training_run_titles_its_curves_with_its_name_and_model(tmp_path, monkeypatch):
    figures = []

    def keep_figure(*args, **kwargs):
        figures.append(plot_curves(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(engine, "plot_curves", keep_figure)
    # Under a second: the digits model at 16 x 16, one step of 32 images, one epoch's row of metrics.
    config = load_config(None, ["name=curves_run", "train.steps=1", "train.progress=false", "train.batch_size=32",
                                "train.warmup_epochs=0", "train.keep_epoch_checkpoints=0", "data.img_size=16",
                                "model.args.img_size=16"])
    train(config, tmp_path)
    (fig,) = figures
    title = fig.get_suptitle()
    assert "curves_run" in title and "cvt_13_224" in title and "98,986 parameters" in title and "digits" in title
    assert all(line.get_marker() not in (None, "", "None") for ax in fig.axes for line in ax.lines)


def tiny_model(num_heads=(1, 2, 4)):
    torch.manual_seed(0)
    return cvt.create_model("cvt_13_224", **{**TINY, "num_heads": num_heads}, num_classes=10, img_size=64).eval()


def overlaps(fig, renderer) -> list[str]:
    """Each title (and the figure's) that runs into another text or into another panel or colour bar."""
    titles = [ax.title for ax in fig.axes if ax.get_title()] + [fig._suptitle]
    boxes = [t.get_window_extent(renderer) for t in titles]
    found = [f"{a.get_text()!r} and {b.get_text()!r}"
             for (a, box_a), (b, box_b) in itertools.combinations(zip(titles, boxes), 2) if box_a.overlaps(box_b)]
    found += [f"{t.get_text()!r} on the axes of {ax.get_title()!r}" for t, box in zip(titles, boxes)
              for ax in fig.axes if ax.title is not t and ax.get_tightbbox(renderer).overlaps(box)]
    return found


@pytest.mark.parametrize("height,width", [(64, 64), (80, 48)])
def test_attention_figure_has_a_colour_bar_per_map_no_empty_cell_clear_titles_and_the_prediction(
        tmp_path, height, width):
    maps = attention_maps(tiny_model(), torch.randn(1, 3, height, width))
    fig = draw_attention(np.zeros((height, width, 3), dtype=np.uint8), maps, tmp_path / "maps.png",
                         title=f"tiny @ {height}x{width}", prediction=("seven", 0.934))
    renderer = draw(fig)
    panels = [ax for ax in fig.axes if ax.images]
    bar_of = {ax: image.colorbar.ax for ax in panels for image in ax.images if image.colorbar is not None}
    # input, mean of heads, rollout and 4 heads: 7 panels in a grid of 4 x 2 whose eighth cell is not drawn.
    assert [ax.get_title() for ax in panels] == ["input", "mean of heads", "rollout", *(f"head {i}" for i in range(4))]
    assert list(bar_of) == panels[1:]  # a colour bar for every map, none for the input
    assert len(fig.axes) == len(panels) + len(bar_of)  # and no other axes: no empty cell
    assert "predicted: seven (93.4%)" in fig.get_suptitle() and f"tiny @ {height}x{width}" in fig.get_suptitle()
    assert overlaps(fig, renderer) == []
    # Panels of the input's shape with no wide margins: less than half an inch from a map's colour bar (its tick
    # labels) to the next panel in its row. (Beside the input is the room its column's colour bars take.)
    for ax, next_ax in zip(panels, panels[1:]):
        box, next_box = ax.get_window_extent(renderer), next_ax.get_window_extent(renderer)
        assert box.width / box.height == pytest.approx(width / height, rel=0.03)
        if ax in bar_of and next_box.y0 == box.y0:
            assert 0 < next_box.x0 - bar_of[ax].get_tightbbox(renderer).x1 < 0.5 * fig.dpi


def test_cli_attention_shows_the_models_top_1(tmp_path, monkeypatch):
    figures = []

    def keep_figure(*args, **kwargs):
        figures.append(kwargs["prediction"])
        return draw_attention(*args, **kwargs)

    monkeypatch.setattr(cvt.inspect, "draw_attention", keep_figure)
    tiny_model().save_pretrained(tmp_path / "weights")
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(image)
    main(["attention", str(image), "--model", "cvt_13_224", "--checkpoint", str(tmp_path / "weights"),
          "--output", str(tmp_path / "maps.png"), "--img-size", "80", "48"])
    model = cvt.create_model("cvt_13_224", pretrained=str(tmp_path / "weights")).eval()
    with torch.no_grad():
        probabilities = model(load_image(image, model, (80, 48))[1]).softmax(-1)[0]
    ((label, probability),) = figures
    assert label == f"class {int(probabilities.argmax())}"  # no label names saved with these weights
    assert probability == pytest.approx(probabilities.max().item(), abs=1e-6)


def test_ablation_plot_names_its_setting_and_scale_and_shows_tied_seeds(tmp_path):
    # Top-1 on 360 images moves in steps of 100/360: seeds tie, as two of `wide` and all three of `narrow` do.
    one_image = 100 / 360
    top1 = {"wide": [354 * one_image, 354 * one_image, 352 * one_image], "narrow": [351 * one_image] * 3}
    rows = [dict(variant=v, seed=s, gmacs_224=0.1 + i, params=1000, top1=t, top5=100.0, loss=0.1, epochs=20,
                 seconds=1.0) for i, (v, values) in enumerate(top1.items()) for s, t in enumerate(values)]
    setting = StudySetting("digits", "cvt_13_224 (embed_dims=[16, 32, 48])", 32, 360)
    summary = summarize(rows)
    fig = plot_results("kv_stride", summary, rows, setting, tmp_path / "results.png")
    acc_ax, macs_ax = fig.axes
    title = fig.get_suptitle()
    assert all(s in title for s in ("kv_stride", "digits", "cvt_13_224 (embed_dims=[16, 32, 48])", "20 epochs"))
    assert acc_ax.get_xlabel() == macs_ax.get_xlabel() == "variant"
    assert "top-1" in acc_ax.get_ylabel() and "GMACs per 224x224 image" in macs_ax.get_ylabel()
    assert "224x224" in macs_ax.get_title() and "trained at 32x32" in macs_ax.get_title()
    assert "1 image = 0.28 pt" in acc_ax.get_title() and "360 held-out images" in acc_ax.get_title()
    # The y-range spans the results (the seeds, and the wide variant's mean + std above its best seed) and one
    # image more each side, with a line at every reachable accuracy.
    wide = summary[0]
    assert wide["top1_mean"] + wide["top1_std"] > 354 * one_image
    assert acc_ax.get_ylim() == pytest.approx((350 * one_image, wide["top1_mean"] + wide["top1_std"] + one_image))
    assert np.diff(acc_ax.yaxis.get_minorticklocs()) == pytest.approx(one_image)
    # One hollow marker per distinct accuracy, and the number of seeds on each shared one.
    seeds = [c for c in acc_ax.collections if isinstance(c, PathCollection)]
    assert sorted(len(c.get_offsets()) for c in seeds) == [1, 2]
    assert all(len(c.get_facecolor()) == 0 for c in seeds)
    assert sorted(t.get_text() for t in acc_ax.texts) == ["x2", "x3"]
    assert Image.open(tmp_path / "results.png").format == "PNG"


def test_a_studys_setting_comes_from_its_recipe():
    setting = study_setting(load_config(str(CONFIGS / "ablate_digits.yaml"), []))
    assert setting == StudySetting(
        "digits", "cvt_13_224 (embed_dims=[16, 32, 48], depths=[1, 1, 2], num_heads=[1, 2, 3], img_size=32)", 32, 360)
