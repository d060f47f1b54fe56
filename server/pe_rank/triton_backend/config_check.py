"""What each Python model relies on in its config, checked in ``initialize``.

Triton hands a Python model its config as JSON (``args["model_config"]``). A model that was
given a config it cannot serve (decoupled, inputs left on the GPU, a renamed input, a wrong data
type, a bad parameter) refuses to load with one line saying why, instead of failing on every
request later. As Triton's python_backend decoupled example does, the transaction policy, the
inputs and their data types are checked, here against :data:`INTERFACES`, which restates what
``pe-rank export`` writes (tests/test_model_configs.py keeps the two equal).

Plain dicts and json only: this runs inside Triton, where only the core install is present.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable


class ModelConfigError(ValueError):
    """The model's config is not one this model can serve; a one-line message."""


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # as in config.pbtxt: TYPE_FP32, ...
    rank: int  # dims of the array the model reads or writes, batch dim included
    optional: bool = False  # inputs: a request may leave it out


def _t(name: str, data_type: str, rank: int, optional: bool = False) -> Tensor:
    return Tensor(name, data_type, rank, optional)


# model -> (inputs, outputs) that its model.py reads and writes
INTERFACES: dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {
    "pe_tokenizer": ((_t("TEXT", "TYPE_STRING", 1),),
                     (_t("INPUT_IDS", "TYPE_INT64", 2), _t("ATTENTION_MASK", "TYPE_INT64", 2))),
    "pe_encoder": ((_t("INPUT_IDS", "TYPE_INT64", 2), _t("ATTENTION_MASK", "TYPE_INT64", 2)),
                   (_t("EMBEDDING", "TYPE_FP32", 2),)),
    "pe_projector": ((_t("ENCODER_EMBEDDING", "TYPE_FP32", 2),), (_t("PROJECTED", "TYPE_FP32", 2),)),
    "pe_llm": ((_t("PROMPT_IDS", "TYPE_INT64", 1), _t("PASSAGE_EMBEDS", "TYPE_FP32", 2),
                _t("EMIT", "TYPE_INT32", 1, optional=True), _t("MODE", "TYPE_STRING", 1, optional=True)),
               (_t("ORDER", "TYPE_INT64", 1), _t("DECODE_STEPS", "TYPE_INT64", 1), _t("CACHED_TOKENS", "TYPE_INT64", 1),
                _t("PREFILL_MS", "TYPE_FP32", 1), _t("DECODE_MS", "TYPE_FP32", 1))),
    "pe_rank": ((_t("QUERY", "TYPE_STRING", 1), _t("PASSAGES", "TYPE_STRING", 1),
                 _t("WINDOW_SIZE", "TYPE_INT32", 1, optional=True), _t("STRIDE", "TYPE_INT32", 1, optional=True),
                 _t("TOP_N", "TYPE_INT32", 1, optional=True), _t("MODE", "TYPE_STRING", 1, optional=True),
                 _t("PRERANK", "TYPE_BOOL", 1, optional=True), _t("DEPTH", "TYPE_INT32", 1, optional=True)),
                (_t("ORDER", "TYPE_INT64", 1),)),
}

# models whose execute() answers through response senders and returns None (non-decoupled):
# python_backend 24.06 or later; pe_llm's step-batch histogram needs MetricFamily.HISTOGRAM (24.09)
NEEDS_RESPONSE_SENDER = ("pe_llm", "pe_rank")


def config_of(args: dict[str, str]) -> dict[str, Any]:
    return json.loads(args["model_config"])


def check_config(args: dict[str, str], interface: str, batching: bool = False,
                 parameters: dict[str, Callable[[str | None], str | None]] | None = None) -> dict[str, Any]:
    """The model's config, after checking what the model relies on; ModelConfigError (one line) if not.

    ``interface``: the key of :data:`INTERFACES`; ``batching``: whether ``max_batch_size > 0`` is
    allowed (the model takes batched arrays either way; the ones that decode windows do not batch);
    ``parameters``: name -> a check of its string value (None when absent) returning a reason or None.
    """
    config = config_of(args)
    name = config.get("name") or args.get("model_name", interface)
    reasons = _reasons(config, interface, batching, parameters or {})
    if reasons:
        raise ModelConfigError(f"model '{name}' config: {reasons[0]}"
                               + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""))
    return config


