"""config.pbtxt for every model, per export target, as Triton's own ``ModelConfig`` messages.

Each config is built as a ``tritonclient.grpc.model_config_pb2.ModelConfig`` (the protobuf
Triton parses config.pbtxt into) and written with protobuf's ``text_format``; anything that
needs a value back reads the file the same way (:func:`read_config`, :func:`max_batch_size`).
Nothing here imports torch: the server may import this module.

Dims: the ``torch`` target's pe_encoder and pe_projector configs are model-independent (every
feature dim -1: Triton's Python backend compares nothing with a model), so the configs tracked in
model_repository/ are exactly what ``pe-rank export --target torch`` writes on a CPU machine
(a test keeps the two in sync). The ONNX and TensorRT targets take their inputs' and outputs'
names, data types and dims from the shapes the runtime reports once it has loaded the exported
model (:mod:`.runtime_io`), and :mod:`.backend_rules` checks them with the backends' own rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

TARGETS = ("torch", "python", "onnxruntime", "tensorrt")
MODELS = ("pe_tokenizer", "pe_encoder", "pe_projector", "pe_embed", "pe_llm", "pe_rank")
MAX_BATCH = 128  # >= the service's largest window (100): a window is one pe_embed request
LLM_HEAD_CACHE = 16
# windows decoded at once by pe_llm's engine (its batch slots); more wait for a free slot
LLM_MAX_LIVE_WINDOWS = 64  # on a GPU; on the CPU the pool of keys/values would be GBs for no gain
LLM_MAX_LIVE_WINDOWS_CPU = 16
LLM_MAX_WINDOW_TOKENS = 1024  # a slot: a window's prompt plus its passages (longer windows run on their own cache)
LLM_MAX_WINDOW_PASSAGES = 100
LLM_PREFILL_BUDGET = 512  # prompt tokens prefilled per engine turn
DYNAMIC_BATCH_DELAY_US = 200

HEADER = "# Written by `pe-rank export` (export/pe_rank_export/configs.py): change the exporter, not this file.\n"


class ConfigError(ValueError):
    """A config the exporter must not write (e.g. TensorRT on CPU instances); one-line message."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as a config states it: dims without the batch dim when max_batch_size > 0."""

    name: str
    data_type: int  # a model_config_pb2.DataType value, e.g. mc.TYPE_FP32
    dims: tuple[int, ...]
    optional: bool = False


def spec(name: str, data_type: str, dims: tuple[int, ...] | list[int], optional: bool = False) -> TensorSpec:
    return TensorSpec(name, mc.DataType.Value(data_type), tuple(int(d) for d in dims), optional)


# The interface each model.py relies on (names, data types, dims); the Python models check the
# config Triton hands them against the same names and types in ``initialize``
# (pe_rank.triton_backend.config_check).
TOKENIZER_IO = ([spec("TEXT", "TYPE_STRING", [-1])],
                [spec("INPUT_IDS", "TYPE_INT64", [-1, -1]), spec("ATTENTION_MASK", "TYPE_INT64", [-1, -1])])
ENCODER_IO = ([spec("INPUT_IDS", "TYPE_INT64", [-1]), spec("ATTENTION_MASK", "TYPE_INT64", [-1])],
              [spec("EMBEDDING", "TYPE_FP32", [-1])])
PROJECTOR_IO = ([spec("ENCODER_EMBEDDING", "TYPE_FP32", [-1])], [spec("PROJECTED", "TYPE_FP32", [-1])])
EMBED_IO = ([spec("TEXT", "TYPE_STRING", [-1])],
            [spec("PROJECTED", "TYPE_FP32", [-1, -1]), spec("ENCODER_EMBEDDING", "TYPE_FP32", [-1, -1])])
LLM_IO = ([spec("PROMPT_IDS", "TYPE_INT64", [-1]), spec("PASSAGE_EMBEDS", "TYPE_FP32", [-1, -1]),
           spec("EMIT", "TYPE_INT32", [1], optional=True), spec("MODE", "TYPE_STRING", [1], optional=True)],
          [spec("ORDER", "TYPE_INT64", [-1]), spec("DECODE_STEPS", "TYPE_INT64", [1]),
           spec("CACHED_TOKENS", "TYPE_INT64", [1]), spec("PREFILL_MS", "TYPE_FP32", [1]),
           spec("DECODE_MS", "TYPE_FP32", [1])])
