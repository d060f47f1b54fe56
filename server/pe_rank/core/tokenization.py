"""Prompt tokenisation that reproduces the ids the released PE-Rank model was trained on.

The released checkpoints were trained and evaluated with transformers 4.37's *slow*
sentencepiece ``LlamaTokenizer``. Newer transformers tokenise the same files differently
(different ids for every prompt we checked), so for sentencepiece checkpoints we
re-implement exactly what 4.37 did:

* added tokens (``<s>``, ``<PLACEHOLDER>`` ...) are split out of the text first,
  honouring their ``lstrip``/``rstrip`` flags;
* ``legacy: true``: every remaining chunk is encoded by sentencepiece with its dummy
  prefix (a leading "▁" per chunk);
* ``legacy: false``: the dummy prefix is switched off in the model proto, one "▁" is
  prepended to the whole text (dropped again when a special token follows it) and chunks
  that start with a space are encoded behind ``<unk>`` so that space survives.

Checkpoints without ``tokenizer.model`` (BPE tokenizers, e.g. the demo's SmolLM2) use their
``tokenizer.json`` as the current Hugging Face fast tokenizer does, which is what such checkpoints
are made with, read by the tokenizers library (no transformers, so no PyTorch).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPIECE_UNDERLINE = "▁"


class PromptTokenizer(Protocol):
    """What the prompt builder needs from a tokenizer."""

    def render_chat(self, user_message: str) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def token_id(self, token: str) -> int: ...


@dataclass(frozen=True)
class _AddedToken:
    content: str
    lstrip: bool = False
    rstrip: bool = False


def _render_chat_template(template: str, user_message: str, special_tokens: dict[str, object]) -> str:
    """Render like transformers' apply_chat_template (sandboxed jinja, trim/lstrip blocks)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user_message}],
        add_generation_prompt=True,
        **special_tokens,
    )


class SlowLlamaTokenizer:
    """transformers 4.37 ``LlamaTokenizer`` (slow, sentencepiece) for encoding prompts."""

    def __init__(self, folder: Path) -> None:
        import sentencepiece as spm

        config = json.loads((folder / "tokenizer_config.json").read_text())
        self.legacy: bool = config.get("legacy", True) is not False
        model_bytes = (folder / "tokenizer.model").read_bytes()
        if not self.legacy:
            model_bytes = _without_dummy_prefix(model_bytes)
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_bytes)

        self._added: dict[str, tuple[int, _AddedToken]] = {}
        for idx, spec in config.get("added_tokens_decoder", {}).items():
            token = _AddedToken(spec["content"], bool(spec.get("lstrip")), bool(spec.get("rstrip")))
            self._added[token.content] = (int(idx), token)
        added_json = folder / "added_tokens.json"
        if added_json.exists():
            for content, idx in json.loads(added_json.read_text()).items():
                self._added.setdefault(content, (int(idx), _AddedToken(content)))

        self._special = _special_tokens_map(folder, config)
        self._all_special = {v for v in self._special.values() if isinstance(v, str)}
        self._all_special.update(t for v in self._special.values() if isinstance(v, list) for t in v)
        self.unk_token: str = config.get("unk_token") or "<unk>"
        self._unk_len = len(self._sp.encode(self.unk_token, out_type=str))
        self._chat_template: str = config.get("chat_template") or ""
        pattern = "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True))
        self._split_re = re.compile(f"({pattern})") if pattern else None

    def render_chat(self, user_message: str) -> str:
        if not self._chat_template:
            raise ValueError("tokenizer_config.json has no chat_template")
        return _render_chat_template(self._chat_template, user_message, self._special)

    def token_id(self, token: str) -> int:
        if token in self._added:
            return self._added[token][0]
        return int(self._sp.piece_to_id(token))

    def encode(self, text: str) -> list[int]:
        return [self.token_id(t) for t in self.tokenize(text)]

    def decode(self, ids: list[int]) -> str:
        """Generated ids to text, skipping added and special tokens (``skip_special_tokens=True``)."""
        skip = {idx for idx, _ in self._added.values()}
        size = self._sp.get_piece_size()
        return self._sp.decode_ids([int(i) for i in ids if int(i) not in skip and 0 <= int(i) < size])

    def tokenize(self, text: str) -> list[str]:
        if self.legacy or not text:
            return self._tokenize_with_added(text)
        tokens = self._tokenize_with_added(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self._all_special:
            tokens = tokens[1:]
        return tokens

    def _tokenize_with_added(self, text: str) -> list[str]:
        chunks = self._split_re.split(text) if self._split_re else [text]
        chunks = [c for c in chunks if c != ""] if self._split_re else chunks
        for i, chunk in enumerate(chunks):
            if chunk not in self._added:
                continue
            token = self._added[chunk][1]
            if token.rstrip and i + 1 < len(chunks) and chunks[i + 1] not in self._added:
                chunks[i + 1] = chunks[i + 1].lstrip()
            if token.lstrip and i > 0 and chunks[i - 1] not in self._added:
                chunks[i - 1] = chunks[i - 1].rstrip()
        out: list[str] = []
        for chunk in chunks:
            if not chunk:
                continue
            out.extend([chunk] if chunk in self._added else self._sp_tokenize(chunk))
        return out

    def _sp_tokenize(self, text: str) -> list[str]:
        tokens = self._sp.encode(text, out_type=str)
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return tokens
        tokens = self._sp.encode(self.unk_token + text, out_type=str)
        return tokens[self._unk_len :] if len(tokens) >= self._unk_len else tokens


class FastPromptTokenizer:
    """A Hugging Face ``tokenizer.json`` (BPE, e.g. the demo's SmolLM2) read with the tokenizers library.

    What transformers' fast tokenizer does for a prompt (``add_special_tokens=False``, the
    chat template rendered with the special tokens), without importing transformers, which
    imports PyTorch: the server builds prompts with this and stays torch-free.
    ``tests/test_tokenization.py`` holds it to transformers' ids.
    """

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (and no sentencepiece tokenizer.model)")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_truncation()
        self._tok.no_padding()
        template = folder / "chat_template.jinja"
        self._chat_template: str = config.get("chat_template") or (template.read_text() if template.exists() else "")
        self._special = _special_tokens_map(folder, config)

    def render_chat(self, user_message: str) -> str:
        if not self._chat_template:
            raise ValueError("the tokenizer has no chat_template")
        return _render_chat_template(self._chat_template, user_message, self._special)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_id(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise KeyError(token)
        return int(idx)


class EncoderTokenizer:
    """The encoder's tokenizer (``tokenizer.json``), for counting a passage's tokens torch-free.

    Counts include the special tokens the encoder adds ([CLS], [SEP]), as the encoder sees them.
    """

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (re-run `pe-rank export`)")
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()

    def counts(self, texts: list[str], cap: int) -> list[int]:
        """Tokens per text, truncated at ``cap``."""
        self._tok.enable_truncation(max_length=cap)
        return [len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=True)]


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split a protobuf message into (field number, wire type, raw bytes of the whole field)."""
    fields, pos = [], 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            pos += size
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"tokenizer.model: unsupported protobuf wire type {wire}")
        fields.append((key >> 3, wire, data[start:pos]))
    return fields


def _without_dummy_prefix(model: bytes) -> bytes:
    """ModelProto with normalizer_spec.add_dummy_prefix = false, as 4.37 does for legacy=false.

    Edited at the wire level (ModelProto field 3 = NormalizerSpec, its field 3 =
    add_dummy_prefix) so we do not depend on sentencepiece's generated protobuf module,
    whose required protobuf runtime conflicts with grpcio-tools'.
    """
    out = bytearray()
    for number, wire, raw in _fields(model):
        if number != 3 or wire != 2:
            out += raw
            continue
        _, body_start = _read_varint(raw, 0)
        _, body_start = _read_varint(raw, body_start)
        body = raw[body_start:]
        kept = b"".join(r for n, _, r in _fields(body) if n != 3) + bytes([0x18, 0x00])
        out += bytes([0x1A]) + _varint(len(kept)) + kept
    return bytes(out)


def _special_tokens_map(folder: Path, config: dict) -> dict[str, object]:
    """The jinja variables transformers passes to chat templates (bos_token, eos_token ...)."""
    names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    out: dict[str, object] = {}
    for name in names:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            out[name] = value
    extra = config.get("additional_special_tokens")
    if extra:
        out["additional_special_tokens"] = [t["content"] if isinstance(t, dict) else t for t in extra]
    return out


def load_prompt_tokenizer(folder: Path) -> PromptTokenizer:
    """Pick the tokenizer implementation that matches how the checkpoint was trained."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if (folder / "tokenizer.model").exists() and config.get("tokenizer_class", "").startswith("Llama"):
        return SlowLlamaTokenizer(folder)
    return FastPromptTokenizer(folder)
