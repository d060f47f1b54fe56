"""The text-listwise baseline (RankGPT style) on the same LLM: the paper's comparison point.

This is the original implementation's ``ListwiseTextRanker``: passage *texts* go into the
prompt, the LLM generates ``[4] > [2] > ...`` greedily (up to 256 new tokens, until EOS),
and the answer is parsed back into a permutation. It runs in-process only, on the LLM of a
loaded :class:`~pe_rank.runtime.model.PeRankModel` plus its output head, and plugs into the
shared sliding window (:func:`pe_rank.core.ranker.slide`).
"""
from __future__ import annotations

import json
import re
import time
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.checkpoint import CheckpointError
from .weights import WeightFiles
from .model import PeRankModel
from ..core.ranker import slide
from ..core.types import RankOptions, RankStats, Timings

MAX_NEW_TOKENS = 256  # the original's generate(max_new_tokens=256)
LM_HEAD_KEY = "lm_head.weight"


def text_prompt(query: str, texts: Sequence[str]) -> str:
    """The user message of the original's ``ListwiseTextRanker``, word for word."""
    num = len(texts)
    prefix = (
        f"I will provide you with {num} passages.\n"
        f"Rank the passages based on their relevance to the search query: {query}.\n"
    )
    body = "".join(f"Passage {i}: {_replace_number(text.strip())}\n\n" for i, text in enumerate(texts, 1))
    post = (
        f"Search Query: {query}.\n"
        f"Rank the {num} relatively ordered passages above based on their relevance to the search query, "
        "output the ranking in descending order. The output format should be [] > [] > ..., e.g., [4] > [2] > ..., "
        f"Only respond with the ranking results with {num} unique numbers, do not say anything else or explain.\n\n"
    )
    return prefix + body + post


def _replace_number(text: str) -> str:
    """``[3]`` inside a passage becomes ``(3)``, so it cannot be read as a passage label."""
    return re.sub(r"\[(\d+)\]", r"(\1)", text)


def parse_ranking(output: str, n: int) -> list[int]:
    """The original's parser: digits only, 1-based to 0-based, first occurrence wins,
    out-of-range numbers dropped, then the passages it did not name in their input order."""
    cleaned = "".join(c if c.isdigit() else " " for c in output)
    picked: list[int] = []
    for token in cleaned.split():
        index = int(token) - 1
        if 0 <= index < n and index not in picked:
            picked.append(index)
    return picked + [i for i in range(n) if i not in picked]


def load_output_head(model: PeRankModel) -> torch.Tensor:
    """The LM head [vocab, hidden]: ``lm_head.weight`` from the checkpoint, else tied to the input embeddings."""
    weights = WeightFiles(model.info.folder)
    embeddings = model.llm.get_input_embeddings().weight
    if LM_HEAD_KEY in weights.key_to_file:
        (_, head, path), = weights.load([LM_HEAD_KEY])
        if tuple(head.shape) != tuple(embeddings.shape):
            raise CheckpointError(
                f"{path}: key {LM_HEAD_KEY!r} has shape {list(head.shape)}, the config implies "
                f"{list(embeddings.shape)}"
            )
        return head.to(model.dtype).to(model.device)
    return embeddings.detach()


def stop_ids(model: PeRankModel) -> set[int]:
    """Ids that end generation: the tokenizer's EOS (and config.json's eos_token_id, which
    is what the original's ``generate`` stopped on; for released checkpoints they agree)."""
    ids: set[int] = set()
    folder = model.info.folder
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.exists():
            continue
        eos = json.loads(path.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            try:
                ids.add(int(model.prompts.tokenizer.token_id(eos)))
            except KeyError:
                pass
            break
    config_eos = model.info.config.get("eos_token_id")
    for value in config_eos if isinstance(config_eos, list) else [config_eos]:
        if isinstance(value, int):
            ids.add(value)
    if not ids:
        raise CheckpointError(f"{folder}: no eos_token in the tokenizer files or config.json")
    return ids


@dataclass
class Generation:
    ids: list[int]
    prompt_tokens: int
    prefill_ms: float
    decode_ms: float


class TextListwiseRanker:
    """Greedy text generation with a KV cache on a PeRankModel's LLM."""

    def __init__(self, model: PeRankModel, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        self.model = model
        self.head = load_output_head(model)
        self.stop = stop_ids(model)
        self.max_new_tokens = max_new_tokens
        self.tokenizer = model.prompts.tokenizer

    def prompt_ids(self, query: str, texts: Sequence[str]) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.render_chat(text_prompt(query, texts)))

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int]) -> Generation:
        """Greedy decoding until EOS or ``max_new_tokens``; returns the new ids (EOS excluded)."""
        from transformers import DynamicCache

        llm, device = self.model.llm, self.model.device
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        cache = DynamicCache()
        t0 = time.perf_counter()
        hidden = llm(input_ids=ids, cache=cache, use_cache=True).last_hidden_state
        prefill_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        out: list[int] = []
        while len(out) < self.max_new_tokens:
            logits = hidden[0, -1].to(self.head.dtype) @ self.head.T
            if not torch.all(torch.isfinite(logits)):
                raise FloatingPointError("the LLM produced non-finite logits")
            token = int(torch.argmax(logits))
            if token in self.stop:
                break
            out.append(token)
            if len(out) >= self.max_new_tokens:
                break
            step = torch.tensor([[token]], dtype=torch.long, device=device)
            hidden = llm(input_ids=step, cache=cache, use_cache=True).last_hidden_state
        decode_ms = (time.perf_counter() - t0) * 1e3
        return Generation(out, len(prompt_ids), prefill_ms, decode_ms)

    def rank_window(self, query: str, texts: Sequence[str], timings: Timings | None = None) -> tuple[list[int], RankStats, str]:
        """One window: (local permutation, its cost, the generated text)."""
        generation = self.generate(self.prompt_ids(query, texts))
        if timings is not None:
            timings.prefill_ms += generation.prefill_ms
            timings.decode_ms += generation.decode_ms
        answer = self.tokenizer.decode(generation.ids)
        stats = RankStats(prompt_tokens=generation.prompt_tokens, decode_steps=len(generation.ids))
        return parse_ranking(answer, len(texts)), stats, answer

    async def rank(self, query: str, texts: Sequence[str], options: RankOptions,
                   timings: Timings | None = None) -> tuple[list[int], RankStats]:
        """Sliding windows over ``texts``; returns their indices, best first.

        ``options.top_n`` does not shorten generation: the model writes each window's whole
        ranking. ``decode_steps`` counts generated tokens.
        """

        async def rank_one(window: list[int], emit: int) -> tuple[list[int], RankStats]:
            local, stats, _ = self.rank_window(query, [texts[i] for i in window], timings)
            return local, stats

        return await slide(len(texts), options, rank_one)


_RANKERS: dict[int, tuple[weakref.ref, TextListwiseRanker]] = {}


def text_ranker_for(model: PeRankModel) -> TextListwiseRanker:
    """One TextListwiseRanker per loaded model (the output head is read once)."""
    entry = _RANKERS.get(id(model))
    if entry is None or entry[0]() is not model:
        entry = (weakref.ref(model, lambda _, key=id(model): _RANKERS.pop(key, None)), TextListwiseRanker(model))
        _RANKERS[id(model)] = entry
    return entry[1]


async def rank_text_listwise(model: PeRankModel, query: str, texts: Sequence[str], options: RankOptions,
                             timings: Timings | None = None) -> tuple[list[int], RankStats]:
    """The text-listwise baseline over ``texts`` with the shared sliding window: (order, stats)."""
    return await text_ranker_for(model).rank(query, list(texts), options, timings)

