"""The paper's four ablation studies as named variants of the one CvT model, trained by the one engine.

A variant is a dict of `CvT` overrides laid over the recipe's `model.args`. `run_study` trains every variant of a
study with the same recipe and seeds, then writes into its output directory:

- `results.csv`: one row per variant and seed (GMACs @224, params, top-1, top-5, loss, epochs, seconds);
- `results.md`: the table (variant, params, GMACs @224, top-1 mean +/- std over seeds);
- `results.png`: top-1 per variant (every seed, and what one held-out image is worth) and GMACs @224.

Each run lives in `OUTPUT/<variant>/seed<N>/`. A run whose `summary.json` says it finished is not trained again
and one stopped part-way resumes from its last checkpoint, so an interrupted study goes on where it stopped;
`study.json` records the study and its recipe, so an output directory is never resumed with another one.
"""
from __future__ import annotations

import copy
import csv
import difflib
import io
import json
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .data import load_split
from .engine import train, training_config
from .files import save_figure, write_atomic
from .flops import count_macs, count_params
from .model import create_model
from .tables import format_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["STUDIES", "PAPER_GMACS", "describe_study", "run_study", "summarize", "write_results"]

# study -> variant -> CvT overrides. Each study holds the default CvT (no position embedding, convolutional token
# embedding and projection, k/v stride 2): pos_embed "none", token_embed "conv", kv_stride "stride_2" and
# projection "conv_all".
STUDIES: dict[str, dict[str, dict[str, Any]]] = {
    "pos_embed": {
        "none": {"pos_embed": False},
        "first": {"pos_embed": [True, False, False]},
        "last": {"pos_embed": [False, False, True]},
        "all": {"pos_embed": True},
    },
    # The patch embedding uses kernel = stride and no padding, so every stage keeps its resolution.
    "token_embed": {
        "patch": {"token_embed": "patch", "pos_embed": False},
        "patch_pos": {"token_embed": "patch", "pos_embed": True},
        "conv_pos": {"token_embed": "conv", "pos_embed": True},
        "conv": {"token_embed": "conv", "pos_embed": False},
    },
    "kv_stride": {
        "stride_1": {"stride_kv": 1},
        "stride_2": {"stride_kv": 2},
    },
    # Position-wise linear: no projection conv, so keys and values stay at full resolution in those stages.
    "projection": {
        "linear": {"proj_method": "linear"},
        "conv_last": {"proj_method": ["linear", "linear", "dw_bn"]},
        "conv_last_two": {"proj_method": ["linear", "dw_bn", "dw_bn"]},
        "conv_all": {"proj_method": "dw_bn"},
    },
}

# The paper's GFLOPs (multiply-accumulates) for CvT-13 at 224 where it gives them: the k/v stride 1 model, and
# CvT-13 itself, which every study's default variant is.
PAPER_MODEL = "cvt_13_224"
PAPER_GMACS: dict[tuple[str, str], float] = {
    ("pos_embed", "none"): 4.53,
    ("token_embed", "conv"): 4.53,
    ("kv_stride", "stride_1"): 6.55,
    ("kv_stride", "stride_2"): 4.53,
    ("projection", "conv_all"): 4.53,
}

MACS_IMG_SIZE = 224
SUMMARY_FIELDS = ("params", "top1", "top5", "loss", "epochs", "seconds")  # from each run's summary.json
CSV_FIELDS = ("variant", "seed", "gmacs_224", *SUMMARY_FIELDS)


def study_variants(study: str) -> dict[str, dict[str, Any]]:
    if study not in STUDIES:
        close = difflib.get_close_matches(study, list(STUDIES), n=2, cutoff=0.4)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown study {study!r}{hint} (available: {', '.join(STUDIES)})")
    return STUDIES[study]


