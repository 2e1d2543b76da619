"""The `cvt` command (also `python -m cvt`): one sub-command per job, each a thin layer over the library."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path


def cmd_models(args: argparse.Namespace) -> None:
    import torch

    from .flops import count_macs, count_params
    from .model import PRETRAINED, create_model, list_pretrained

    rows = [("model and weights (pretrained=True)", "Hub repo", "params", "GMACs", "resolution", "paper top-1",
             "pre-training")]
    for tag in list_pretrained(args.pattern if "." in args.pattern else args.pattern + ".*"):
        with torch.device("meta"):  # shapes only: counting needs no weights
            model = create_model(tag)
        meta = PRETRAINED[tag]
        size = meta["input_size"][-1]
        rows.append((tag, meta["hf_hub_id"], f"{count_params(model):,}", f"{count_macs(model, size) / 1e9:.2f}",
                     str(size), f"{meta['paper_top1']:.1f}", meta["pretraining"]))
    print_table(rows)


def cmd_flops(args: argparse.Namespace) -> None:
    import torch

    from .flops import count_macs, count_params
    from .model import create_model

    with torch.device("meta"):
        model = create_model(args.model, **parse_overrides(args.set))
    size = args.img_size or model.img_size[0]
    macs = count_macs(model, size)
    print(f"{args.model} @ {size}x{size}: {macs / 1e9:.3f} GMACs (paper convention), "
          f"{count_params(model):,} parameters")


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_model
    from .model import load_model

    if args.checkpoint is None:
        print("note: no --checkpoint, so the exported weights are random", file=sys.stderr)
    model = load_model(args.checkpoint, args.model, random_weights=True)
    try:
        check = export_model(model, args.output, args.format, atol=args.atol)
    except ImportError as e:
        missing = e.name or "onnx, onnxscript and onnxruntime"
        raise SystemExit(f"error: {args.format} export needs {missing}: pip install -e '.[export]' in the "
                         "repository") from None
    print(f"wrote {args.output}: {args.format}, dynamic batch, height and width; checked against PyTorch, "
          f"max abs diff {check.summary()} (limit {args.atol:g})")
    if args.format == "onnx":
        print(f"its metadata_props hold the label names and the preprocessing: {describe_preprocessing(model)}")


def describe_preprocessing(model) -> str:
    """The model's preprocessing (`timm.data.resolve_model_data_config`) in a few words."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    crop = "squash" if cfg["crop_mode"] == "squash" else f"{cfg['crop_mode']} crop {cfg['crop_pct']:g}"
    return (f"{h}x{w}, {crop}, {cfg['interpolation']}, mean {tuple(round(m, 4) for m in cfg['mean'])}, "
            f"std {tuple(round(s, 4) for s in cfg['std'])}")


def cmd_attention(args: argparse.Namespace) -> None:
    import torch

    from .inspect import attention_maps, draw_attention, load_image
    from .model import load_model
    from .weights import label_names

    if args.checkpoint is None:
        print("note: no --checkpoint, so the weights are random and the maps show no learned attention",
              file=sys.stderr)
    model = load_model(args.checkpoint, args.model, random_weights=True).eval()
    size = (args.img_size * 2)[:2] if args.img_size else None
    picture, images = load_image(args.image, model, size)
    maps = attention_maps(model, images)
    # The prediction for the input the maps are of (the whole image resized, where `cvt predict` crops as eval
    # does), so that label and maps belong together.
    with torch.no_grad():
        probabilities = model(images).softmax(dim=-1)[0]
    index = int(probabilities.argmax())
    names = label_names(model)
    prediction = (names[index] if names else f"class {index}", probabilities[index].item())
    draw_attention(picture, maps, args.output, title=f"{args.model} @ {picture.height}x{picture.width}",
                   prediction=prediction)
    (kh, kw), (h, w) = maps.key_grid, maps.token_grid
    print(f"wrote {args.output}: class-token attention of the last block ({maps.last_block.shape[1]} heads over "
          f"{kh}x{kw} keys) and rollout over the last stage ({h}x{w} tokens), input {picture.height}x{picture.width}, "
          f"predicted {prediction[0]} ({prediction[1]:.1%})")


