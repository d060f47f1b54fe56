"""The server's torch-free tokenizers give exactly transformers' ids.

The server reads tokenizer.json files with the tokenizers library (no transformers, which
imports PyTorch). Held here to transformers on real tokenizers: SmolLM2's byte-level BPE with its
ChatML template (the demo's prompt tokenizer, in models/assets) and all-MiniLM-L6-v2's WordPiece
(the demo's encoder); tests/test_demo_model.py does the same on the demo checkpoint itself.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pe_rank.core.prompt import PLACEHOLDER, RANK_TOKEN, PromptBuilder, prompt_text
from pe_rank.core.tokenization import EncoderTokenizer, FastPromptTokenizer, load_prompt_tokenizer
from pe_rank.models.tokenizer_assets import ENCODER_TOKENIZER, PROMPT_TOKENIZER

QUERIES = ["how long is life cycle of flea", "What is  ÆØÅ  naïve café? 😀", "x", f"a {RANK_TOKEN} inside",
           "tabs\tand\nnew lines\n\n", " leading and trailing spaces ", "日本語のクエリ", "1999-12-31: 3.5% [ok]"]
TEXTS = ["short", "word " * 600, "Ünïcödé façade " * 100, "", "a\u0301b " * 300, "[CLS] [SEP] [MASK]", "😀" * 50]


def assert_same_prompts(folder: Path) -> None:
    """Rendered chat, ids and special-token ids equal transformers' for many queries and window sizes."""
    hf = AutoTokenizer.from_pretrained(str(folder))
    ours = load_prompt_tokenizer(folder)
    assert isinstance(ours, FastPromptTokenizer)
    for query in QUERIES:
        for n in (1, 2, 20):
            message = prompt_text(query, n)
            rendered = hf.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                              tokenize=False)
            assert ours.render_chat(message) == rendered
            assert ours.encode(rendered) == list(hf(rendered, add_special_tokens=False)["input_ids"]), (query, n)
    for token in (PLACEHOLDER, RANK_TOKEN):
        assert ours.token_id(token) == hf.convert_tokens_to_ids(token)
    ids, positions = PromptBuilder(ours).build(QUERIES[0], 20)
    assert len(positions) == 20 and all(ids[positions] == ours.token_id(PLACEHOLDER))


def test_prompt_tokenizer_equals_transformers_on_a_bpe_with_chat_template():
    assert_same_prompts(PROMPT_TOKENIZER)


@pytest.mark.parametrize("cap", [513, 20])
def test_encoder_token_counts_equal_transformers(cap):
    hf = AutoTokenizer.from_pretrained(str(ENCODER_TOKENIZER))
    expected = [len(ids) for ids in hf(TEXTS, truncation=True, max_length=cap)["input_ids"]]
    assert EncoderTokenizer(ENCODER_TOKENIZER).counts(TEXTS, cap) == expected
    assert max(expected) == cap and min(expected) == 2  # truncated, and [CLS] [SEP] counted


def test_a_folder_without_tokenizer_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        EncoderTokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_prompt_tokenizer(tmp_path)
