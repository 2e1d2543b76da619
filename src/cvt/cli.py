"""The `cvt` command (also `python -m cvt`): one sub-command per job, each a thin layer over the library."""
from __future__ import annotations

import argparse
import sys


def cmd_models(args: argparse.Namespace) -> None:
    import torch

    from .flops import count_macs, count_params
    from .model import ZOO, create_model, list_models

    rows = [("model", "params", "GMACs", "resolution", "paper top-1", "pre-training")]
    for name in list_models(args.pattern):
        with torch.device("meta"):  # shapes only: counting needs no weights
            model = create_model(name)
        meta = ZOO[name][1]
        size = meta["input_size"][-1]
        rows.append((name, f"{count_params(model):,}", f"{count_macs(model, size) / 1e9:.2f}", str(size),
                     f"{meta['paper_top1']:.1f}", meta["pretraining"]))
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


def print_table(rows: list[tuple[str, ...]]) -> None:
    """A markdown table: readable in a terminal and pasteable into docs."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(rows[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows[1:]:
        print(line(r))


def parse_overrides(pairs: list[str] | None) -> dict:
    """`key=value` pairs with YAML-typed values (`drop_path_rate=0.2`, `stride_kv=[2,2,1]`)."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: expected key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvt", description="CvT: Convolutional vision Transformer")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the model zoo: params, GMACs, paper top-1")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'cvt_13*'")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("flops", help="count multiply-accumulates by the paper's convention")
    p.add_argument("model")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's native)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="model overrides, e.g. stride_kv=1")
    p.set_defaults(func=cmd_flops)

    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