def cmd_profile(args: argparse.Namespace) -> None:
    import torch

    from .inspect import profile_stages
    from .model import create_model

    with torch.device("meta"):  # shapes only: profiling needs no weights
        model = create_model(args.model, **parse_overrides(args.set))
    size = args.img_size or model.img_size[0]
    mib = 2.0 ** 20
    rows = [("stage", "tokens", "blocks", "heads", "queries", "keys", "params", "GMACs", "activations MiB",
             "attention MiB")]
    stages = profile_stages(model, size)
    for s in stages:
        attention = (f"{s.token_grid[0]}x{s.token_grid[1]}", str(s.blocks), str(s.heads), str(s.queries),
                     str(s.keys)) if s.token_grid else ("-",) * 5
        rows.append((s.name, *attention, f"{s.params:,}", f"{s.macs / 1e9:.3f}", f"{s.activation_bytes / mib:.1f}",
                     f"{s.attention_bytes / mib:.1f}"))
    rows.append(("total", "", str(sum(s.blocks for s in stages)), "", "", "", f"{sum(s.params for s in stages):,}",
                 f"{sum(s.macs for s in stages) / 1e9:.3f}", f"{sum(s.activation_bytes for s in stages) / mib:.1f}",
                 f"{sum(s.attention_bytes for s in stages) / mib:.1f}"))
    print(f"{args.model} @ {size}x{size}, one image: queries and keys per attention block (class token "
          "included); activations are the tensors saved for the backward pass (float32, reference attention), "
          "of which attention is the attention matrices")
    print_table(rows)


def cmd_convert(args: argparse.Namespace) -> None:
    from .flops import count_params
    from .hf import save_hf
    from .model import load_model
    from .weights import load_checkpoint, save_safetensors

    model_name = args.model
    if is_hub_repo_id(args.checkpoint):
        source = download_hub_repo(args.checkpoint, instead=f"convert a local checkpoint ({args.checkpoint} is no "
                                                            "file or folder here)")
        model_name = model_name or released_model_of(args.checkpoint)
    else:
        source = args.checkpoint
    checkpoint = load_checkpoint(source)
    if args.source_format and checkpoint.kind != args.source_format:
        raise ValueError(f"{args.checkpoint} is a {checkpoint.kind!r} checkpoint, not {args.source_format!r}")
    model = load_model(checkpoint, model_name, num_classes=args.num_classes, **parse_overrides(args.set))
    target = args.to or ("safetensors" if args.output.endswith(".safetensors") else "cvt")
    if target == "hf":
        try:
            save_hf(model, args.output)
        except ImportError as e:
            raise SystemExit(f"error: --to hf needs {e.name}: pip install -e '.[hf]' in the repository") from None
    elif target == "safetensors":
        save_safetensors(model.state_dict(), args.output)
    else:
        model.save_pretrained(args.output)
    print(f"wrote {args.output} ({target}) from {args.checkpoint} ({checkpoint.kind}): "
          f"{getattr(model, 'model_name', None) or 'CvT'}, {count_params(model):,} parameters, "
          f"{model.num_classes} classes")


def cmd_ablate(args: argparse.Namespace) -> None:
    from .ablations import PAPER_MODEL, describe_study, results_table, run_study, summarize

    config = None
    if args.config:
        from .engine import load_config

        config = load_config(args.config, args.set or [])
    if args.dry_run:
        model_cfg = config["model"] if config else {"name": PAPER_MODEL}
        name, model_args = model_cfg["name"], model_cfg.get("args") or {}
        rows = [("variant", "overrides", "params", "GMACs @224", "paper GMACs")]
        for r in describe_study(args.study, name, model_args):
            overrides = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
            rows.append((r["variant"], overrides, f"{r['params']:,}", f"{r['gmacs_224']:.3f}",
                         "" if r["paper_gmacs"] is None else f"{r['paper_gmacs']:.2f}"))
        base = f" with {model_args}" if model_args else ""
        print(f"{args.study} study on {name}{base}: 1000 classes, MACs for one 224x224 image")
        print_table(rows)
        return
    if config is None:
        raise ValueError("training a study needs --config FILE (e.g. configs/ablate_digits.yaml); "
                         "add --dry-run to list the variants without training")
    rows = run_study(args.study, config, seeds=args.seeds, output_dir=args.output)
    if rows:  # none when train.epochs_per_run stopped a run part-way
        print(results_table(summarize(rows)))


def cmd_train(args: argparse.Namespace) -> None:
    from .engine import checkpoint_to_resume, load_config, recorded_config, train

    overrides = list(args.overrides)
    if isinstance(args.resume, str) and "=" in args.resume and not os.path.exists(args.resume):
        overrides, args.resume = [args.resume, *overrides], True  # `--resume KEY=VALUE`: an override, not a path
    config = load_config(args.config, overrides)
    output = Path(args.output) if args.output else Path("runs") / config["name"]
    if args.resume and args.config is None:  # the recorded run's config, changed only by what is given here
        checkpoint = checkpoint_to_resume(args.resume, output)
        if checkpoint is not None:
            config = load_config(None, overrides, base=recorded_config(checkpoint))
    for section, key, value in (("", "seed", args.seed), ("train", "epochs", args.epochs),
                                ("train", "device", args.device), ("train", "resume", args.resume)):
        if value is not None:
            (config[section] if section else config)[key] = value
    summary = train(config, output, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{summary['name']}: top-1 {summary['top1']:.2f}%, top-5 {summary['top5']:.2f}%, held-out loss "
              f"{summary['loss']:.4f} after {summary['epochs']}/{summary['total_epochs']} epochs in "
              f"{summary['seconds']:.0f} s ({summary['params']:,} parameters, {summary['device']}); "
              f"summary.json, metrics, checkpoints and curves.png in {output}")


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from .engine import evaluate_checkpoint
    from .model import released_cfg

    data = {k: v for k, v in (("dataset", args.data), ("root", args.root), ("img_size", args.img_size),
                              ("workers", args.workers), ("bad_images", args.bad_images)) if v is not None}
    checkpoint, model_name = args.checkpoint, args.model
    if args.pretrained:
        if model_name is None:
            raise ValueError("--pretrained evaluates the released weights of --model NAME or NAME.TAG "
                             "(cvt.list_pretrained()): say which")
        checkpoint = download_hub_repo(released_cfg(model_name)["hf_hub_id"],
                                       instead="evaluate local weights: --checkpoint PATH")
        model_name = model_name.split(".")[0]  # the tag chose the repo; the folder holds that model's weights
    result = evaluate_checkpoint(checkpoint, model_name, data, args.batch_size, args.device)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    skipped = f", {result['skipped']} unreadable images skipped" if result["skipped"] else ""
    print(f"{result['checkpoint']} on {result['dataset']} (held-out split, {result['images']} images at "
          f"{result['img_size']}): top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%, "
          f"loss {result['loss']:.4f}{skipped}")


