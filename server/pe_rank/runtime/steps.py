"""The LLM side of dynamic-constrained decoding: prefill a window, feed chosen passages.

``TorchStepper`` holds the model and the prompt-head cache, and is the reference path: a window
on a cache of its own, one token at a time through transformers' forward. The decode engine
(:mod:`~pe_rank.runtime.engine`) runs windows on a static KV pool instead
(:mod:`~pe_rank.runtime.pool`), whose lone-window step is bit-identical to :meth:`TorchStepper.step`;
windows too long for the pool use this path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.errors import InvalidRequest
from .head_cache import HeadCache
from .kv_cache import reserved_cache
from ..core.prompt import PromptBuilder


@dataclass
class WindowState:
    """KV cache plus the window's projected passage embeddings [n, H]."""

    cache: object
    embeds: torch.Tensor
    length: int
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the head cache


class TorchStepper:
    """Runs the LLM: scores s_i = h . e_i from the final-norm hidden state at the last position.

    ``head_cache`` is how many prompt heads (one per window size) keep their keys/values
    across windows and requests (:mod:`~pe_rank.runtime.head_cache`); 0 prefills every prompt
    whole, as the reference implementation did.
    """

    def __init__(self, llm: nn.Module, prompts: PromptBuilder, dtype: torch.dtype, device: torch.device,
                 head_cache: int = 16) -> None:
        self.llm = llm
        self.placeholder_id = prompts.placeholder_id
        self.dtype = dtype
        self.device = device
        self.heads = HeadCache(llm, prompts, head_cache)

    def window_inputs(self, prompt_ids: np.ndarray, passage_embeds: np.ndarray
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [T], passage embeddings [n, H] in the model's dtype, prompt input embeddings [T, H]) of a
        window, the i-th placeholder's row replaced by passage i; a malformed window is the caller's error."""
        ids = torch.tensor(np.asarray(prompt_ids, dtype=np.int64), device=self.device)
        embeds = torch.as_tensor(np.asarray(passage_embeds, dtype=np.float32), device=self.device).to(self.dtype)
        if ids.ndim != 1 or embeds.ndim != 2 or embeds.shape[1] != self.llm.config.hidden_size:
            raise InvalidRequest(
                "PASSAGE_EMBEDS", f"expected prompt ids [T] and passage embeddings [n, {self.llm.config.hidden_size}], "
                f"got {list(ids.shape)} and {list(embeds.shape)}"
            )
        positions = torch.nonzero(ids == self.placeholder_id).flatten()
        if len(positions) != embeds.shape[0]:
            raise InvalidRequest("PROMPT_IDS", f"prompt has {len(positions)} placeholders for {embeds.shape[0]} passages")
        if int(ids.min()) < 0 or int(ids.max()) >= self.llm.config.vocab_size:
            raise InvalidRequest("PROMPT_IDS", f"prompt ids must lie in [0, {self.llm.config.vocab_size})")
        inputs = self.llm.get_input_embeddings()(ids).clone()
        inputs[positions] = embeds
        return ids, embeds, inputs

    @torch.inference_mode()
    def start(self, prompt_ids: np.ndarray, passage_embeds: np.ndarray) -> tuple[WindowState, np.ndarray]:
        """Prefill a window into a cache of its own: the reference path (and windows too long for the pool)."""
        ids, embeds, inputs = self.window_inputs(prompt_ids, passage_embeds)
        # room for the prompt and every passage the window can still feed: steps never reallocate
        cache = reserved_cache(self.llm.config.num_hidden_layers, len(ids) + len(embeds))
        head, from_cache = self.heads.fill(cache, np.asarray(prompt_ids, dtype=np.int64), inputs, len(embeds))
        hidden = self.llm(inputs_embeds=inputs[None, head:], cache=cache, use_cache=True).last_hidden_state
        state = WindowState(cache=cache, embeds=embeds, length=int(ids.shape[0]),
                            cached_tokens=head if from_cache else 0)
        return state, self._scores(hidden, embeds)

    @staticmethod
    def check_index(state: WindowState, index: int) -> None:
        """A CHOICE must name one of the window's passages (checked before any step runs)."""
        if not 0 <= index < state.embeds.shape[0]:
            raise ValueError(f"passage index {index} out of range [0, {state.embeds.shape[0]})")

    @torch.inference_mode()
    def step(self, state: WindowState, index: int) -> np.ndarray:
        """Feed passage ``index`` to a window on its own cache: one token through transformers' forward."""
        self.check_index(state, index)
        hidden = self.llm(
            inputs_embeds=state.embeds[index][None, None], cache=state.cache, use_cache=True
        ).last_hidden_state
        state.length += 1
        return self._scores(hidden, state.embeds)

    @staticmethod
    def _scores(hidden: torch.Tensor, embeds: torch.Tensor) -> np.ndarray:
        return (hidden[0, -1] @ embeds.T).float().cpu().numpy()