RANK_IO = ([spec("QUERY", "TYPE_STRING", [1]), spec("PASSAGES", "TYPE_STRING", [-1]),
            spec("WINDOW_SIZE", "TYPE_INT32", [1], optional=True), spec("STRIDE", "TYPE_INT32", [1], optional=True),
            spec("TOP_N", "TYPE_INT32", [1], optional=True), spec("MODE", "TYPE_STRING", [1], optional=True),
            spec("PRERANK", "TYPE_BOOL", [1], optional=True), spec("DEPTH", "TYPE_INT32", [1], optional=True)],
           [spec("ORDER", "TYPE_INT64", [-1])])

# what each config's header says about its parameters (text_format writes no comments)
NOTES = {
    "pe_llm": (
        "# head_cache: prompt heads (the query-independent start of a window's prompt, one per window size)\n"
        "#   whose keys/values are kept across windows and requests; 0 prefills every prompt whole.\n"
        "# max_live_windows: windows the engine decodes at once (the slots of its static KV pool); later ones wait.\n"
        "# max_window_tokens, max_window_passages: a slot's size (prompt plus passages); a longer window runs on a\n"
        "#   cache of its own, stepped alone. The pool is allocated at load: slots x tokens x the model's KV size.\n"
        "# prefill_budget: prompt tokens prefilled per engine turn (chunked prefill), so new windows delay live\n"
        "#   ones by one budget a step; a prompt longer than it is prefilled in chunks of exactly this size.\n"
        "# cuda_graphs: on a GPU, capture the batched decode step per batch bucket at load (not yet measured).\n"
        "# torch_threads: PyTorch CPU threads of this model's process (0: PyTorch's default, every core).\n"
        "# step_batching on: the decode steps of all live windows run in one forward (throughput); off: each\n"
        "#   window steps alone, so a ranking under load is bit-identical to the same request alone (batched\n"
        "#   float noise, ~1e-6, can flip a near-tie between two passages).\n"
    ),
    "pe_encoder": "# runtime (Python backend only): torch (encoder/) or onnxruntime (model.onnx).\n"
                  "# threads: CPU threads of this model's process (0: the runtime's default, every core).\n",
    "pe_projector": "# runtime (Python backend only): torch (projector.safetensors) or onnxruntime (model.onnx).\n"
                    "# threads: CPU threads of this model's process (0: the runtime's default, every core).\n",
}


def _kind(gpu: bool) -> int:
    return mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU


def _config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch: int = 0,
            backend: str = "", platform: str = "", gpu: bool | None = False) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, backend=backend, platform=platform, max_batch_size=max_batch)
    for item in inputs:
        config.input.add(name=item.name, data_type=item.data_type, dims=item.dims, optional=item.optional)
    for item in outputs:
        config.output.add(name=item.name, data_type=item.data_type, dims=item.dims)
    if gpu is not None:
        config.instance_group.add(count=1, kind=_kind(gpu))
    return config


def tokenizer_config() -> mc.ModelConfig:
    return _config("pe_tokenizer", *TOKENIZER_IO, backend="python")


def check_target(target: str, gpu: bool) -> None:
    """ConfigError for a target and instance kind Triton cannot serve."""
    if target not in TARGETS:
        raise ConfigError(f"target {target!r} is not one of {TARGETS}")
    if target == "tensorrt" and not gpu:
        # Triton's TensorRT backend refuses KIND_CPU ("TensorRT backend supports only GPU device")
        raise ConfigError("target tensorrt needs GPU instances: Triton's TensorRT backend refuses KIND_CPU "
                          "(drop --cpu, or use --target onnxruntime for CPU instances)")


def _batched_model(name: str, target: str, gpu: bool, io: tuple[list[TensorSpec], list[TensorSpec]],
                   max_batch: int) -> mc.ModelConfig:
    check_target(target, gpu)
    where = {"torch": {"backend": "python"}, "python": {"backend": "python"},
             "onnxruntime": {"platform": "onnxruntime_onnx"}, "tensorrt": {"platform": "tensorrt_plan"}}[target]
    config = _config(name, *io, max_batch=max_batch, gpu=gpu, **where)
    config.dynamic_batching.max_queue_delay_microseconds = DYNAMIC_BATCH_DELAY_US
    if target in ("torch", "python"):
        config.parameters["runtime"].string_value = "torch" if target == "torch" else "onnxruntime"
        config.parameters["threads"].string_value = "0"
    return config


def encoder_config(target: str, gpu: bool, max_batch: int = MAX_BATCH,
                   io: tuple[list[TensorSpec], list[TensorSpec]] | None = None) -> mc.ModelConfig:
    """``io``: the exported model's inputs and outputs as its runtime reports them (ONNX / TensorRT)."""
    return _batched_model("pe_encoder", target, gpu, io or ENCODER_IO, max_batch)


