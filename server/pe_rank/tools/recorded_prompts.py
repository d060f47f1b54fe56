"""Prompt ids recorded with a checkpoint's own tokenizer, for machines that cannot run it.

The conformance checkpoints use the slow sentencepiece Llama tokenizer, and a bare GPU machine
(PyTorch, transformers, numpy) has no ``sentencepiece``. Every prompt the conformance cases
build (one per window size, plus the probe prompts that find the shared head) is therefore
recorded once here, with the real tokenizer, into ``prompt_ids.json`` beside the vectors; the
bench replays those ids when sentencepiece is missing. tests/test_gpu_bench.py re-records
them and compares, so the file cannot drift from the tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ..core.prompt import HEAD_PROBES, PLACEHOLDER, prompt_text
from ..core.ranker import window_bounds

FILE = "prompt_ids.json"
DEFAULT_CONFORMANCE = Path(__file__).resolve().parents[3] / "tests" / "data" / "conformance"
CONFORMANCE_CHECKPOINTS = ("tiny-a", "tiny-b")


class RecordedPromptTokenizer:
    """A PromptTokenizer that knows only recorded prompts: message in, the recorded ids out."""

    def __init__(self, recorded: dict[str, Any]) -> None:
        self._ids = {prompt_text(p["query"], p["n"]): p["input_ids"] for p in recorded["prompts"]}
        self._tokens: dict[str, int] = recorded["token_ids"]

    def render_chat(self, user_message: str) -> str:
        return user_message  # the recorded ids already hold the chat template

    def encode(self, text: str) -> list[int]:
        if text not in self._ids:
            raise ValueError(f"no recorded prompt ids for this prompt ({len(self._ids)} recorded; see {FILE})")
        return list(self._ids[text])

    def token_id(self, token: str) -> int:
        return int(self._tokens[token])


def prompts_needed(cases: Iterable[dict]) -> list[tuple[str, int]]:
    """(query, n) of every prompt ranking the cases builds, including the head-cache probes."""
    needed: set[tuple[str, int]] = set()
    for case in cases:
        r = case["request"]
        for start, end in window_bounds(len(r["passages"]), r["window_size"], r["stride"]):
            needed.add((r["query"], end - start))
            needed.update((probe, end - start) for probe in HEAD_PROBES)
    return sorted(needed, key=lambda item: (item[1], item[0]))


def record(checkpoint: Path, cases: Iterable[dict]) -> dict[str, Any]:
    """The prompt ids of ``cases`` as the checkpoint's own tokenizer builds them."""
    from ..core.prompt import PromptBuilder
    from ..core.tokenization import load_prompt_tokenizer

    builder = PromptBuilder(load_prompt_tokenizer(checkpoint))
    return {"token_ids": {PLACEHOLDER: builder.placeholder_id},
            "prompts": [{"query": q, "n": n, "input_ids": builder.build(q, n)[0].tolist()}
                        for q, n in prompts_needed(cases)]}


def record_all(folder: Path, names: Iterable[str]) -> dict[str, Any]:
    return {name: record(folder / name, json.loads((folder / f"{name}.cases.json").read_text())["cases"])
            for name in names}


def load(folder: Path, name: str) -> RecordedPromptTokenizer | None:
    path = folder / FILE
    if not path.exists():
        return None
    recorded = json.loads(path.read_text())
    return RecordedPromptTokenizer(recorded[name]) if name in recorded else None


if __name__ == "__main__":  # python -m pe_rank.tools.recorded_prompts [FOLDER]: (re)write FOLDER/prompt_ids.json
    import sys


    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CONFORMANCE
    (target / FILE).write_text(json.dumps(record_all(target, CONFORMANCE_CHECKPOINTS), separators=(",", ":")) + "\n")
    print(target / FILE)
