"""Typed model configs: written from Triton's ModelConfig messages, read back the same way, and what
each Python model checks in ``initialize`` is what the exporter writes."""
from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from pe_rank.triton_backend.config_check import INTERFACES
from pe_rank_export import configs

REPO = Path(__file__).resolve().parents[1] / "model_repository"
EXPORTER_IO = {"pe_tokenizer": configs.TOKENIZER_IO, "pe_encoder": configs.ENCODER_IO,
               "pe_projector": configs.PROJECTOR_IO, "pe_llm": configs.LLM_IO, "pe_rank": configs.RANK_IO}


def test_every_tracked_config_is_a_triton_model_config():
    for path in sorted(REPO.glob("*/config.pbtxt")):
        config = configs.read_config(path)
        assert isinstance(config, mc.ModelConfig) and config.name == path.parent.name
        assert config.platform or config.backend
    assert sorted(p.parent.name for p in REPO.glob("*/config.pbtxt")) == sorted(configs.MODELS)


def test_max_batch_size_is_read_as_a_model_config():
    assert configs.max_batch_size(REPO / "pe_encoder" / "config.pbtxt") == configs.MAX_BATCH
    assert configs.max_batch_size(REPO / "pe_llm" / "config.pbtxt") == 0  # absent in the text: proto default


def test_max_batch_size_reader_is_not_fooled_by_text(tmp_path):
    """A regex over the text would read the comment or miss a value written differently."""
    path = tmp_path / "config.pbtxt"
    path.write_text('# max_batch_size: 999\nname: "pe_encoder"\nplatform: "onnxruntime_onnx"\nmax_batch_size:64\n')
    assert configs.max_batch_size(path) == 64
    path.write_text('name: "pe_encoder"\nmax_batch_sise: 64\n')
    with pytest.raises(text_format.ParseError, match="max_batch_sise"):
        configs.max_batch_size(path)


def test_the_python_models_check_what_the_exporter_writes():
    """config_check.INTERFACES (what each model.py reads and writes) equals the exporter's interface:
    names, data types, dims (batch dim included) and which inputs are optional."""
    for model, (inputs, outputs) in EXPORTER_IO.items():
        extra = 1 if model in ("pe_encoder", "pe_projector") else 0  # written with max_batch_size > 0
        want_in, want_out = INTERFACES[model]
        got_in = [(s.name, mc.DataType.Name(s.data_type), len(s.dims) + extra, s.optional) for s in inputs]
        got_out = [(s.name, mc.DataType.Name(s.data_type), len(s.dims) + extra) for s in outputs]
        assert got_in == [(t.name, t.data_type, t.rank, t.optional) for t in want_in], model
        assert got_out == [(t.name, t.data_type, t.rank) for t in want_out], model
    assert set(INTERFACES) == set(EXPORTER_IO)


def test_configs_are_written_with_text_format_not_by_hand():
    """Round trip: the written text parses to the message that was written, for every target."""
    for target, gpu in (("torch", False), ("python", True), ("onnxruntime", True), ("tensorrt", True)):
        for name, config in configs.all_configs(target, gpu).items():
            assert configs.parse(configs.to_text(config)) == config, (target, name)
