"""A loaded PE-Rank checkpoint: encoder, projector, LLM and prompt builder, in PyTorch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import (
    ENCODER_PREFIX,
    PROJECTOR_PREFIX,
    CheckpointError,
    CheckpointInfo,
    WeightFiles,
    build_projector,
    load_into,
    read_checkpoint_info,
)
from .prompt import PromptBuilder
from .tokenization import load_prompt_tokenizer

ENCODER_MAX_TOKENS = 512
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

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    @property
    def embedding_size(self) -> int:
        return self.info.embedding_size

    def tokenize_passages(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Encoder input as the original built it: truncated to 512 tokens, padded to the longest."""
        enc = self.encoder_tokenizer(
            texts, padding="longest", truncation=True, max_length=ENCODER_MAX_TOKENS, return_tensors="np"
        )
        return {"input_ids": enc["input_ids"].astype(np.int64),
                "attention_mask": enc["attention_mask"].astype(np.int64)}

    def passage_token_counts(self, texts: list[str]) -> list[int]:
        """Untruncated encoder lengths, to refuse over-long passages when truncation is off."""
        enc = self.encoder_tokenizer(texts, truncation=False)
        return [len(ids) for ids in enc["input_ids"]]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """Pooled, L2-normalised encoder embeddings [N, E] (float32).

        Like the reference: all texts padded to the longest of them, then batches of 16.
        Padding changes the float bits, and near-ties in ranking depend on them.
        """
        if not texts:
            return np.zeros((0, self.embedding_size), dtype=np.float32)
        tokens = self.tokenize_passages(texts)
        return np.concatenate([
            self.encode_tokens(tokens["input_ids"][i : i + ENCODER_BATCH],
                               tokens["attention_mask"][i : i + ENCODER_BATCH])
            for i in range(0, len(texts), ENCODER_BATCH)
        ])

    @torch.inference_mode()
    def encode_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64)).to(self.device)
        mask = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)).to(self.device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = pool(hidden, mask, self.info.pooling)
        return torch.nn.functional.normalize(pooled.float(), p=2, dim=-1).cpu().numpy()

    @torch.inference_mode()
    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Encoder embeddings [N, E] -> LLM input space [N, H] (not normalised)."""
        x = torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).to(self.device, self.dtype)
        return self.projector(x).float().cpu().numpy()


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last_token":
        last = mask.sum(-1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / torch.clamp(weights.sum(1), min=1e-9)


def load_model(folder: Path | str, dtype: str = "float32", device: str = "cpu") -> PeRankModel:
    """Load a released-layout checkpoint; user mistakes raise CheckpointError."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    info = read_checkpoint_info(folder)
    torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                   "fp16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    weights = WeightFiles(info.folder)

    llm = build_llm(info, torch_dtype)
    load_into(llm, weights, "model.", "LLM", torch_dtype)
    projector = build_projector(info.projector_type, info.embedding_size, info.hidden_size).to(torch_dtype)
    load_into(projector, weights, PROJECTOR_PREFIX, "projector", torch_dtype)

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
    encoder_tokenizer = AutoTokenizer.from_pretrained(str(info.encoder_dir))
    prompts = PromptBuilder(load_prompt_tokenizer(info.folder))

    dev = torch.device(device)
    for module in (llm, projector, encoder):
        module.to(dev).eval()
    return PeRankModel(info, llm, projector, encoder, encoder_tokenizer, prompts, torch_dtype, dev)
