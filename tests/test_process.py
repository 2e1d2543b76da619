"""The library changes nothing process-wide: not the allocator's behaviour, not torch's global flags, not the
environment. Process settings are the application's (`cvt.process`, which the `cvt` command calls)."""
import json
import subprocess
import sys
from pathlib import Path

# Runs in a fresh interpreter, so that nothing earlier in the test session has touched the process.
PROBE = r'''
import json, os, resource, sys, warnings
import torch
# The libraries cvt uses change the process as they are imported (scikit-learn sets KMP_* variables, torch's
# inductor TORCHINDUCTOR_CACHE_DIR, scipy and sympy add warning filters): imported first, they are not counted.
import matplotlib.figure, sklearn.datasets, sklearn.model_selection, timm, tqdm

def fresh_page_faults():
    """Minor page faults of a 64 MiB tensor allocated after one of the same size was freed, the fewest of three
    tries: glibc maps such a block fresh each time (and pays a fault per 4 KiB page) unless something keeps freed
    memory, and then one of the first allocations after the setting may still come fresh."""
    faults = []
    for _ in range(3):
        torch.ones(2**24)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(2**24)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(faults)

def flags():
    return {
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "default_dtype": str(torch.get_default_dtype()), "grad": torch.is_grad_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(), "anomaly": torch.is_anomaly_enabled(),
        "cudnn": [torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32],
        "cuda_tf32": torch.backends.cuda.matmul.allow_tf32, "mkldnn": torch.backends.mkldnn.enabled,
        "cvt_ops": sorted(op for op in torch._C._dispatch_get_all_op_names() if op.startswith("cvt::")),
        "pyplot": "matplotlib.pyplot" in sys.modules, "warning_filters": len(warnings.filters),
        "environment": dict(os.environ),
    }

state = {"before": {"flags": flags(), "faults": fresh_page_faults()}}
sys.path.insert(0, sys.argv[1])
STEPS = sys.argv[2].split(",")
if "keep_freed_memory" in STEPS:
    import cvt.process
    cvt.process.keep_freed_memory()
if "library" in STEPS:
    import cvt, cvt.engine, cvt.inspect, cvt.export, cvt.hf
    from helpers import TINY
    torch.manual_seed(0)
    model = cvt.create_model("cvt_13_224", num_classes=10, img_size=32, **TINY)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        cvt.optimize_for_inference(model, compile=False)(x)
    loader = torch.utils.data.DataLoader([(x[i], i) for i in range(4)], batch_size=2,
                                         collate_fn=lambda b: (*torch.utils.data.default_collate(b), 0))
    cvt.engine.evaluate(model, loader, torch.device("cpu"))
    config = cvt.engine.load_config(None, ["train.epochs=1", "train.steps=2", "train.progress=false",
                                           "train.batch_size=16"])
    cvt.engine.train(config, sys.argv[3])
    cvt.count_macs(cvt.optimize_for_inference(model), 32)
state["after"] = {"flags": flags(), "faults": fresh_page_faults()}
print(json.dumps(state))
'''


def probe(tmp_path: Path, steps: str) -> dict:
    tests = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", PROBE, str(tests), steps, str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_inference_evaluation_and_a_training_step_leave_the_process_as_it_was(tmp_path):
    state = probe(tmp_path, "library")
    assert state["after"]["flags"] == state["before"]["flags"]
    assert state["before"]["flags"]["cvt_ops"] == []
    # glibc still returns large freed blocks to the system: no allocator cache, no malloc option changed
    assert state["after"]["faults"] >= 2**24 * 4 // 4096 > 0


def test_the_application_setting_is_seen_by_the_same_probe(tmp_path):
    """`cvt.process.keep_freed_memory()` (what the `cvt` command calls) does change the process, and the probe
    above sees it: the fresh 64 MiB tensor then costs next to no page faults."""
    state = probe(tmp_path, "keep_freed_memory")
    assert state["before"]["faults"] >= 2**24 * 4 // 4096
    assert state["after"]["faults"] < 1000