def _reasons(config: dict, interface: str, batching: bool, parameters: dict) -> list[str]:
    reasons = []
    if config.get("model_transaction_policy", {}).get("decoupled", False):
        reasons.append("model_transaction_policy decoupled is true; this model sends exactly one response per "
                       "request (non-decoupled)")
    params = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
    if str(params.get("FORCE_CPU_ONLY_INPUT_TENSORS", "yes")).lower() in ("no", "false", "off"):
        reasons.append("parameter FORCE_CPU_ONLY_INPUT_TENSORS is 'no'; this model reads its inputs as NumPy "
                       "arrays, which needs them in CPU memory")
    max_batch = int(config.get("max_batch_size", 0))
    if max_batch < 0 or (max_batch > 0 and not batching):
        reasons.append(f"max_batch_size is {max_batch}; this model takes one unbatched request at a time "
                       "(max_batch_size 0)")
    extra = 1 if max_batch > 0 else 0
    inputs, outputs = INTERFACES[interface]
    reasons += _tensor_reasons("input", config.get("input", []), inputs, extra)
    reasons += _tensor_reasons("output", config.get("output", []), outputs, extra)
    for key, check in parameters.items():
        reason = check(params.get(key))
        if reason:
            reasons.append(f"parameter {key}: {reason}")
    return reasons


def _tensor_reasons(kind: str, declared: list[dict], expected: tuple[Tensor, ...], extra_rank: int) -> list[str]:
    reasons = []
    by_name = {item.get("name"): item for item in declared}
    wanted = {t.name for t in expected}
    for tensor in expected:
        item = by_name.get(tensor.name)
        if item is None:
            if not tensor.optional:
                reasons.append(f"{kind} {tensor.name} is missing")
            continue
        if item.get("data_type") != tensor.data_type:
            reasons.append(f"{kind} {tensor.name} is {item.get('data_type')}, expected {tensor.data_type}")
        rank = len(item.get("dims", [])) + extra_rank
        if rank != tensor.rank:
            reasons.append(f"{kind} {tensor.name} has {rank} dims (batch dim included), expected {tensor.rank}")
        if kind == "input" and item.get("optional", False) and not tensor.optional:
            reasons.append(f"input {tensor.name} is marked optional, but this model needs it in every request")
    for item in declared:
        if item.get("name") not in wanted:
            reasons.append(f"{kind} {item.get('name')} is not one this model "
                           f"{'reads' if kind == 'input' else 'writes'} ({', '.join(sorted(wanted))})")
    return reasons


# ---- parameter checks


def one_of(*values: str, default: str | None = None) -> Callable[[str | None], str | None]:
    def check(value: str | None) -> str | None:
        value = default if value is None else value
        return None if value in values else f"{value!r} is not one of {', '.join(values)}"

    return check


def integer(minimum: int) -> Callable[[str | None], str | None]:
    """Absent is fine (the model's default); present must be an integer >= minimum."""
    def check(value: str | None) -> str | None:
        if value is None:
            return None
        try:
            number = int(value)
        except ValueError:
            return f"{value!r} is not an integer"
        return None if number >= minimum else f"{number} is below {minimum}"

    return check


def number(minimum: float) -> Callable[[str | None], str | None]:
    """Absent is fine (the model's default); present must be a finite number >= minimum."""
    def check(value: str | None) -> str | None:
        if value is None:
            return None
        try:
            got = float(value)
        except ValueError:
            return f"{value!r} is not a number"
        return None if math.isfinite(got) and got >= minimum else f"{value} is not a number >= {minimum}"

    return check


def require_response_sender(pb_utils: Any, model: str) -> None:
    """This model returns None from execute() and answers through response senders in non-decoupled
    mode, which python_backend supports from 24.06; MetricFamily.HISTOGRAM (24.09, which pe_llm uses)
    is the feature a model can see, so its absence means the container is older than our floor."""
    family = getattr(pb_utils, "MetricFamily", None)
    if family is None or not hasattr(family, "HISTOGRAM"):
        raise ModelConfigError(f"model '{model}' needs Triton's python_backend from the 24.09 container or later "
                               "(response senders in non-decoupled mode: 24.06; MetricFamily.HISTOGRAM: 24.09); "
                               "this one lacks MetricFamily.HISTOGRAM (see README, Deploying on NGC Triton)")
