"""config.pbtxt for every model, per export target.

The configs are model-independent (feature sizes are -1), so the ones tracked in
model_repository/ are exactly what ``pe-rank export --target torch`` writes on a CPU
machine; a test keeps the two in sync.
"""
from __future__ import annotations

TARGETS = ("torch", "python", "onnxruntime", "tensorrt")
MAX_BATCH = 128  # >= the service's largest window (100): a window is one pe_embed request
LLM_HEAD_CACHE = 16
# windows decoded at once by pe_llm's engine (its batch slots); more wait for a free slot
LLM_MAX_LIVE_WINDOWS = 64


def _instance(kind: str) -> str:
    return f'instance_group [ {{ count: 1 kind: {kind} }} ]\n'


def _io(kind: str, tensors: list[tuple[str, str, str]], optional: tuple[str, ...] = ()) -> str:
    """``optional``: the names of inputs a request may leave out."""
    items = []
    for name, dtype, dims in tensors:
        opt = " optional: true" if name in optional else ""
        items.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {dims} ]{opt} }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _python_runtime(runtime: str) -> str:
    return f'parameters {{ key: "runtime" value: {{ string_value: "{runtime}" }} }}\n'


def tokenizer_config() -> str:
    return (
        'name: "pe_tokenizer"\nbackend: "python"\nmax_batch_size: 0\n'
        + _io("input", [("TEXT", "TYPE_STRING", "-1")])
        + _io("output", [("INPUT_IDS", "TYPE_INT64", "-1, -1"), ("ATTENTION_MASK", "TYPE_INT64", "-1, -1")])
        + _instance("KIND_CPU")
    )


def _batched_model(name: str, target: str, kind: str, inputs, outputs, max_batch: int) -> str:
    head = {
        "torch": 'backend: "python"\n',
        "python": 'backend: "python"\n',
        "onnxruntime": 'platform: "onnxruntime_onnx"\n',
        "tensorrt": 'platform: "tensorrt_plan"\n',
    }[target]
    text = (
        f'name: "{name}"\n{head}max_batch_size: {max_batch}\n'
        + _io("input", inputs) + _io("output", outputs)
        + "dynamic_batching { max_queue_delay_microseconds: 200 }\n"
        + _instance(kind)
    )
    if target in ("torch", "python"):
        text += _python_runtime("torch" if target == "torch" else "onnxruntime")
    return text


def encoder_config(target: str, kind: str, max_batch: int = MAX_BATCH) -> str:
    return _batched_model(
        "pe_encoder", target, kind,
        [("INPUT_IDS", "TYPE_INT64", "-1"), ("ATTENTION_MASK", "TYPE_INT64", "-1")],
        [("EMBEDDING", "TYPE_FP32", "-1")], max_batch,
    )


def projector_config(target: str, kind: str, max_batch: int = MAX_BATCH) -> str:
    return _batched_model(
        "pe_projector", target, kind,
        [("ENCODER_EMBEDDING", "TYPE_FP32", "-1")], [("PROJECTED", "TYPE_FP32", "-1")], max_batch,
    )


def embed_config() -> str:
    return (
        'name: "pe_embed"\nplatform: "ensemble"\nmax_batch_size: 0\n'
        + _io("input", [("TEXT", "TYPE_STRING", "-1")])
        + _io("output", [("PROJECTED", "TYPE_FP32", "-1, -1"), ("ENCODER_EMBEDDING", "TYPE_FP32", "-1, -1")])
        + """ensemble_scheduling {
  step [
    {
      model_name: "pe_tokenizer"
      model_version: -1
      input_map { key: "TEXT" value: "TEXT" }
      output_map { key: "INPUT_IDS" value: "input_ids" }
      output_map { key: "ATTENTION_MASK" value: "attention_mask" }
    },
    {
      model_name: "pe_encoder"
      model_version: -1
      input_map { key: "INPUT_IDS" value: "input_ids" }
      input_map { key: "ATTENTION_MASK" value: "attention_mask" }
      output_map { key: "EMBEDDING" value: "ENCODER_EMBEDDING" }
    },
    {
      model_name: "pe_projector"
      model_version: -1
      input_map { key: "ENCODER_EMBEDDING" value: "ENCODER_EMBEDDING" }
      output_map { key: "PROJECTED" value: "PROJECTED" }
    }
  ]
}
"""
    )


