"""The LLM side of dynamic-constrained decoding: prefill a window, feed chosen passages.

``TorchStepper`` is the single implementation of "prefill a window" and "feed the chosen
passage(s)"; the decode engine (:mod:`~pe_rank.runtime.engine`) drives it, in-process and
inside Triton's ``pe_llm``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import InvalidRequest
from .head_cache import HeadCache
from .kv_cache import WindowCaches, reserved_cache
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

    @torch.inference_mode()
    def start(self, prompt_ids: np.ndarray, passage_embeds: np.ndarray) -> tuple[WindowState, np.ndarray]:
        ids_array = np.asarray(prompt_ids, dtype=np.int64)
        ids = torch.tensor(ids_array, device=self.device)
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
        # room for the prompt and every passage the window can still feed: steps never reallocate
        cache = reserved_cache(self.llm.config.num_hidden_layers, len(ids) + len(embeds))
        head, from_cache = self.heads.fill(cache, ids_array, inputs, len(embeds))
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
        self.check_index(state, index)
        hidden = self.llm(
            inputs_embeds=state.embeds[index][None, None], cache=state.cache, use_cache=True
        ).last_hidden_state
        state.length += 1
        return self._scores(hidden, state.embeds)

    @torch.inference_mode()
    def step_many(self, states: Sequence[WindowState], indices: Sequence[int]) -> list[np.ndarray]:
        """``step`` for several windows in ONE forward pass, so the weights are read once per batch.

        A decode step is memory-bandwidth bound (one token through every weight), so the steps
        of concurrent windows cost little more together than one alone. The windows' caches
        differ in length and stay where they are: the linear layers run on the batch, each
        window's new key/value is written into its own reserved cache, and attention runs per
        window over that cache (:class:`~pe_rank.runtime.kv_cache.WindowCaches`,
        :func:`~pe_rank.runtime.kv_cache.window_attention`); each window's position id is its own
        length, so RoPE is what ``step`` gives. Nothing is padded or copied.

        One window goes through ``step`` itself, bit-identical, and so do windows that reach the
        model's sliding window (Mistral), which per-window attention does not apply. Batched
        scores differ from ``step``'s only by float noise of the batched matrix products, ~1e-6.
        Bad arguments raise before anything runs, and a failed forward is rolled back, leaving
        every state unchanged, so a caller may retry the windows one by one.
        """
        if len(states) != len(indices):
            raise ValueError(f"{len(states)} states for {len(indices)} indices")
        if len({id(state) for state in states}) != len(states):
            raise ValueError("a window may take only one step per batch")
        for state, index in zip(states, indices):
            self.check_index(state, index)
        lengths = [state.length for state in states]
        sliding = getattr(self.llm.config, "sliding_window", None)
        if len(states) <= 1 or (sliding is not None and max(lengths) >= sliding):
            # per-window attention has no sliding-window mask: windows that reach it step alone
            return [self.step(state, index) for state, index in zip(states, indices)]

        caches = WindowCaches([state.cache for state in states], lengths)
        inputs = torch.stack([state.embeds[index] for state, index in zip(states, indices)])[:, None]
        positions = torch.tensor(lengths, dtype=torch.long, device=self.device)[:, None]
        try:
            hidden = self.llm(
                inputs_embeds=inputs, attention_mask=caches.ignored_mask(len(states), self.device),
                position_ids=positions, cache=caches, use_cache=True,
            ).last_hidden_state
        except BaseException:
            caches.rollback()
            raise
        for state in states:
            state.length += 1
        return [self._scores(hidden[b : b + 1], state.embeds) for b, state in enumerate(states)]

    @staticmethod
    def _scores(hidden: torch.Tensor, embeds: torch.Tensor) -> np.ndarray:
        return (hidden[0, -1] @ embeds.T).float().cpu().numpy()