def projector_config(target: str, gpu: bool, max_batch: int = MAX_BATCH,
                     io: tuple[list[TensorSpec], list[TensorSpec]] | None = None) -> mc.ModelConfig:
    return _batched_model("pe_projector", target, gpu, io or PROJECTOR_IO, max_batch)


def embed_config() -> mc.ModelConfig:
    config = _config("pe_embed", *EMBED_IO, platform="ensemble", gpu=None)
    steps = config.ensemble_scheduling.step
    tokenizer = steps.add(model_name="pe_tokenizer", model_version=-1)
    tokenizer.input_map["TEXT"] = "TEXT"
    tokenizer.output_map["INPUT_IDS"] = "input_ids"
    tokenizer.output_map["ATTENTION_MASK"] = "attention_mask"
    encoder = steps.add(model_name="pe_encoder", model_version=-1)
    encoder.input_map["INPUT_IDS"] = "input_ids"
    encoder.input_map["ATTENTION_MASK"] = "attention_mask"
    encoder.output_map["EMBEDDING"] = "ENCODER_EMBEDDING"
    projector = steps.add(model_name="pe_projector", model_version=-1)
    projector.input_map["ENCODER_EMBEDDING"] = "ENCODER_EMBEDDING"
    projector.output_map["PROJECTED"] = "PROJECTED"
    return config


def llm_config(gpu: bool, head_cache: int = LLM_HEAD_CACHE, max_live: int | None = None,
               step_batching: bool = True) -> mc.ModelConfig:
    """One whole window per request, no batch dimension, no scheduler batching: the model's own
    engine batches the decode steps of every live window (pe_rank.runtime.engine), so Triton only
    has to hand requests over as they come. ``head_cache``: how many prompt heads keep their
    keys/values (pe_rank.runtime.head_cache); ``max_live``: the engine's batch slots;
    ``step_batching`` off: every window steps alone, bit-identical to a lone request.
    """
    config = _config("pe_llm", *LLM_IO, backend="python", gpu=gpu)
    params = {"head_cache": head_cache,
              "max_live_windows": max_live or (LLM_MAX_LIVE_WINDOWS if gpu else LLM_MAX_LIVE_WINDOWS_CPU),
              "max_window_tokens": LLM_MAX_WINDOW_TOKENS, "max_window_passages": LLM_MAX_WINDOW_PASSAGES,
              "prefill_budget": LLM_PREFILL_BUDGET, "step_batching": "on" if step_batching else "off",
              "cuda_graphs": "off", "torch_threads": 0}
    for key, value in params.items():
        config.parameters[key].string_value = str(value)
    return config


def rank_config() -> mc.ModelConfig:
    """pe_rank: a whole request as one call; its BLS calls to pe_embed and pe_llm do the work."""
    return _config("pe_rank", *RANK_IO, backend="python")


def all_configs(target: str, gpu: bool, max_batch: int = MAX_BATCH, step_batching: bool = True,
                encoder_io=None, projector_io=None) -> dict[str, mc.ModelConfig]:
    """Model name -> its ModelConfig. ``encoder_io`` / ``projector_io``: the exported models' I/O
    as the runtime reports them (None: the model-independent interface, all feature dims -1)."""
    return {
        "pe_tokenizer": tokenizer_config(),
        "pe_encoder": encoder_config(target, gpu, max_batch, encoder_io),
        "pe_projector": projector_config(target, gpu, max_batch, projector_io),
        "pe_embed": embed_config(),
        "pe_llm": llm_config(gpu, step_batching=step_batching),
        "pe_rank": rank_config(),
    }


def to_text(config: mc.ModelConfig) -> str:
    """config.pbtxt text: a header, notes on the parameters, then protobuf's text format."""
    return HEADER + NOTES.get(config.name, "") + text_format.MessageToString(config)


def parse(text: str) -> mc.ModelConfig:
    """config.pbtxt text -> ModelConfig; an unknown field or a bad value raises text_format.ParseError."""
    return text_format.Parse(text, mc.ModelConfig())


def read_config(path: Path) -> mc.ModelConfig:
    """A config.pbtxt file as Triton's ModelConfig message."""
    return parse(Path(path).read_text())


def write_config(folder: Path, config: mc.ModelConfig) -> Path:
    path = Path(folder) / "config.pbtxt"
    path.write_text(to_text(config))
    return path


def max_batch_size(config_pbtxt: Path) -> int:
    """The ``max_batch_size`` of a config.pbtxt (0 when the model does not batch), read as a ModelConfig.

    For the server: a window is one pe_embed request, so windows may not exceed pe_encoder's
    max batch (``max_batch_size(repository / "pe_encoder" / "config.pbtxt")``).
    """
    return int(read_config(config_pbtxt).max_batch_size)
