"""README.md's quick start runs as written, so that a command shown there cannot break without a test failing.

The quick start is every fenced ```bash and ```python block under README.md's "## Quick start" heading (up to the
next "## " heading), read from the README when the test runs. Its commands run in the order the README gives them,
in a scratch folder, so later ones use what earlier ones wrote, as a reader's would:

- `cvt ...` runs through `cvt.cli.main`, after SUBSTITUTIONS (below) put stand-ins in place of what needs the
  network or big data; a `cvt train` also gets TINY_TRAIN appended, which cuts the recipe to seconds on a CPU;
- a `python` block is executed, after PYTHON_SUBSTITUTIONS;
- `torchrun ...` and `srun ... torchrun ...` need GPUs and ImageNet, so they are checked instead: torchrun's own
  parser takes the launcher's options, and the `cvt train` it starts parses and loads its recipe and overrides;
- a line that only sets a shell variable (`HOST=$(...)`) is skipped.

Beyond the quick start: every `cvt SUBCOMMAND` named anywhere in README.md is one the parser has, every `cvt`
command in its bash blocks parses, and every relative link in README.md and docs/*.md names a file in the repo.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cvt
from cvt.cli import build_parser, main
from cvt.engine import load_config
from helpers import TINY

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
QUICK_START = "Quick start"

# README text -> stand-in, applied in this order to each quick-start `cvt` command before it runs. The stand-ins
# are made by the `stand_ins` fixture; {name} is filled from it.
SUBSTITUTIONS = [
    # The released weights of cvt_13_224.ms_in1k (Hugging Face Hub repo microsoft/cvt-13): a tiny model in
    # CvT-13's layout with 1000 classes (ImageNet's labels), saved by save_pretrained.
    ("--model cvt_13_224.ms_in1k", "--checkpoint {hub}/cvt-13"),
    # The Hub repo of cvt_13_384.ms_in22k_ft_in1k: the same, saved as cvt_13_384, for `cvt convert`.
    ("microsoft/cvt-13-384-22k", "{hub}/cvt-13-384-22k"),
    # The reader's image: a 48x40 RGB image the test writes.
    ("cat.jpg", "{image}"),
    # The reader's own images: 3 classes of 8 small images each in train/ and no val/, so data.val_fraction holds
    # some out.
    ("my_images", "{images}"),
    # The recipes, from this checkout (the commands run in a scratch folder).
    ("configs/", "{repo}/configs/"),
]
# Appended to each quick-start `cvt train` (a later override wins): the recipe's size, batch and length cut down,
# so that the run takes seconds on a CPU. The tiny stand-in weights bring a tiny architecture with them;
# model.args.img_size makes 32 px the model's native size too, the size `cvt export` checks at.
TINY_TRAIN = ["data.img_size=32", "model.args.img_size=32", "train.batch_size=4", "train.steps=2", "data.workers=0",
              "train.progress=false"]
# In the quick start's python blocks: a tiny model in the same layout, with random weights, instead of the download.
PYTHON_SUBSTITUTIONS = [
    ("pretrained=True", "pretrained=False, " + ", ".join(f"{k}={v}" for k, v in TINY.items())),
    ("cat.jpg", "{image}"),
]
# Shell variables the multi-node launch uses (set by SLURM, or by the line before it): stand-ins for the check.
SHELL_VARIABLES = {"$HOST": "node0", "$SLURM_JOB_ID": "1234"}


def section(text: str, heading: str) -> str:
    """The text under the "## heading" line, up to the next "## " heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.M | re.S)


def commands(block: str) -> list[list[str]]:
    """The shell commands of a bash block: continuation lines joined, comments dropped, split as the shell would."""
    joined = re.sub(r"\\\n", " ", block)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def is_assignment(words: list[str]) -> bool:
    return re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]) is not None


def substitute(text: str, table: list[tuple[str, str]], stand_ins: dict[str, str]) -> str:
    for readme_text, stand_in in table:
        text = text.replace(readme_text, stand_in.format(**stand_ins))
    return text


def check_parses(args: list[str]) -> None:
    """`cvt ARGS` parses as `cvt.cli.main` parses it (KEY=VALUE overrides anywhere), and a `cvt train`'s recipe and
    overrides load."""
    parser = build_parser()
    try:
        parsed, extra = parser.parse_known_args(args)
    except SystemExit:
        pytest.fail(f"`cvt {shlex.join(args)}` does not parse")
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    assert len(overrides) == len(extra) and (not overrides or hasattr(parsed, "overrides")), \
        f"`cvt {shlex.join(args)}`: unrecognized arguments {extra}"
    if parsed.command == "train":
        listed = [*parsed.overrides, *overrides]
        if isinstance(parsed.resume, str) and "=" in parsed.resume:  # `--resume KEY=VALUE`, as cmd_train reads it
            listed.append(parsed.resume)
        config = parsed.config and str(REPO / parsed.config)
        load_config(config, listed)


