"""A loaded PE-Rank checkpoint: encoder, projector, LLM and prompt builder, in PyTorch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.checkpoint import ENCODER_PREFIX, PROJECTOR_PREFIX, CheckpointError, CheckpointInfo, read_checkpoint_info
from ..core.prompt import PromptBuilder
from ..core.tokenization import PromptTokenizer, load_prompt_tokenizer
from ..core.types import ENCODER_MAX_TOKENS
from .weights import WeightFiles, build_projector, load_into

ENCODER_BATCH = 16  # the released code encodes in batches of 16


def llm_config(info: CheckpointInfo):
    """The plain Mistral/Llama config inside a PE-Rank config.json."""
    from transformers import LlamaConfig, MistralConfig

    cls = MistralConfig if info.llm_type == "mistral" else LlamaConfig
    extra = {"model_type", "architectures", "encoder_name", "encoder_pooling", "projector_type",
             "embedding_size", "use_proj", "transformers_version", "auto_map"}
    return cls(**{k: v for k, v in info.config.items() if k not in extra})


def build_llm(info: CheckpointInfo, dtype: torch.dtype) -> nn.Module:
    """The decoder stack without lm_head: PE-Rank scores passages with h . e_i only."""
    from transformers import LlamaModel, MistralModel

    cls = MistralModel if info.llm_type == "mistral" else LlamaModel
    config = llm_config(info)
    config._attn_implementation = "sdpa"
    return cls(config).to(dtype)


@dataclass
class PeRankModel:
    info: CheckpointInfo
    llm: nn.Module
    projector: nn.Module
    encoder: nn.Module
    encoder_tokenizer: object
    prompts: PromptBuilder
    dtype: torch.dtype
    device: torch.device
    engine: object = None  # the in-process DecodeEngine, made on first use (core.inprocess.engine_for)

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    @property
    def embedding_size(self) -> int:
        return self.info.embedding_size

    def tokenize_passages(self, texts: list[str]) -> dict[str, np.ndarray]:
        return encoder_inputs(self.encoder_tokenizer, texts)

    def passage_token_counts(self, texts: list[str]) -> list[int]:
        """Untruncated encoder lengths, to refuse over-long passages when truncation is off."""
        enc = self.encoder_tokenizer(texts, truncation=False)
        return [len(ids) for ids in enc["input_ids"]]

    def encode(self, texts: list[str]) -> np.ndarray:
        """Pooled, L2-normalised encoder embeddings [N, E] (float32).

        Like the reference: all texts padded to the longest of them, then batches of 16.
        Padding changes the float bits, and near-ties in ranking depend on them.
        """
        if not texts:
            return np.zeros((0, self.embedding_size), dtype=np.float32)
        tokens = self.tokenize_passages(texts)
        return encode_in_batches(self.encoder, self.info.pooling, tokens["input_ids"],
                                 tokens["attention_mask"], self.device)

    def encode_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return encode_tokens(self.encoder, self.info.pooling, input_ids, attention_mask, self.device)

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Encoder embeddings [N, E] -> LLM input space [N, H] (not normalised)."""
        return project(self.projector, embeddings, self.dtype, self.device)


def encoder_inputs(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """Encoder input as the original built it: truncated to 512 tokens, padded to the longest."""
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=ENCODER_MAX_TOKENS, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


@torch.inference_mode()
def encode_tokens(encoder: nn.Module, pooling: str, input_ids: np.ndarray, attention_mask: np.ndarray,
                  device: torch.device = torch.device("cpu")) -> np.ndarray:
    """Pooled, L2-normalised embeddings [B, E] of one encoder batch."""
    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64)).to(device)
    mask = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)).to(device)
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return torch.nn.functional.normalize(pool(hidden, mask, pooling).float(), p=2, dim=-1).cpu().numpy()


def encode_in_batches(encoder: nn.Module, pooling: str, input_ids: np.ndarray, attention_mask: np.ndarray,
                      device: torch.device = torch.device("cpu")) -> np.ndarray:
    """Encode already padded inputs [N, L] in the reference's batches of 16."""
    return np.concatenate([
        encode_tokens(encoder, pooling, input_ids[i : i + ENCODER_BATCH], attention_mask[i : i + ENCODER_BATCH], device)
        for i in range(0, len(input_ids), ENCODER_BATCH)
    ])


@torch.inference_mode()
def project(projector: nn.Module, embeddings: np.ndarray, dtype: torch.dtype,
            device: torch.device = torch.device("cpu")) -> np.ndarray:
    x = torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).to(device, dtype)
    return projector(x).float().cpu().numpy()


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last_token":
        last = mask.sum(-1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / torch.clamp(weights.sum(1), min=1e-9)


TORCH_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise CheckpointError(f"dtype {name!r} is not one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def load_llm(info: CheckpointInfo, weights: WeightFiles, dtype: torch.dtype) -> nn.Module:
    llm = build_llm(info, dtype)
    load_into(llm, weights, "model.", "LLM", dtype)
    return llm.eval()


def load_projector(info: CheckpointInfo, weights: WeightFiles, dtype: torch.dtype) -> nn.Module:
    projector = build_projector(info.projector_type, info.embedding_size, info.hidden_size).to(dtype)
    load_into(projector, weights, PROJECTOR_PREFIX, "projector", dtype)
    return projector.eval()


def load_encoder(info: CheckpointInfo, weights: WeightFiles) -> nn.Module:
    """The encoder from ``model.encoder.encoder.*`` when present, else from its own folder."""
    from transformers import AutoConfig, AutoModel

    if weights.keys(ENCODER_PREFIX):
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(info.encoder_dir)))
        load_into(encoder, weights, ENCODER_PREFIX, "encoder", torch.float32)
    else:
        try:
            encoder = AutoModel.from_pretrained(str(info.encoder_dir))
        except OSError as exc:
            raise CheckpointError(f"{info.encoder_dir}: cannot load encoder weights ({exc})") from None
    hidden = getattr(encoder.config, "hidden_size", None)
    if hidden != info.embedding_size:
        raise CheckpointError(
            f"{info.folder / 'config.json'}: embedding_size is {info.embedding_size} but the encoder "
            f"in {info.encoder_dir} has hidden_size {hidden}"
        )
    return encoder.eval()


def load_encoder_tokenizer(info: CheckpointInfo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(info.encoder_dir))


def load_model(folder: Path | str, dtype: str = "float32", device: str = "cpu",
               prompt_tokenizer: PromptTokenizer | None = None) -> PeRankModel:
    """Load a released-layout checkpoint; user mistakes raise CheckpointError.

    ``prompt_tokenizer`` replaces the checkpoint's own (the synthetic bench's recorded prompt ids
    where sentencepiece is not installed).
    """
    info = read_checkpoint_info(folder)
    dt = torch_dtype(dtype)
    weights = WeightFiles(info.folder)
    llm = load_llm(info, weights, dt)
    projector = load_projector(info, weights, dt)
    encoder = load_encoder(info, weights)
    prompts = PromptBuilder(prompt_tokenizer or load_prompt_tokenizer(info.folder))
    dev = torch.device(device)
    for module in (llm, projector, encoder):
        module.to(dev)
    return PeRankModel(info, llm, projector, encoder, load_encoder_tokenizer(info), prompts, dt, dev)
