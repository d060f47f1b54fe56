"""The LLM side of dynamic-constrained decoding, one window at a time.

``TorchStepper`` is the single implementation of "prefill a window" and "feed the chosen
passage"; the in-process backend and Triton's ``pe_llm`` model both call it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn


class StepSession(Protocol):
    """One window's decoding state: start once, step per emitted passage, end to free it.

    ``last=True`` tells the backend no further call follows, so it may free the state with
    that call (Triton: the END flag rides on it, saving a round trip); ``end()`` is still
    always called and must then be a no-op.
    """

    async def start(self, prompt_ids: np.ndarray, passage_embeds: np.ndarray, last: bool = False) -> np.ndarray: ...

    async def step(self, index: int, last: bool = False) -> np.ndarray: ...

    async def end(self) -> None: ...


class StepBackend(Protocol):
    def session(self) -> StepSession: ...


@dataclass
class WindowState:
    """KV cache plus the window's projected passage embeddings [n, H]."""

    cache: object
    embeds: torch.Tensor
    length: int


class TorchStepper:
    """Runs the LLM: scores s_i = h . e_i from the final-norm hidden state at the last position."""

    def __init__(self, llm: nn.Module, placeholder_id: int, dtype: torch.dtype, device: torch.device) -> None:
        self.llm = llm
        self.placeholder_id = placeholder_id
        self.dtype = dtype
        self.device = device

    @torch.inference_mode()
    def start(self, prompt_ids: np.ndarray, passage_embeds: np.ndarray) -> tuple[WindowState, np.ndarray]:
        from transformers import DynamicCache

        ids = torch.tensor(np.asarray(prompt_ids, dtype=np.int64), device=self.device)
        embeds = torch.as_tensor(np.asarray(passage_embeds, dtype=np.float32), device=self.device).to(self.dtype)
        if ids.ndim != 1 or embeds.ndim != 2 or embeds.shape[1] != self.llm.config.hidden_size:
            raise ValueError(
                f"expected prompt ids [T] and passage embeddings [n, {self.llm.config.hidden_size}], "
                f"got {list(ids.shape)} and {list(embeds.shape)}"
            )
        positions = torch.nonzero(ids == self.placeholder_id).flatten()
        if len(positions) != embeds.shape[0]:
            raise ValueError(f"prompt has {len(positions)} placeholders for {embeds.shape[0]} passages")
        if int(ids.min()) < 0 or int(ids.max()) >= self.llm.config.vocab_size:
            raise ValueError(f"prompt ids must lie in [0, {self.llm.config.vocab_size})")
        inputs = self.llm.get_input_embeddings()(ids).clone()
        inputs[positions] = embeds
        cache = DynamicCache()
        hidden = self.llm(inputs_embeds=inputs[None], past_key_values=cache, use_cache=True).last_hidden_state
        state = WindowState(cache=cache, embeds=embeds, length=int(ids.shape[0]))
        return state, self._scores(hidden, embeds)

    @torch.inference_mode()
    def step(self, state: WindowState, index: int) -> np.ndarray:
        if not 0 <= index < state.embeds.shape[0]:
            raise ValueError(f"passage index {index} out of range [0, {state.embeds.shape[0]})")
        hidden = self.llm(
            inputs_embeds=state.embeds[index][None, None], past_key_values=state.cache, use_cache=True
        ).last_hidden_state
        state.length += 1
        return self._scores(hidden, state.embeds)

    @staticmethod
    def _scores(hidden: torch.Tensor, embeds: torch.Tensor) -> np.ndarray:
        return (hidden[0, -1] @ embeds.T).float().cpu().numpy()


class InProcessSession:
    """A StepSession over TorchStepper in this process (blocking calls; fine for the CLI)."""

    def __init__(self, stepper: TorchStepper) -> None:
        self._stepper = stepper
        self._state: WindowState | None = None

    async def start(self, prompt_ids: np.ndarray, passage_embeds: np.ndarray, last: bool = False) -> np.ndarray:
        self._state, scores = self._stepper.start(prompt_ids, passage_embeds)
        return scores

    async def step(self, index: int, last: bool = False) -> np.ndarray:
        if self._state is None:
            raise RuntimeError("step before start")
        return self._stepper.step(self._state, index)

    async def end(self) -> None:
        self._state = None


class InProcessBackend:
    def __init__(self, stepper: TorchStepper) -> None:
        self.stepper = stepper

    def session(self) -> InProcessSession:
        return InProcessSession(self.stepper)
