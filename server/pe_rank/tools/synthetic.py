"""Synthetic PE-Rank models: a released model's shapes with random weights made on the device.

Like vLLM's dummy weights: nothing is read from disk or a hub but two small tokenizers
(``models/assets``, see :mod:`pe_rank.models.tokenizer_assets`). Every parameter is created
directly on the target device in the target dtype (module construction runs under
``torch.device(device)`` with that default dtype, and transformers' own initialisation then
draws ``normal_(0, 0.02)`` there), so a 7B model never exists on the CPU and is never
converted: at ``mistral-7b`` in float16 the LLM is 7.1 G parameters, 14.2 GB of device memory,
made in seconds on a GPU.

The result is an ordinary :class:`~pe_rank.runtime.model.PeRankModel`: the in-process reranker,
``TorchStepper`` and the ranking loop run on it exactly as on a loaded checkpoint. Rankings of
random weights mean nothing; timings and memory are what a trained model of the shape costs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..core.checkpoint import CheckpointInfo
from ..runtime.weights import build_projector
from ..runtime.model import PeRankModel, build_llm
from ..core.prompt import PromptBuilder
from ..core.tokenization import load_prompt_tokenizer
from ..models.tokenizer_assets import ENCODER_TOKENIZER, PROMPT_TOKENIZER, PROMPT_VOCAB


@dataclass(frozen=True)
class SyntheticShape:
    """What a released (or demo) PE-Rank model looks like, without its weights."""

    name: str
    llm_type: str  # "mistral" or "llama"
    llm: dict[str, Any]  # MistralConfig / LlamaConfig fields
    encoder: dict[str, Any]  # BertConfig fields
    projector_type: str = "mlp2x_gelu"
    pooling: str = "mean"
    about: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def embedding_size(self) -> int:
        return int(self.encoder["hidden_size"])


# bert-base-uncased's WordPiece (assets/bert-uncased) has 30522 pieces; jina v2 pads it to 30528.
_BERT_VOCAB = 30528

SHAPES: dict[str, SyntheticShape] = {
    "tiny": SyntheticShape(
        name="tiny", llm_type="mistral",
        llm=dict(vocab_size=PROMPT_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False),
        encoder=dict(vocab_size=_BERT_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=512),
        about="CI shape: a 2-layer Mistral (hidden 64) and a 2-layer BERT (hidden 32)",
    ),
    "smollm2-135m": SyntheticShape(
        name="smollm2-135m", llm_type="llama",
        llm=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
        encoder=dict(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                     num_attention_heads=12, max_position_embeddings=512),
        about="the demo's shapes: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) + all-MiniLM-L6-v2 (384-d)",
    ),
    "mistral-7b": SyntheticShape(
        name="mistral-7b", llm_type="mistral",
        # Mistral-7B-Instruct-v0.2, the released PE-Rank's LLM: no sliding window (null in its
        # config.json; v0.1 had 4096), rope_theta 1e6. Vocabulary 32000 as the base model (the
        # released checkpoint adds <PLACEHOLDER> and <RANK>; a decode step never reads that table).
        llm=dict(vocab_size=PROMPT_VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                 rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False),
        # jina-embeddings-v2-base-en's size (12 layers, 768-d, 12 heads, 3072). Stand-in: a plain
        # BERT (learned positions, GELU MLP), where jina has ALiBi and a gated MLP (137M vs 110M
        # parameters), so encoding here is somewhat cheaper than with the real encoder.
        encoder=dict(vocab_size=_BERT_VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=512),
        about="the released PE-Rank's shapes: Mistral-7B-Instruct-v0.2 + a jina-embeddings-v2-base-sized encoder (768-d)",
    ),
}


class SyntheticError(ValueError):
    """A bad shape, dtype or device; printed as one ``error:`` line."""


@contextlib.contextmanager
def _created_as(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New tensors default to ``device`` and floating ``dtype`` (what transformers does for ``dtype=``)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def checkpoint_info(shape: SyntheticShape) -> CheckpointInfo:
    """The shape as the CheckpointInfo of a released-layout folder (the folder holds the prompt tokenizer)."""
    config = {**shape.llm, "model_type": f"embed_{shape.llm_type}", "encoder_name": str(ENCODER_TOKENIZER),
              "encoder_pooling": shape.pooling, "projector_type": shape.projector_type,
              "embedding_size": shape.embedding_size}
    return CheckpointInfo(folder=PROMPT_TOKENIZER, config=config, llm_type=shape.llm_type,
                          encoder_dir=ENCODER_TOKENIZER, pooling=shape.pooling,
                          projector_type=shape.projector_type, embedding_size=shape.embedding_size,
                          hidden_size=shape.hidden_size)


def build_synthetic(name: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> PeRankModel:
    """A PE-Rank model of shape ``name`` with random weights, made on ``device``.

    The LLM and projector are in ``dtype``; the encoder stays float32, as a loaded checkpoint's
    does (:func:`~pe_rank.runtime.model.load_model`).
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    if name not in SHAPES:
        raise SyntheticError(f"unknown synthetic shape {name!r}; choose one of {sorted(SHAPES)}")
    shape = SHAPES[name]
    dev = torch.device(device)
    info = checkpoint_info(shape)
    prompts = PromptBuilder(load_prompt_tokenizer(PROMPT_TOKENIZER))
    if prompts.placeholder_id >= shape.llm["vocab_size"]:
        raise SyntheticError(f"{PROMPT_TOKENIZER}: <PLACEHOLDER> id {prompts.placeholder_id} does not fit "
                             f"vocabulary {shape.llm['vocab_size']}")
    torch.manual_seed(seed)
    with _created_as(dev, dtype):
        llm = build_llm(info, dtype).eval()
        projector = build_projector(shape.projector_type, shape.embedding_size, shape.hidden_size).eval()
    with _created_as(dev, torch.float32):
        encoder = BertModel(BertConfig(**shape.encoder, attn_implementation="sdpa"), add_pooling_layer=False).eval()
    for module in (llm, projector, encoder):
        module.requires_grad_(False)  # inference only
        wrong = [n for n, p in module.named_parameters() if p.device.type != dev.type]
        if wrong:  # would mean a CPU copy was made after all
            raise RuntimeError(f"synthetic parameters not created on {dev}: {wrong[:3]}")
    encoder_tokenizer = AutoTokenizer.from_pretrained(str(ENCODER_TOKENIZER))
    return PeRankModel(info, llm, projector, encoder, encoder_tokenizer, prompts, dtype, dev)


def decode_step_weight_bytes(llm: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every decoder parameter but the token embedding table.

    A step feeds a passage embedding (no table lookup) and scores with ``h . e_i`` (no lm_head),
    so each layer's weights and the final norm are read once per step, whatever the batch.
    """
    table = llm.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in llm.parameters() if p is not table)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