@pytest.fixture
def stand_ins(tmp_path) -> dict[str, str]:
    hub = tmp_path / "hub"
    for name, folder in (("cvt_13_224", "cvt-13"), ("cvt_13_384", "cvt-13-384-22k")):
        cvt.create_model(name, **TINY).save_pretrained(hub / folder)
    rng = np.random.default_rng(0)
    image = tmp_path / "cat.png"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    images = tmp_path / "my-images"
    for c, name in enumerate(("cat", "dog", "fish")):
        (images / "train" / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.normal(60 + 60 * c, 30, (36, 36, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / "train" / name / f"{i}.png")
    return {"hub": str(hub), "image": str(image), "images": str(images), "repo": str(REPO)}


def test_the_quick_start_runs_as_written(stand_ins, tmp_path, monkeypatch, capsys):
    quick_start = section(README.read_text(), QUICK_START)
    bash, python = code_blocks(quick_start, "bash"), code_blocks(quick_start, "python")
    assert bash and python, "the quick start has no ```bash or ```python blocks"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # ONNX's exporter: TorchScript's, behind the same `cvt export --format onnx` path (loading, the check, the
    # metadata line). torch.onnx.export alone takes about 20 s on 2 CPU cores; tests/test_export.py runs it.
    import cvt.export

    monkeypatch.setitem(cvt.export._EXPORTERS, "onnx", cvt.export._EXPORTERS["torchscript"])
    ran, checked = [], []
    for words in (w for block in bash for w in commands(block)):
        if is_assignment(words):
            continue
        if words[0] == "cvt":
            args = shlex.split(substitute(shlex.join(words[1:]), SUBSTITUTIONS, stand_ins))
            if args[0] == "train":
                args += TINY_TRAIN
            try:
                main(args)
            except SystemExit as e:
                captured = capsys.readouterr()
                pytest.fail(f"`{shlex.join(words)}` failed (exit {e.code}) as `cvt {shlex.join(args)}`:\n"
                            f"{captured.out[-2000:]}\n{captured.err[-2000:]}")
            ran.append(words[1])
        elif words[0] in ("torchrun", "srun"):
            check_launch(words)
            checked.append(words[0])
        else:
            pytest.fail(f"the quick start's `{shlex.join(words)}` is neither a cvt command nor a torchrun launch: "
                        "teach tests/test_readme.py how to run or check it")
    for block in python:
        code = substitute(block, PYTHON_SUBSTITUTIONS, stand_ins)
        exec(compile(code, f"{README.name}: {QUICK_START}", "exec"), {"__name__": "readme"})
    # What the quick start promises: weights downloaded, fine-tuned on a folder, evaluated, exported, launched.
    assert {"predict", "convert", "train", "eval", "export"} <= set(ran), ran
    assert {"torchrun", "srun"} <= set(checked), checked
    assert (work / "my_model.onnx").is_file()


def check_launch(words: list[str]) -> None:
    """A torchrun launch (under srun or not): torchrun's parser takes it, and it starts a `cvt` command that parses."""
    from torch.distributed.run import get_args_parser

    assert "torchrun" in words, f"`{shlex.join(words)}` launches no torchrun"
    launch = words[words.index("torchrun") + 1:]
    for variable, value in SHELL_VARIABLES.items():
        launch = [w.replace(variable, value) for w in launch]
    unset = [w for w in launch if "$" in w]
    assert not unset, f"`{shlex.join(words)}`: no stand-in for {unset} in SHELL_VARIABLES"
    try:
        torchrun = get_args_parser().parse_args(launch)
    except SystemExit:
        pytest.fail(f"torchrun does not take `{shlex.join(launch)}`")
    assert torchrun.module and torchrun.training_script == "cvt", f"`{shlex.join(words)}` does not run `-m cvt`"
    check_parses(torchrun.training_script_args)


def test_every_cvt_command_in_the_readme_parses():
    text = README.read_text()
    found = 0
    for words in (w for block in code_blocks(text, "bash") for w in commands(block)):
        if words[0] == "cvt":
            check_parses(words[1:])
            found += 1
    assert found


def test_every_cvt_subcommand_the_readme_names_exists():
    text = README.read_text()
    # In code: fenced blocks and inline `...` spans; "cvt" followed by a word (not "cvt.create_model", "import cvt").
    code = "\n".join(code_blocks(text, r"\w*") + re.findall(r"`([^`\n]+)`", text))
    named = set(re.findall(r"(?<![\w./-])cvt[ \t]+([a-z][\w-]*)", code))
    subcommands = set(next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices)
    assert named, "the README names no cvt subcommand"
    assert named <= subcommands, f"README.md names cvt subcommands the parser lacks: {sorted(named - subcommands)}"


@pytest.mark.parametrize("page", [README, *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_every_relative_link_names_a_file_in_the_repo(page):
    text = page.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    for link in relative:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve()
        assert target.is_relative_to(REPO), f"{page.name} links {link}, outside the repository"
        assert target.exists(), f"{page.name} links {link}, which is not in the repository"
        if anchor and target.suffix == ".md":
            assert anchor in heading_anchors(target), f"{page.name} links {link}: {path} has no such heading"
    if page == README:
        assert any(link.startswith("docs/") for link in relative), "README.md links no page of docs/"


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a markdown page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.M | re.S)
    headings = re.findall(r"^#+ +(.+?) *$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
