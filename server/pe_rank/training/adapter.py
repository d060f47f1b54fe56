"""LoRA on the LLM's top layers, trained on cached lower-layer states.

With the projector and the lower layers frozen, the input of layer ``first`` for a
teacher-forced window never changes during training. It is computed once per window
(no gradients, the expensive part) and the LoRA layers above it train on it, so a step
costs a forward and a backward through the top layers only. The adapter is a standard
PEFT LoRA adapter of the checkpoint's decoder stack; merged into the weights it leaves a
plain released-layout checkpoint that every backend loads unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def attach_lora(llm: nn.Module, first: int, rank: int, seed: int = 0) -> nn.Module:
    """Wrap ``llm`` (decoder stack, frozen) with LoRA on layers ``first..`` only; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    layers = len(llm.layers)
    if not 0 <= first < layers:
        raise ValueError(f"adapter layers must start in [0, {layers}), got {first}")
    llm.requires_grad_(False)
    torch.manual_seed(seed)  # LoRA's A matrices are initialised at random
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                        layers_to_transform=list(range(first, layers)), layers_pattern="layers")
    return get_peft_model(llm, config)


def lower_states(llm: nn.Module, inputs: Tensor, first: int) -> Tensor:
    """The input of layer ``first`` [T, H] for input embeddings [T, H] (no gradients)."""
    captured: dict[str, Tensor] = {}

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = llm.layers[first].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            llm(inputs_embeds=inputs[None], use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"][0].detach()


class _Stop(Exception):
    """Ends the forward pass once the wanted layer's input is captured."""


def top_hidden(llm: nn.Module, states: Tensor, first: int) -> Tensor:
    """Final-norm hidden states [T, H] from layer ``first``'s input [T, H] (causal, positions 0..T-1)."""
    x = states[None]
    positions = torch.arange(x.shape[1], device=x.device)[None]
    rotary = llm.rotary_emb(x, position_ids=positions)
    for layer in llm.layers[first:]:
        x = layer(x, attention_mask=None, position_ids=positions, position_embeddings=rotary)
    return llm.norm(x)[0]


def merged_weights(stack: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """``{prefix + name + ".weight": W + delta}`` for every LoRA-adapted linear layer of ``stack``."""
    return {f"{prefix}{name}.weight": (module.base_layer.weight + module.get_delta_weight("default")).detach()
            for name, module in stack.named_modules() if hasattr(module, "get_delta_weight")}


def adapter_state(peft_model: nn.Module) -> dict[str, Tensor]:
    """The LoRA weights only (what a resumed run needs; the base weights are the input's)."""
    return {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}


def save_adapter(peft_model: nn.Module, folder: Path) -> None:
    peft_model.save_pretrained(str(folder))


def merge_adapter(llm: nn.Module, folder: Path) -> nn.Module:
    """``llm`` with the PEFT adapter in ``folder`` merged into its weights (a plain module again)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(llm, str(folder)).merge_and_unload()
