"""The scripts in benchmarks/: the official-style reference computes our model's function, benchmark.py runs end to
end on a tiny model, the machine is named precisely, and fast_paths.py, gemm.py and data_pipeline.py run."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import cvt
from helpers import TINY, official_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchmark  # noqa: E402
import data_pipeline  # noqa: E402
import fast_paths  # noqa: E402
import gemm  # noqa: E402
from machine import describe_device  # noqa: E402

# A tiny CvT-13 that transformers' CvT can hold too (it needs depths[i] > i), at 32 x 32.
TINY_RUN = ["--model", "cvt_13_224", "--img-size", "32", "--batch-size", "2", "--repeats", "1", "--warmup", "0",
            "--no-compile", "--device", "cpu", "--set", "embed_dims=[16,32,48]", "depths=[1,2,3]",
            "num_heads=[1,2,3]", "num_classes=10"]


def test_official_style_reproduces_the_official_outputs():
    for name in ("tiny_dw_bn", "tiny_avg"):
        model, io = official_model(name)
        official = benchmark.OfficialStyleCvT(model).eval()
        with torch.no_grad():
            for x in ("x_64x64", "x_72x56"):
                torch.testing.assert_close(official(io[f"input.{x}"]), io[f"logits.{x}"], atol=1e-5, rtol=0)


def test_official_style_trains_like_our_model():
    torch.manual_seed(0)
    model = cvt.CvT(num_classes=10, drop_path_rate=0.0, **TINY).train()
    official = benchmark.OfficialStyleCvT(copy.deepcopy(model)).train()
    x, y = torch.randn(3, 3, 40, 48), torch.tensor([1, 4, 7])
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(official(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), official.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_benchmark_prints_only_and_writes_json_and_markdown_with_out(tmp_path, monkeypatch, capsys):
    results = ROOT / "benchmarks" / "results"
    results_before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    monkeypatch.chdir(tmp_path)
    benchmark.main([*TINY_RUN, "--modes", "ours-eager", "--no-latency", "--no-train", "--no-memory"])
    printed = capsys.readouterr().out
    assert "| ours-eager |" in printed and "command: `python benchmarks/benchmark.py " in printed
    assert list(tmp_path.iterdir()) == [], "without --out nothing is written"
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == results_before

    benchmark.main([*TINY_RUN, "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    stem = f"cvt_13_224_cpu_float32_b2_t{torch.get_num_threads()}"
    report = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
    assert [row["mode"] for row in report["results"]] == list(benchmark.MODES)
    for row in report["results"]:
        for key in ("infer_img_s", "latency_ms", "train_img_s"):
            assert row[key] > 0, (row["mode"], key)
        assert row["infer_peak_mib"] >= 0 and row["train_peak_mib"] >= 0, row
    assert set(report["ratios"]) >= {"infer_throughput_fast_over_hf", "infer_throughput_fast_over_official-style",
                                     "train_throughput_fast_over_official-style"}
    assert report["threads"] == torch.get_num_threads() and report["versions"]["torch"] == torch.__version__
    assert report["device_name"] == describe_device(torch.device("cpu"))
    markdown = (tmp_path / "out" / f"{stem}.md").read_text()
    assert "| ours-fast |" in markdown and "| official-style |" in markdown and markdown in printed
    # the recorded command reproduces the run, zero-valued options included, and writes nowhere
    assert report["command"].startswith("python benchmarks/benchmark.py --model cvt_13_224 ")
    assert "--warmup 0 --repeats 1" in report["command"] and "--no-compile" in report["command"]
    assert "--out" not in report["command"]


def test_benchmark_keeps_freed_memory_and_still_measures_peaks(tmp_path):
    # A process of its own: the allocator setting is process-wide.
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--model", "cvt_13_224",
                    "--img-size", "32", "--batch-size", "2", "--repeats", "1", "--warmup", "1", "--no-compile",
                    "--no-latency", "--device", "cpu", "--threads", "1", "--keep-freed-memory",
                    "--modes", "ours-eager", "ours-fast", "--out", str(tmp_path),
                    "--set", "embed_dims=[16,32,48]", "depths=[1,1,2]", "num_heads=[1,2,3]", "num_classes=10"],
                   check=True, capture_output=True)
    report = json.loads((tmp_path / "cvt_13_224_cpu_float32_b2_t1_keep-freed-memory.json").read_text())
    assert report["keep_freed_memory"] is True and "--keep-freed-memory" in report["command"]
    for row in report["results"]:
        assert row["infer_img_s"] > 0 and row["train_img_s"] > 0
        assert row["infer_peak_mib"] > 0 and row["train_peak_mib"] > 0


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
cpu family\t: {family}
model\t\t: {model}
model name\t: {name}
flags\t\t: fpu sse4_2 {flags}

processor\t: 1
vendor_id\t: {vendor}
model name\t: a second processor, not read
"""


