"""config.pbtxt for every model, per export target.

The configs are model-independent (feature sizes are -1), so the ones tracked in
model_repository/ are exactly what ``pe-rank export --target torch`` writes on a CPU
machine; a test keeps the two in sync.
"""
from __future__ import annotations

TARGETS = ("torch", "python", "onnxruntime", "tensorrt")
MAX_BATCH = 128  # >= the service's largest window (100): a window is one pe_embed request
LLM_IDLE_US = 60_000_000
# pe_llm batches the CHOICE steps of up to this many sequences into one forward pass. A decode
# step reads every weight for one token, so on a memory-bound device B steps cost little more than one.
LLM_MAX_BATCH = 8
# A batch's responses go out together and its clients answer a few ms apart; waiting up to 2 ms
# lets most of them share the next batch (measured on the demo model, 4 sequences: mean batch 4.0
# vs 2.6 without the wait) and costs a lone sequence nothing measurable (a step is ~50-80 ms).
LLM_HEAD_CACHE = 16
LLM_QUEUE_DELAY_US = 2000


def _instance(kind: str) -> str:
    return f'instance_group [ {{ count: 1 kind: {kind} }} ]\n'


def _io(kind: str, tensors: list[tuple[str, str, str]], optional: bool = False, ragged: tuple[str, ...] = ()) -> str:
    """``ragged`` inputs may differ in shape between the requests of one batch (allow_ragged_batch)."""
    items = []
    for name, dtype, dims in tensors:
        opt = " optional: true" if optional else ""
        opt += " allow_ragged_batch: true" if name in ragged else ""
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


def llm_config(kind: str, idle_us: int = LLM_IDLE_US, max_sequences: int = 256, max_batch: int = LLM_MAX_BATCH,
               queue_delay_us: int = LLM_QUEUE_DELAY_US, head_cache: int = LLM_HEAD_CACHE) -> str:
    """Sequence batcher, ``oldest``: Triton hands the model up to ``max_batch`` requests of different
    sequences at once (never two of one sequence), and pe_llm runs their CHOICE steps as one forward.

    Every input and output carries a leading batch dim of 1 per request. PROMPT_IDS and
    PASSAGE_EMBEDS are ragged: STARTs of different prompt lengths and window sizes (and requests
    without them) may share a batch, since the model handles each request's tensors on their own.
    ``head_cache``: how many prompt heads keep their keys/values (pe_rank.core.head_cache).
    """
    return (
        f'name: "pe_llm"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        + _io("input", [("PROMPT_IDS", "TYPE_INT64", "-1"), ("PASSAGE_EMBEDS", "TYPE_FP32", "-1, -1"),
                        ("CHOICE", "TYPE_INT64", "1")], optional=True, ragged=("PROMPT_IDS", "PASSAGE_EMBEDS"))
        + _io("output", [("SCORES", "TYPE_FP32", "-1"), ("LIVE_SEQUENCES", "TYPE_INT64", "1"),
                         ("STEP_BATCH", "TYPE_INT64", "1"), ("CACHED_TOKENS", "TYPE_INT64", "1")])
        + f"""sequence_batching {{
  max_sequence_idle_microseconds: {idle_us}
  oldest {{
    max_candidate_sequences: {max_sequences}
    preferred_batch_size: [ {max_batch} ]
    max_queue_delay_microseconds: {queue_delay_us}
  }}
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "END" control [ {{ kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}
  ]
}}
# prompt heads (the query-independent start of a window's prompt, one per window size) whose
# keys/values are kept across windows and requests; 0 prefills every prompt whole
parameters {{ key: "head_cache" value: {{ string_value: "{head_cache}" }} }}
"""
        + _instance(kind)
    )


def all_configs(target: str, gpu: bool, max_batch: int = MAX_BATCH, idle_us: int = LLM_IDLE_US) -> dict[str, str]:
    """Model name -> config.pbtxt text."""
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    return {
        "pe_tokenizer": tokenizer_config(),
        "pe_encoder": encoder_config(target, kind, max_batch),
        "pe_projector": projector_config(target, kind, max_batch),
        "pe_embed": embed_config(),
        "pe_llm": llm_config(kind, idle_us),
    }
