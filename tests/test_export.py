"""`pe-rank export`: tracked configs stay in sync, ONNX parity is checked, TensorRT fails cleanly here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFORMANCE
from pe_rank_export.configs import all_configs, read_config, to_text

REPO = Path(__file__).resolve().parents[1] / "model_repository"


def test_tracked_configs_are_what_export_writes_for_the_default_target():
    for name, config in all_configs("torch", gpu=False).items():
        assert (REPO / name / "config.pbtxt").read_text() == to_text(config), f"{name}: run `pe-rank export` and commit"
        assert read_config(REPO / name / "config.pbtxt") == config  # and it reads back as the same message


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pe_rank", "export", "--model", str(CONFORMANCE / "tiny-a"), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("target", ["python", "onnxruntime"])
def test_onnx_targets_report_parity_and_write_models(tmp_path, target):
    proc = run_export("--repository", str(tmp_path), "--target", target)
    assert proc.returncode == 0, proc.stderr
    assert "ONNX vs PyTorch on 66 passages" in proc.stdout
    for model in ("pe_encoder", "pe_projector"):
        assert (tmp_path / model / "1" / "model.onnx").stat().st_size > 0
    platform = (tmp_path / "pe_encoder" / "config.pbtxt").read_text()
    assert ('platform: "onnxruntime_onnx"' in platform) == (target == "onnxruntime")
    assert (tmp_path / "pe_llm" / "1" / "checkpoint" / "config.json").exists()


def test_fp16_export_holds_its_bound(tmp_path):
    proc = run_export("--repository", str(tmp_path), "--target", "python", "--dtype", "fp16")
    assert proc.returncode == 0, proc.stderr
    assert "ONNX vs PyTorch" in proc.stdout


def test_tensorrt_without_gpu_is_a_one_line_error(tmp_path):
    proc = run_export("--repository", str(tmp_path), "--target", "tensorrt")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: target tensorrt needs")
    assert "Traceback" not in proc.stderr


def test_tensorrt_on_cpu_instances_is_refused_before_anything_is_written(tmp_path):
    """Triton's TensorRT backend refuses KIND_CPU, so `--target tensorrt --cpu` never writes a repository."""
    proc = run_export("--repository", str(tmp_path / "r"), "--target", "tensorrt", "--cpu")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: target tensorrt needs GPU instances: Triton's TensorRT backend refuses "
                                   "KIND_CPU (drop --cpu, or use --target onnxruntime for CPU instances)")
    assert not (tmp_path / "r").exists()


def test_export_of_a_non_checkpoint_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pe_rank", "export", "--model", str(tmp_path),
                           "--repository", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config.json: missing" in proc.stderr