@pytest.mark.parametrize("vendor, family, model, name, flags, isa", [
    ("AuthenticAMD", 25, 17, "AMD EPYC", "avx2 avx512f avx512_bf16 avx512_vnni", "AVX-512, AVX512-BF16, no AMX"),
    ("GenuineIntel", 6, 143, "Intel(R) Xeon(R) Platinum 8480+", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile",
     "AVX-512, AVX512-BF16, AMX"),
    ("GenuineIntel", 6, 85, "Intel(R) Xeon(R) CPU", "avx2", "AVX2, no AVX512-BF16, no AMX"),
])
def test_the_cpu_is_named_by_vendor_family_model_and_isa(tmp_path, vendor, family, model, name, flags, isa):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(vendor=vendor, family=family, model=model, name=name, flags=flags))
    capability = torch.backends.cpu.get_cpu_capability()
    assert describe_device(torch.device("cpu"), str(cpuinfo)) == (
        f"{name} ({vendor} family {family} model {model}; {isa}; torch capability {capability})")


def test_fast_paths_checks_and_times_every_variant(capsys):
    tiny = ["--batch-size", "2", "--repeats", "1", "--no-compile", "--set", "embed_dims=[16,32,48]",
            "depths=[1,1,2]", "num_heads=[1,2,3]", "img_size=32"]
    fast_paths.main(tiny)
    fast_paths.main([*tiny, "--train"])
    printed = capsys.readouterr().out
    for row in ("plain eager", "fold_bn", "logits_only", "onednn_linears", "all eager", "accelerate_training eager"):
        assert f"| {row} |" in printed


def test_gemm_prints_both_tables(capsys):
    gemm.main(["--batch-size", "1", "--repeats", "1"])
    printed = capsys.readouterr().out
    assert "| 197 x 384 -> 1536 |" in printed and "| 2: 9 x 6 x 197 x 50 |" in printed


def test_data_pipeline_prints_every_stage_and_candidate_and_writes_markdown_only_with_out(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    data_pipeline.main(["--quick"])
    printed = capsys.readouterr().out
    for row in ("decode", "+ RandomResizedCrop", "+ flip", "+ RandAugment", "+ ToTensor, Normalize",
                "+ RandomErasing", "+ per-sample seeding", "+ collate", "Mixup/CutMix (timm Mixup)",
                *data_pipeline.CANDIDATES, "Pillow (read_image)", "torchvision decode_jpeg (a uint8 tensor)"):
        assert f"| {row} |" in printed, row
    assert f"at {data_pipeline.H100_TRAIN_IMG_S:g} training img/s one GPU needs ~" in printed
    assert describe_device(torch.device("cpu")) in printed
    assert "command: `python benchmarks/data_pipeline.py " in printed and "--out" not in printed
    assert list(tmp_path.iterdir()) == [], "without --out nothing is written"

    data_pipeline.main(["--quick", "--train-rate", "1000", "--out", str(tmp_path / "pipeline.md")])
    printed = capsys.readouterr().out
    markdown = (tmp_path / "pipeline.md").read_text()
    assert "at 1000 training img/s one GPU needs ~" in markdown and markdown in printed
