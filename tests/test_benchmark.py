"""The official-style reference computes our model's function; the benchmark runs end to end on a tiny model."""
import copy
import json
import subprocess
import sys

import torch
import torch.nn as nn

import cvt
from cvt.benchmark import MODES, OfficialStyleCvT
from cvt.cli import main
from helpers import TINY, official_model


def test_official_style_reproduces_the_official_outputs():
    for name in ("tiny_dw_bn", "tiny_avg"):
        model, io = official_model(name)
        official = OfficialStyleCvT(model).eval()
        with torch.no_grad():
            for x in ("x_64x64", "x_72x56"):
                torch.testing.assert_close(official(io[f"input.{x}"]), io[f"logits.{x}"], atol=1e-5, rtol=0)


def test_official_style_trains_like_our_model():
    torch.manual_seed(0)
    model = cvt.CvT(num_classes=10, drop_path_rate=0.0, **TINY).train()
    official = OfficialStyleCvT(copy.deepcopy(model)).train()
    x, y = torch.randn(3, 3, 40, 48), torch.tensor([1, 4, 7])
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(official(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), official.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_benchmark_smoke_run_writes_json_and_markdown(tmp_path, capsys):
    main(["benchmark", "--model", "cvt_13_224", "--img-size", "32", "--batch-size", "2", "--repeats", "1",
          "--warmup", "0", "--no-compile", "--device", "cpu", "--out", str(tmp_path),
          "--set", "embed_dims=[16,32,48]", "depths=[1,2,3]", "num_heads=[1,2,3]", "num_classes=10"])
    printed = capsys.readouterr().out
    stem = f"cvt_13_224_cpu_float32_b2_t{torch.get_num_threads()}"
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert [row["mode"] for row in report["results"]] == list(MODES)
    for row in report["results"]:
        for key in ("infer_img_s", "latency_ms", "train_img_s"):
            assert row[key] > 0, (row["mode"], key)
    assert set(report["ratios"]) >= {"infer_throughput_fast_over_hf", "infer_throughput_fast_over_official-style",
                                     "train_throughput_fast_over_official-style"}
    assert report["threads"] == torch.get_num_threads() and report["versions"]["torch"] == torch.__version__
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "| ours-fast |" in markdown and "| official-style |" in markdown and markdown in printed
    # the recorded command reproduces the run, zero-valued options included
    assert "--warmup 0 --repeats 1 --no-compile" in report["command"]


def test_benchmark_keeps_freed_memory_and_still_measures_peaks(tmp_path):
    # A process of its own: the allocator setting is process-wide.
    subprocess.run([sys.executable, "-m", "cvt", "benchmark", "--model", "cvt_13_224", "--img-size", "32",
                    "--batch-size", "2", "--repeats", "1", "--warmup", "1", "--no-compile", "--no-latency",
                    "--device", "cpu", "--threads", "1", "--keep-freed-memory",
                    "--modes", "ours-eager", "official-style",
                    "--out", str(tmp_path), "--set", "embed_dims=[16,32,48]", "depths=[1,1,2]",
                    "num_heads=[1,2,3]", "num_classes=10"], check=True, capture_output=True)
    report = json.loads((tmp_path / "cvt_13_224_cpu_float32_b2_t1_keep-freed-memory.json").read_text())
    assert report["keep_freed_memory"] is True and "--keep-freed-memory" in report["command"]
    for row in report["results"]:
        assert row["infer_img_s"] > 0 and row["train_img_s"] > 0
        assert row["infer_peak_mib"] is not None and row["train_peak_mib"] is not None


def test_cpu_peak_memory_counts_what_the_buffer_cache_held_before_the_call():
    # A process of its own: exact allocation tracking sets glibc's thresholds for the whole process.
    script = "\n".join([
        "import torch",
        "from cvt.benchmark import _peak_memory_mib, _track_cpu_allocations_exactly",
        "from cvt.fast import reuse_cpu_buffers",
        "def call():",
        "    with reuse_cpu_buffers():",
        "        torch.ones(2**24)",  # 64 MiB
        "call()",  # the cache now holds that buffer: a measured call must still count it
        "_track_cpu_allocations_exactly()",
        "print(_peak_memory_mib(call, torch.device('cpu')))",
    ])
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert float(out.split()[-1]) >= 60