def llm_config(kind: str, head_cache: int = LLM_HEAD_CACHE, max_live: int = LLM_MAX_LIVE_WINDOWS,
               step_batching: bool = True) -> str:
    """One whole window per request, no batch dimension, no scheduler batching: the model's own
    engine batches the decode steps of every live window (pe_rank.runtime.engine), so Triton only
    has to hand requests over as they come. ``head_cache``: how many prompt heads keep their
    keys/values (pe_rank.runtime.head_cache); ``max_live``: the engine's batch slots;
    ``step_batching`` off: every window steps alone, bit-identical to a lone request.
    """
    return (
        'name: "pe_llm"\nbackend: "python"\nmax_batch_size: 0\n'
        + _io("input", [("PROMPT_IDS", "TYPE_INT64", "-1"), ("PASSAGE_EMBEDS", "TYPE_FP32", "-1, -1"),
                        ("EMIT", "TYPE_INT32", "1"), ("MODE", "TYPE_STRING", "1")], optional=("EMIT", "MODE"))
        + _io("output", [("ORDER", "TYPE_INT64", "-1"), ("DECODE_STEPS", "TYPE_INT64", "1"),
                         ("CACHED_TOKENS", "TYPE_INT64", "1"), ("PREFILL_MS", "TYPE_FP32", "1"),
                         ("DECODE_MS", "TYPE_FP32", "1")])
        + f"""# prompt heads (the query-independent start of a window's prompt, one per window size) whose
# keys/values are kept across windows and requests; 0 prefills every prompt whole
parameters {{ key: "head_cache" value: {{ string_value: "{head_cache}" }} }}
# windows the engine decodes at once (its batch slots); later ones wait for a free slot
parameters {{ key: "max_live_windows" value: {{ string_value: "{max_live}" }} }}
# on: the decode steps of all live windows run in one forward (throughput); off: each window steps
# alone, so a ranking under load is bit-identical to the same request alone (batched float noise,
# ~1e-6, can flip a near-tie between two passages)
parameters {{ key: "step_batching" value: {{ string_value: "{'on' if step_batching else 'off'}" }} }}
"""
        + _instance(kind)
    )


def rank_config() -> str:
    """pe_rank: a whole request as one call; its BLS calls to pe_embed and pe_llm do the work."""
    return (
        'name: "pe_rank"\nbackend: "python"\nmax_batch_size: 0\n'
        + _io("input", [("QUERY", "TYPE_STRING", "1"), ("PASSAGES", "TYPE_STRING", "-1"),
                        ("WINDOW_SIZE", "TYPE_INT32", "1"), ("STRIDE", "TYPE_INT32", "1"),
                        ("TOP_N", "TYPE_INT32", "1"), ("MODE", "TYPE_STRING", "1")],
                        optional=("WINDOW_SIZE", "STRIDE", "TOP_N", "MODE"))
        + _io("output", [("ORDER", "TYPE_INT64", "-1")])
        + _instance("KIND_CPU")
    )


def all_configs(target: str, gpu: bool, max_batch: int = MAX_BATCH, step_batching: bool = True) -> dict[str, str]:
    """Model name -> config.pbtxt text."""
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    return {
        "pe_tokenizer": tokenizer_config(),
        "pe_encoder": encoder_config(target, kind, max_batch),
        "pe_projector": projector_config(target, kind, max_batch),
        "pe_embed": embed_config(),
        "pe_llm": llm_config(kind, step_batching=step_batching),
        "pe_rank": rank_config(),
    }
