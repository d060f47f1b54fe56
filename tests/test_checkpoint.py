"""Loading released-layout checkpoints, and one clear error for every user mistake."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CONFORMANCE
from pe_rank.core.checkpoint import CheckpointError
from pe_rank.runtime.inprocess import load_in_process
from pe_rank.runtime.model import load_model
from pe_rank.core.types import Passage, RerankRequest
from pe_rank.models.tiny import make_tiny

REQUEST = RerankRequest("how do fleas live", tuple(Passage(str(i), f"flea passage {i} about life") for i in range(12)))


def ranking(folder: Path) -> list[str]:
    _, reranker = load_in_process(folder)
    return [r.id for r in asyncio.run(reranker.rerank(REQUEST)).ranking]


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_not_a_folder_and_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not a PE-Rank checkpoint"):
        load_model(tmp_path)


def test_missing_weights_file(tmp_path):
    ckpt = copy_of(CONFORMANCE / "tiny-a", tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(ckpt)


def test_missing_key_names_file_and_key(tmp_path):
    ckpt = copy_of(CONFORMANCE / "tiny-a", tmp_path)
    state = load_file(ckpt / "model.safetensors")
    del state["model.projector.2.weight"]
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.projector\.2\.weight' is missing"):
        load_model(ckpt)


def test_mismatched_shape_names_file_and_key(tmp_path):
    ckpt = copy_of(CONFORMANCE / "tiny-a", tmp_path)
    edit_config(ckpt, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
        load_model(ckpt)


def test_unknown_projector_and_pooling(tmp_path):
    ckpt = copy_of(CONFORMANCE / "tiny-a", tmp_path)
    edit_config(ckpt, projector_type="transformer")
    with pytest.raises(CheckpointError, match="projector_type 'transformer'"):
        load_model(ckpt)
    edit_config(ckpt, projector_type="mlp2x_gelu", encoder_pooling="max")
    with pytest.raises(CheckpointError, match="encoder_pooling 'max'"):
        load_model(ckpt)


def test_missing_encoder_folder(tmp_path):
    ckpt = copy_of(CONFORMANCE / "tiny-a", tmp_path)
    edit_config(ckpt, encoder_name="jinaai/jina-embeddings-v2-base-en")
    with pytest.raises(CheckpointError, match="never downloaded"):
        load_model(ckpt)


def test_sharded_safetensors_and_bin_rank_the_same(tmp_path):
    base = ranking(CONFORMANCE / "tiny-a")
    sharded = copy_of(CONFORMANCE / "tiny-a", tmp_path / "s")
    state = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, sharded / name)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    assert ranking(sharded) == base

    as_bin = copy_of(CONFORMANCE / "tiny-a", tmp_path / "b")
    torch.save(load_file(as_bin / "model.safetensors"), as_bin / "pytorch_model.bin")
    (as_bin / "model.safetensors").unlink()
    assert ranking(as_bin) == base


def test_encoder_from_encoder_name_when_not_in_main_weights(tmp_path):
    base = ranking(CONFORMANCE / "tiny-b")
    ckpt = copy_of(CONFORMANCE / "tiny-b", tmp_path)
    state = load_file(ckpt / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("model.encoder.")}, ckpt / "model.safetensors")
    assert ranking(ckpt) == base


@pytest.mark.parametrize("projector,pooling", [("linear", "last_token"), ("identity", "cls"), ("mlp3x_gelu", "mean")])
def test_projector_and_pooling_variants_load_and_rank(tmp_path, projector, pooling):
    width = 64 if projector == "identity" else 32  # identity needs encoder width == LLM width
    ckpt = make_tiny(tmp_path / "t", seed=1, projector_type=projector, pooling=pooling, encoder_hidden=width)
    assert sorted(ranking(ckpt), key=int) == [str(i) for i in range(12)]


def test_identity_projector_size_check(tmp_path):
    ckpt = copy_of(CONFORMANCE / "tiny-a", tmp_path)
    edit_config(ckpt, projector_type="identity")
    with pytest.raises(CheckpointError, match="identity projector needs embedding_size == hidden_size"):
        load_model(ckpt)


def test_embed_llama_loads(tmp_path):
    ckpt = copy_of(CONFORMANCE / "tiny-a", tmp_path)
    edit_config(ckpt, model_type="embed_llama")
    model = load_model(ckpt)
    assert type(model.llm).__name__ == "LlamaModel"


def test_cli_prints_one_line_error_without_traceback(tmp_path):
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"query": "q", "passages": [{"id": "a", "text": "x"}]}))
    proc = subprocess.run([sys.executable, "-m", "pe_rank", "rerank", "--model", str(tmp_path / "nope"),
                           "--input", str(req)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr
