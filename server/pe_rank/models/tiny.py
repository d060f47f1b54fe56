"""Tiny random PE-Rank checkpoints in the released layout, built fully offline.

Used by tests and for trying the service without model downloads: a 2-layer Mistral
(hidden 64) with a sentencepiece tokenizer trained here, a 2-layer BERT encoder (hidden 32)
with a WordPiece vocabulary built here, and a random projector.
"""
from __future__ import annotations

import io
import json
import shutil
import string
from collections import Counter
from pathlib import Path

import torch

from ..runtime.weights import build_projector
from ..core.prompt import PLACEHOLDER, RANK_TOKEN, prompt_text

MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

_CORPUS_WORDS = (
    "the of and to in is was for on that with as by at from it an be this which or are were has "
    "have had not but what all when there can more one about who how where why cost long life "
    "water food cook time year people world state city law health body blood heart cell data "
    "search query passage passages rank ranking relevance order special token original text "
    "provide descending output unique relatively based above enclosed representing will you "
    "with each followed only number system computer science history war country government"
).split()


def _corpus() -> list[str]:
    """Deterministic training text: the prompt itself plus plain sentences."""
    lines = [prompt_text(q, n) for q, n in (("how long is the life cycle of a flea", 3), ("what is rank", 20))]
    words = _CORPUS_WORDS
    for i in range(400):
        lines.append(" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(12)) + ".")
    lines.append(string.ascii_letters + string.digits + string.punctuation)
    return [line for text in lines for line in text.split("\n") if line]


def _train_sentencepiece(vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2,
    )
    return model.getvalue()


def _wordpiece_vocab() -> list[str]:
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    counts = Counter(w.lower().strip(string.punctuation) for line in _corpus() for w in line.split())
    words = [w for w, _ in counts.most_common() if w and w not in chars]
    return specials + chars + [f"##{c}" for c in chars] + words


def _tokenizer_config(sp_size: int, legacy: bool) -> dict:
    added = {0: "<unk>", 1: "<s>", 2: "</s>", sp_size: PLACEHOLDER, sp_size + 1: RANK_TOKEN}
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": t, **flags} for i, t in added.items()},
        "additional_special_tokens": [PLACEHOLDER, RANK_TOKEN],
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "chat_template": MISTRAL_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "legacy": legacy, "model_max_length": 32768, "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer",
    }


def _save_encoder(folder: Path, vocab: list[str], seed: int, hidden: int) -> dict[str, torch.Tensor]:
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "mask_token": "[MASK]",
    }, indent=2))
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(seed + 1)
    encoder = BertModel(config)
    encoder.save_pretrained(str(folder))
    return encoder.state_dict()


def make_tiny(out: Path | str, seed: int = 0, projector_type: str = "mlp2x_gelu",
              pooling: str = "mean", legacy: bool = False, encoder_hidden: int = 32) -> Path:
    """Write a tiny random checkpoint to ``out`` (replaced if it exists)."""
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralForCausalLM

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sp_bytes = _train_sentencepiece(vocab_size=800)
    (tmp / "tokenizer.model").write_bytes(sp_bytes)
    import sentencepiece as spm

    sp_size = spm.SentencePieceProcessor(model_proto=sp_bytes).get_piece_size()
    (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(sp_size, legacy), indent=2))
    (tmp / "added_tokens.json").write_text(json.dumps({PLACEHOLDER: sp_size, RANK_TOKEN: sp_size + 1}))
    (tmp / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "additional_special_tokens": [PLACEHOLDER, RANK_TOKEN]}, indent=2))

    encoder_state = _save_encoder(tmp / "encoder", _wordpiece_vocab(), seed, encoder_hidden)
    llm_config = MistralConfig(
        vocab_size=sp_size + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        sliding_window=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    llm = MistralForCausalLM(llm_config)
    projector = build_projector(projector_type, encoder_hidden, 64)
    state = {k: v.contiguous() for k, v in llm.state_dict().items()}
    state.update({f"model.projector.{k}": v.contiguous() for k, v in projector.state_dict().items()})
    state.update({f"model.encoder.encoder.{k}": v.contiguous() for k, v in encoder_state.items()})
    save_file(state, str(tmp / "model.safetensors"))

    config = llm_config.to_dict()
    config.update(model_type="embed_mistral", architectures=["EmbedMistralForCausalLM"], encoder_name="encoder",
                  encoder_pooling=pooling, projector_type=projector_type, embedding_size=encoder_hidden)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
