"""The server-step benchmark's CLI on CPU, the hardware configs, and the launch scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from smsd_jax import validate

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["benchmarks/gpu_check.sh", "benchmarks/gpu_env.sh", "launch/gpu_study.sh",
           "benchmarks/fetch_gpu_wheels.sh", "launch/gpu_host.sh",
           "launch/tpu_pod.sh", "launch/setup.sh"]


def test_server_step_cli_writes_its_json_on_cpu(tmp_path):
    out = tmp_path / "server_step.json"
    # One CPU device (not the tests' 8): the benchmark's own default on a machine like this.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    # No compile part: torch.compile alone would take a minute where torch is installed.
    subprocess.run([sys.executable, "-m", "benchmarks.server_step", "--modes=masked",
                    "--impls=jax,eager", f"--out={out}"], cwd=ROOT, env=env, check=True,
                   timeout=300)
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and "CPU smoke run" in doc["note"]
    assert doc["matmul"]["tflops"] > 0 and doc["flops_formula"]
    (result,) = doc["results"]
    assert (result["size"], result["mode"]) == ("small4", "masked")
    # base.py's views of 49 patches: site keep 0.5, global 0.75, local 0.25, 4 local views.
    assert result["tokens"] == dict(patches=49, sample=24, num_samples=2, global_view=18,
                                    local_view=6, num_local=4)
    entry = result["jax"]["default"]
    assert entry["images_per_s"] > 0 and entry["mfu"] > 0 and entry["compile_s"] > 0
    assert entry["model_flops_per_step"] == pytest.approx(
        result["model_flops_per_image"] * entry["batch_size"])
    assert entry["xla_flops_per_step"] > 0
    # The formula counts matmuls only; XLA also counts softmax, norms, the optimizer, ...
    assert 0.5 <= entry["xla_over_formula"] <= 2.0
    peer = result["peer"]
    if isinstance(peer, str):
        assert peer.startswith("skipped: ")
    else:  # torch and timm are installed here
        assert peer["eager"]["images_per_s"] > 0 and entry["ratio_vs_eager"] > 0


def _load_config(spec: str):
    """A config as `launch.main` loads it: through ml_collections' config flag."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
    flag_values(["launch", f"--config={spec}"])
    return flag_values.config


@pytest.mark.parametrize("name", ["gpu_host", "tpu_pod"])
def test_hardware_configs_are_valid(name):
    path = ROOT / "configs" / f"{name}.py"
    assert "Expected throughput: not yet measured; run benchmarks/gpu_check.sh." in (
        " ".join(path.read_text().split()))
    config = _load_config(str(path))
    validate.check_config(config)  # 8 simulated devices divide the global batch
    assert (config.model.size, config.model.patch_size, config.data.image_size) == ("B", 16, 224)
    assert config.model.dtype == "bfloat16"
    assert config.model.attention == ("cudnn" if name == "gpu_host" else "")
    validate.check_config(_load_config(f"{path}:runlocal"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