def variant_args(model_args: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe's CvT arguments with the variant's overrides laid over them."""
    return {**model_args, **overrides}


def variant_macs_and_params(model_name: str, args: dict[str, Any], num_classes: int) -> tuple[int, int]:
    """(MACs for one 224 x 224 image, parameters) of a variant."""
    with torch.device("meta"):  # shapes only: counting needs no weights
        model = create_model(model_name, num_classes=num_classes, **args)
    return count_macs(model, MACS_IMG_SIZE), count_params(model)


def describe_study(study: str, model_name: str = PAPER_MODEL, model_args: dict[str, Any] | None = None,
                   num_classes: int = 1000) -> list[dict[str, Any]]:
    """Each variant's params and GMACs @224, with the paper's GMACs where it gives them for this model."""
    model_args = model_args or {}
    paper_model = model_name == PAPER_MODEL and not model_args and num_classes == 1000
    rows = []
    for variant, overrides in study_variants(study).items():
        macs, params = variant_macs_and_params(model_name, variant_args(model_args, overrides), num_classes)
        rows.append(dict(variant=variant, overrides=overrides, params=params, gmacs_224=macs / 1e9,
                         paper_gmacs=PAPER_GMACS.get((study, variant)) if paper_model else None))
    return rows


def default_output_dir(config: dict[str, Any], study: str) -> Path:
    return Path("runs") / f"{config['name']}_ablate_{study}"


def _claim_output_dir(output_dir: Path, study: str, config: dict[str, Any]) -> None:
    """Record the study and its recipe in `study.json`; refuse a directory that holds another study or recipe."""
    # Through JSON, so that it compares equal to the copy read back from disk (tuples become lists, keys strings).
    record = json.loads(json.dumps({"study": study, "config": config}))
    path = output_dir / "study.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous["study"] != study:
            raise ValueError(f"{output_dir} holds the {previous['study']!r} study, not {study!r}: "
                             "pass another --output")
        differing = _differing_keys(previous["config"], record["config"])
        if differing:
            raise ValueError(f"{output_dir} holds this study run with another recipe (differing: "
                             f"{', '.join(differing)}); pass another --output, or delete the directory to start over")
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2))


def _differing_keys(a: Any, b: Any, where: str = "") -> list[str]:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [where.rstrip(".")]
    return [k for key in sorted(set(a) | set(b)) for k in _differing_keys(a.get(key), b.get(key), f"{where}{key}.")]


def run_config(config: dict[str, Any], study: str, variant: str, seed: int) -> dict[str, Any]:
    """The recipe for one run: the study's recipe with the variant's overrides and the seed."""
    run = copy.deepcopy(config)
    run["model"]["args"] = variant_args(run["model"].get("args") or {}, study_variants(study)[variant])
    run["seed"] = seed
    run["name"] = f"{config['name']}_{study}_{variant}_seed{seed}"
    return run


def run_study(study: str, config: dict[str, Any], seeds: int = 3, output_dir: str | Path | None = None,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train every variant of `study` with `config` for `seeds` seeds (config["seed"], +1, ...), skipping runs
    already finished in `output_dir`; write the results files and return one row per variant and seed (none
    when `train.epochs_per_run` stopped a run before its end)."""
    variants = study_variants(study)
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(config, study)
    _claim_output_dir(output_dir, study, config)
    seed_list = [config["seed"] + i for i in range(seeds)]
    total = len(variants) * len(seed_list)
    model_name, model_args = config["model"]["name"], config["model"].get("args") or {}
    rows = []
    for variant, overrides in variants.items():
        for seed in seed_list:
            run_dir = output_dir / variant / f"seed{seed}"
            step = f"[{len(rows) + 1}/{total}] {study}/{variant} seed {seed}"
            summary = _finished_summary(run_dir)
            if summary is not None:
                log(f"{step}: finished earlier, top-1 {summary['top1']:.2f}%")
            else:
                run = run_config(config, study, variant, seed)
                # A run stopped part-way resumes from its last epoch's checkpoint.
                run["train"]["resume"] = (run_dir / "last.pth").is_file() or None
                log(f"{step}: {'resuming' if run['train']['resume'] else 'training'} in {run_dir}")
                summary = train(run, run_dir)
                if not summary["finished"]:  # train.epochs_per_run stopped it: a time-limited job
                    log(f"{step}: stopped after epoch {summary['epochs']} of {summary['total_epochs']} "
                        "(train.epochs_per_run); run the study again to go on")
                    return []
                log(f"{step}: top-1 {summary['top1']:.2f}% in {summary['seconds']:.0f} s")
            macs, _ = variant_macs_and_params(model_name, variant_args(model_args, overrides), summary["num_classes"])
            rows.append(dict(variant=variant, seed=seed, gmacs_224=macs / 1e9,
                             **{k: summary[k] for k in SUMMARY_FIELDS}))
    write_results(study, rows, output_dir, study_setting(config))
    return rows


def _finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that trained all its epochs, else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("finished") else None


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant, in study order: params, GMACs @224, top-1 mean and std over seeds."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    summary = []
    for variant, runs in by_variant.items():
        top1 = [r["top1"] for r in runs]
        summary.append(dict(variant=variant, params=runs[0]["params"], gmacs_224=runs[0]["gmacs_224"],
                            top1_mean=statistics.fmean(top1), top1_std=statistics.stdev(top1) if len(top1) > 1 else 0.0,
                            seeds=len(runs)))
    return summary


def results_table(summary: list[dict[str, Any]]) -> str:
    rows = [("variant", "params", "GMACs @224", "top-1 (%)", "seeds")]
    rows += [(s["variant"], f"{s['params']:,}", f"{s['gmacs_224']:.3f}",
              f"{s['top1_mean']:.2f} +/- {s['top1_std']:.2f}", str(s["seeds"])) for s in summary]
    return format_table(rows)


@dataclass(frozen=True)
class StudySetting:
    """What every run of a study shares, for its plot to name: the data, the model before the variants'
    overrides, the resolution it trained at, and how many held-out images each top-1 is counted over."""

    dataset: str
    model: str
    img_size: int
    val_images: int


def study_setting(config: dict[str, Any]) -> StudySetting:
    """The setting of a study trained with `config`; counts the held-out split's images (loading it undecoded)."""
    cfg = training_config(config)  # the recipe completed as `train` completes it
    val_set, _ = load_split(cfg["data"], train=False, transform=None)
    overrides = ", ".join(f"{k}={v}" for k, v in (cfg["model"]["args"] or {}).items())
    model = f"{cfg['model']['name']} ({overrides})" if overrides else cfg["model"]["name"]
    return StudySetting(cfg["data"]["dataset"], model, cfg["data"]["img_size"], len(val_set))


def plot_results(study: str, summary: list[dict[str, Any]], rows: list[dict[str, Any]], setting: StudySetting,
                 path: Path) -> Figure:
    """Top-1 per variant (mean, std and each seed) beside GMACs @224 per variant, titled with the study's
    `setting`; returns the matplotlib Figure written to `path`."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch in the caller's process
    from matplotlib.ticker import MultipleLocator

    names = [s["variant"] for s in summary]
    positions = range(len(names))

    def counted(values: set[int], noun: str) -> str:  # "20 epochs", "1 seed", "2/3 seeds" where runs differ
        return f"{'/'.join(str(v) for v in sorted(values))} {noun}{'' if values == {1} else 's'}"

    epochs, seeds = counted({r["epochs"] for r in rows}, "epoch"), counted({s["seeds"] for s in summary}, "seed")
    fig = Figure(figsize=(4 + 1.8 * len(names), 4.6), layout="constrained")
    acc_ax, macs_ax = fig.subplots(1, 2)
    means, stds = [s["top1_mean"] for s in summary], [s["top1_std"] for s in summary]
    acc_ax.errorbar(positions, means, yerr=stds, fmt="o", markersize=8, capsize=6, color="tab:blue",
                    label="mean +/- std")
    for i, name in enumerate(names):
        # One hollow marker per accuracy, with the number of seeds that reached it: seeds often tie, as top-1
        # moves in steps of one image, and markers drawn over each other would hide all but one.
        counts = Counter(r["top1"] for r in rows if r["variant"] == name)
        acc_ax.scatter([i + 0.15] * len(counts), list(counts), s=30, facecolors="none", edgecolors="black",
                       label="each seed (xN: N seeds alike)" if i == 0 else None)
        for top1, count in counts.items():
            if count > 1:
                acc_ax.annotate(f"x{count}", (i + 0.15, top1), xytext=(6, 0), textcoords="offset points",
                                va="center", fontsize=8)
    # The y-range is whatever the results span, so the figure says what a difference is worth: one held-out image,
    # and a dotted line at every reachable accuracy (multiples of one image) while they are few enough to see.
    one_image = 100 / setting.val_images
    low = min(min(r["top1"] for r in rows), *(m - s for m, s in zip(means, stds)))
    high = max(max(r["top1"] for r in rows), *(m + s for m, s in zip(means, stds)))
    margin = max(one_image, 0.05 * (high - low))  # room for the outermost markers
    low, high = low - margin, high + margin
    acc_ax.set_ylim(low, high)
    if (high - low) / one_image <= 40:
        acc_ax.yaxis.set_minor_locator(MultipleLocator(one_image))
        acc_ax.grid(axis="y", which="minor", linestyle=":", alpha=0.7)
    else:
        acc_ax.grid(axis="y", alpha=0.3)
    acc_ax.set_xlim(-0.5, len(names) - 0.5)
    acc_ax.legend(loc="best", fontsize="small")
    acc_ax.set(xlabel="variant", ylabel="held-out top-1 (%)",
               title=f"accuracy: 1 image = {one_image:.2g} pt ({setting.val_images:,} held-out images)")
    bars = macs_ax.bar(positions, [s["gmacs_224"] for s in summary], color="tab:orange", alpha=0.7)
    macs_ax.bar_label(bars, fmt="%.3f", fontsize=8)
    macs_ax.set(xlabel="variant", ylabel=f"GMACs per {MACS_IMG_SIZE}x{MACS_IMG_SIZE} image",
                title=f"cost: the variants of the model above\nat {MACS_IMG_SIZE}x{MACS_IMG_SIZE} "
                      f"(trained at {setting.img_size}x{setting.img_size})")
    for ax in (acc_ax, macs_ax):
        ax.title.set_fontsize(9)
        ax.set_xticks(list(positions), names, rotation=20)
    fig.suptitle(f"{study} ablation on {setting.dataset}, {epochs}, {seeds}\n{setting.model}", fontsize=10)
    save_figure(fig, path, dpi=110)
    return fig


def write_results(study: str, rows: list[dict[str, Any]], output_dir: str | Path, setting: StudySetting) -> None:
    """`results.csv` (every run), `results.md` (the table) and `results.png` (the plot) in `output_dir`."""
    output_dir = Path(output_dir)
    summary = summarize(rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(output_dir / "results.csv", text.getvalue())
    write_atomic(output_dir / "results.md", f"# ablation: {study}\n\n{results_table(summary)}\n")
    plot_results(study, summary, rows, setting, output_dir / "results.png")
