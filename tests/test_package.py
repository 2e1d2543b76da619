"""The package as a user imports it: `import cvt` is quick and lazy, every public module is an attribute after it,
and the CPU runs of the commands import nothing that prints CUDA notes (torch.utils.cpp_extension, which inductor
needs only to compile: `torch.compile`, `optimize_for_inference(compile=True)`)."""
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import cvt

# In a fresh interpreter: `import cvt`, then a CPU run of the commands that take weights, as `cvt` runs them.
FRESH_RUN = r"""
import json, sys
from pathlib import Path

import cvt

after_import = sorted(m for m in sys.modules if m.startswith("cvt"))
from cvt.cli import main

out = Path(sys.argv[1])
cvt.create_model("cvt_13_224", num_classes=3, embed_dims=[16, 32, 48], depths=[1, 1, 2], num_heads=[1, 2, 3],
                 img_size=32).save_pretrained(out / "weights")
main(["predict", str(out / "image.png"), "--checkpoint", str(out / "weights"), "--device", "cpu"])
main(["export", "--checkpoint", str(out / "weights"), "--format", "torchscript", "--output", str(out / "model.pt")])
print(json.dumps({"after_import": after_import, "cpp_extension": "torch.utils.cpp_extension" in sys.modules}))
"""


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh")
    Image.new("RGB", (40, 30), (120, 30, 200)).save(out / "image.png")
    # A CUDA toolkit where torch finds one, the way a machine with CUDA installed (but no GPU) has it:
    # torch.utils.cpp_extension prints "No CUDA runtime is found, using CUDA_HOME=..." when it is imported.
    (out / "cuda").mkdir()
    env = dict(os.environ, CUDA_HOME=str(out / "cuda"))
    done = subprocess.run([sys.executable, "-c", FRESH_RUN, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_import_cvt_loads_no_command_modules(fresh_run):
    result, _ = fresh_run
    loaded = {m.removeprefix("cvt.") for m in result["after_import"]} - {"cvt"}
    assert loaded <= {"accel", "flops", "model", "weights", "files"}, loaded
    assert not loaded & {"engine", "data", "export", "hf", "inspect", "predict", "cli", "ablations"}


def test_cpu_runs_import_no_cpp_extension_and_print_no_cuda_note(fresh_run):
    result, stderr = fresh_run
    assert not result["cpp_extension"]
    assert "No CUDA runtime" not in stderr, stderr


def test_every_public_module_is_an_attribute_of_the_package():
    package = Path(cvt.__file__).parent
    assert set(cvt.MODULES) == {m.name for m in pkgutil.iter_modules([str(package)])} - {"__main__"}
    for name in cvt.MODULES:
        module = getattr(cvt, name)
        assert module is sys.modules[f"cvt.{name}"] and name in dir(cvt)
    assert callable(cvt.inspect.attention_maps) and callable(cvt.export.export_model)
    assert callable(cvt.weights.load_checkpoint) and callable(cvt.hf.from_hf) and callable(cvt.engine.train)
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        cvt.nonexistent
