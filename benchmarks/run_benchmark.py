"""CvT implementations side by side (ours eager, ours fastest, Hugging Face, official-style): JSON + markdown.

    python benchmarks/run_benchmark.py --model cvt_13_224 --batch-size 16 --threads 2

Takes every option of `cvt benchmark` (see `cvt benchmark --help`); the results go to benchmarks/results/
unless `--out` says otherwise. BENCHMARKS.md records the runs.
"""
import sys
from pathlib import Path

from cvt.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(Path(__file__).resolve().parent / "results")]
    main(["benchmark", *args])