def cmd_predict(args: argparse.Namespace) -> None:
    import json

    from .predict import predict

    results = predict(args.images, args.checkpoint, args.model, args.topk, args.device)
    shown = len(results[0]["predictions"])
    if shown < args.topk:
        print(f"note: --topk {args.topk}, but the model has {shown} classes: showing {shown}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for result in results:
        print(result["image"])
        for p in result["predictions"]:
            print(f"  {100 * p['probability']:6.2f}%  {p['label']}")


def cmd_shards(args: argparse.Namespace) -> None:
    from .shards import INDEX_NAME, write_shards

    summary = write_shards(args.folder, args.output, args.shard_size, args.val_fraction, args.seed)
    splits = ", ".join(f"{s['samples']} {name} images in {s['shards']} shards"
                       for name, s in summary["splits"].items())
    print(f"wrote {args.output}: {splits}, {summary['classes']} classes, and {INDEX_NAME}; every shard was read "
          f"back and holds the samples and classes the index says (train with data.dataset=wds "
          f"data.root={args.output})")


def released_model_of(repo_id: str) -> str | None:
    """The zoo name of a released checkpoint's Hub repo (None for another repo)."""
    from .model import PRETRAINED

    return next((tag.split(".")[0] for tag, cfg in PRETRAINED.items() if cfg["hf_hub_id"] == repo_id), None)


def is_hub_repo_id(argument: str) -> bool:
    """`owner/name` and no such local path."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", argument) is not None and not os.path.exists(argument)


def download_hub_repo(repo_id: str, instead: str) -> Path:
    """The local snapshot folder of a Hugging Face Hub CvT repo: its config.json and weights, model.safetensors
    before pytorch_model.bin (timm's order, so a file timm downloaded is not fetched again). The Hub's cache and
    its settings (HF_HUB_OFFLINE, HF_HUB_CACHE, HF_ENDPOINT) apply; `instead` says what to do without the Hub."""
    from huggingface_hub import snapshot_download

    from .weights import CONFIG_NAME, HF_WEIGHTS_NAMES

    for weights in HF_WEIGHTS_NAMES:
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, weights]))
        except OSError as e:  # huggingface_hub's errors for a missing repo, no connection or an offline cache miss
            raise FileNotFoundError(
                f"{repo_id} could not be had from the Hugging Face Hub ({CONFIG_NAME} and "
                f"{' or '.join(HF_WEIGHTS_NAMES)}): {type(e).__name__}: {str(e).splitlines()[0].rstrip('.')}. With "
                f"a connection, run it again (or `hf download {repo_id}`) and it is cached; without one, "
                f"{instead}") from None
        if (folder / weights).is_file():
            return folder
    raise FileNotFoundError(f"the Hugging Face Hub repo {repo_id} has none of {', '.join(HF_WEIGHTS_NAMES)}: it "
                            "holds no weights transformers or timm would read")


def print_table(rows: list[tuple[str, ...]]) -> None:
    from .tables import format_table

    print(format_table(rows))


def parse_overrides(pairs: list[str] | None) -> dict:
    """`key=value` pairs with YAML-typed values (`drop_path_rate=0.2`, `stride_kv=[2,2,1]`)."""
    from .files import yaml_load

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: expected key=value, got {pair!r}")
        out[key] = yaml_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    from .ablations import STUDIES
    from .data import BAD_IMAGES, DATASETS

    parser = argparse.ArgumentParser(prog="cvt", description="CvT: Convolutional vision Transformer")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the released checkpoints: Hub repo, params, GMACs, paper top-1")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'cvt_13*'")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("flops", help="count multiply-accumulates by the paper's convention")
    p.add_argument("model")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's native)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="model overrides, e.g. stride_kv=1")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("export", help="export to ONNX or TorchScript (dynamic batch and size), checked against PyTorch")
    p.add_argument("--model", default=None, help="a name from `cvt models`; needed without --checkpoint, or for "
                                                 "a bare state dict (default: the one the checkpoint names)")
    p.add_argument("--checkpoint", default=None, help="weights: any that `cvt predict` takes (an official .pth, a "
                   ".safetensors file, a Hugging Face or save_pretrained folder, a `cvt train` checkpoint); "
                   "without it the weights are random")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    p.add_argument("--output", required=True, help="the file to write (e.g. cvt_13.onnx)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed difference from the PyTorch logits")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("attention", help="draw the class token's attention and attention rollout over an image")
    p.add_argument("image", help="an image file (any format Pillow reads)")
    p.add_argument("--model", required=True, help="a name from `cvt models`")
    p.add_argument("--checkpoint", default=None, help="weights: an official .pth, .safetensors or a model directory")
    p.add_argument("--output", required=True, help="the figure to write (e.g. attention.png)")
    p.add_argument("--img-size", type=int, nargs="+", metavar="N", default=None,
                   help="input size: N or H W (default: the model's native)")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("profile", help="per-stage params, MACs, tokens and activation memory")
    p.add_argument("--model", required=True, help="a name from `cvt models`")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's native)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="model overrides, e.g. stride_kv=1")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("convert", help="convert weights: official .pth / .safetensors / Hugging Face / ours")
    p.add_argument("checkpoint", help="an official .pth, a .safetensors file, a Hugging Face CvT directory, a "
                                      "save_pretrained directory (the format is detected) or a Hugging Face Hub "
                                      "repo id (owner/name, e.g. microsoft/cvt-13), downloaded")
    p.add_argument("--output", required=True, help="a directory (--to cvt or hf) or a .safetensors file")
    p.add_argument("--to", choices=("cvt", "hf", "safetensors"), default=None,
                   help="cvt: a save_pretrained directory; hf: a directory transformers' "
                        "CvtForImageClassification.from_pretrained loads; safetensors: one file in the official "
                        "names (default: safetensors when --output ends in .safetensors, else cvt)")
    p.add_argument("--from", dest="source_format", choices=("official", "hf", "cvt"), default=None,
                   help="require the checkpoint to be of this kind (official: a .pth or .safetensors state dict)")
    p.add_argument("--model", default=None, help="a name from `cvt models`; needed for an official checkpoint, "
                                                 "which does not say which model it is (default for a released "
                                                 "checkpoint's repo: its model)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="a new classifier size (the head is re-initialised); default: the checkpoint's")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="model overrides, e.g. act_layer=gelu")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("ablate", help="run one of the paper's ablation studies: table and plot per variant")
    p.add_argument("study", choices=list(STUDIES))
    p.add_argument("--config", default=None, help="the training recipe (YAML), e.g. configs/ablate_digits.yaml")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.epochs=5")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant: config seed, +1, ... (default 3)")
    p.add_argument("--output", default=None, help="the study's directory (default runs/<name>_ablate_<study>); "
                                                  "finished runs in it are not trained again")
    p.add_argument("--dry-run", action="store_true",
                   help="print each variant's params and GMACs @224 only (default model: cvt_13_224)")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("train", help="train or fine-tune (no arguments: the digits default run on the CPU)")
    p.add_argument("--config", default=None, help="a YAML recipe (configs/); default: the built-in digits run")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. train.lr=1e-3 model.args.depths=[1,2,10]")
    p.add_argument("--output", default=None, help="output directory (default: runs/<name>)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue a run exactly: from OUTPUT/last.pth, or from PATH")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--overwrite", action="store_true", help="delete the run already in --output first (without "
                                                             "it, a new run into a run's folder is refused)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1, top-5 and loss of a checkpoint on a held-out split")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="a checkpoint written by `cvt train`, or any that create_model "
                         "reads (then say --data)")
    weights.add_argument("--pretrained", action="store_true", help="the released weights of --model, downloaded "
                         "from the Hugging Face Hub (then say --data)")
    p.add_argument("--model", default=None, help="zoo name (default: the one the checkpoint names); with "
                   "--pretrained a name or name.tag (cvt.list_pretrained())")
    p.add_argument("--data", default=None, choices=DATASETS,
                   help="the dataset (default: the data a `cvt train` checkpoint was trained on)")
    p.add_argument("--root", default=None, help="the dataset's local folder")
    p.add_argument("--img-size", type=int, default=None, help="default: the training size, else the model's")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--bad-images", choices=BAD_IMAGES, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify images: top-k labels and probabilities")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", default=None, help="local weights (default: the released weights of --model, "
                                                      "downloaded from the Hugging Face Hub)")
    p.add_argument("--model", default=None, help="a name or name.tag (cvt.list_pretrained()); with --checkpoint "
                                                 "a name, by default the one the checkpoint names")
    p.add_argument("--topk", type=int, default=5, help="the best N predictions per image (N >= 1; all of them "
                                                       "when the model has fewer classes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("shards", help="write an image folder as WebDataset tar shards (data.dataset=wds), checked")
    p.add_argument("folder", help="FOLDER/train/<class>/* and FOLDER/val/<class>/*, or FOLDER/<class>/* (a training "
                                  "split alone)")
    p.add_argument("--output", required=True, help="a new or empty folder for the shards and their index.json")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="images per shard (default 1000); for training on R ranks with W loader workers each, "
                        "write a multiple of R x W shards so that each epoch reads every image once")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="for a folder without val/: hold this share of each class out as the val shards (default: "
                        "none; data.val_fraction then holds out when reading, from the train shards)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order the images are shuffled into shards in")
    p.set_defaults(func=cmd_shards)

    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="on an error, show its whole traceback")
    return parser


# The errors the library raises on purpose, with a message that names the problem and the fix: the CLI prints the
# message alone. Any other error is printed with its type, and --debug shows its traceback.
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError)


def error_line(error: BaseException) -> str:
    """One line saying what went wrong."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [repr(error)]
    if "Original Traceback (most recent call last):" in lines:  # re-raised from a DataLoader worker
        return lines[-1]  # the worker's error, "TypeName: message"
    message = " ".join(lines)
    if isinstance(error, EXPECTED_ERRORS):
        return message
    return f"{type(error).__name__}: {message} (run again with --debug for the traceback)"


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may stand anywhere among the options: argparse leaves those after the first option over.
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(overrides) < len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if args.debug:
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def entry_point() -> None:
    """The `cvt` command (and `python -m cvt`): the process's own settings, then `main`. glibc is told to keep
    freed memory, which every model runs faster with (cvt.process, BENCHMARKS.md); a program calling `main`
    makes its own choice."""
    from .process import keep_freed_memory

    keep_freed_memory()
    main()


if __name__ == "__main__":
    entry_point()
