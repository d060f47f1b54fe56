"""The decode engine's memory and its one batched step: a static KV pool indexed by slot.

Everything a live window needs between steps lives in tensors allocated once, when the engine
starts, for ``slots`` windows of up to ``max_len`` tokens and ``max_passages`` passages:

- keys and values, one ``[slots, kv_heads, max_len, head_dim]`` tensor per layer;
- the window's projected passage embeddings ``[slots, max_passages, H]``;
- which passages it has not emitted yet ``[slots, max_passages]``, its length, and the embedding
  it feeds next.

A window is prefilled into its slot through transformers' own forward (the prompt head's keys
and values come from the head cache), so its prefill is the reference's. A decode step then
advances every live window at once: per layer, one write of the batch's new keys/values into
the pool and one attention over the batch (SDPA with a per-slot length mask), the scores
``h . e_i`` of every window in one batched matmul, and the pick (argmax over the passages not
yet emitted, ties to the lowest index), the pool's bookkeeping and the next input's gather on
the device. The host gets one copy per step: each window's pick and scores, which its
:class:`~pe_rank.core.ranker.WindowDecoder` checks (the rule is written once, there).

A step with a single live window takes the exact path: attention over exactly its filled keys,
no mask, so it is bit-identical to :meth:`TorchStepper.step` (masked attention over a padded
buffer differs by ~1e-8). Nothing is allocated per step; a failed step changes no window (the
lengths and masks move only after the forward), so it can be retried.

Shapes are fixed per batch bucket (1, 2, 4, ... slots) when the step is captured: on CUDA, a
CUDA graph per bucket (``graphs=True``; written, not yet measured on a GPU), and
``torch.compile(fullgraph=True)`` of :meth:`PoolStepper.bucket_step` works on the CPU
(tests/test_pool.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache, DynamicLayer

from ..core.errors import InvalidRequest
from .steps import TorchStepper


class SlotLayer(DynamicLayer):
    """One layer of one slot, as transformers' Cache layer: prefill writes straight into the pool."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self._rows = (keys, values)  # [1, kv_heads, max_len, head_dim] views of the pool
        self.device = keys.device
        self.keys, self.values = keys[:, :, :0], values[:, :, :0]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        keys, values = self._rows
        keys[:, :, start:end] = key_states  # a window past the slot's end raises here, never reaches a neighbour
        values[:, :, start:end] = value_states
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values


@dataclass
class Prefill:
    """A window on its way into its slot: the prompt's inputs, the slot's cache view, how far it got."""

    slot: int
    n: int                # passages
    inputs: torch.Tensor  # [T, H]: the prompt's input embeddings, placeholders replaced
    cache: Cache
    done: int             # prompt tokens in the slot so far (the head first)
    cached_tokens: int    # of them, taken from the head cache
    hidden: torch.Tensor | None = None

    @property
    def remaining(self) -> int:
        return len(self.inputs) - self.done


@dataclass
class StepResult:
    """A step's answer for each stepped slot: the device's pick and the scores it came from."""

    picks: list[int]
    scores: list[np.ndarray]  # [n] per slot, float32


class KVPool:
    """The tensors, allocated once; a slot is a row of each."""

    def __init__(self, llm: nn.Module, slots: int, max_len: int, max_passages: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        config = llm.config
        kv_heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.passages = torch.zeros(slots, max_passages, config.hidden_size, dtype=dtype, device=device)
        self.remaining = torch.zeros(slots, max_passages, dtype=torch.bool, device=device)
        # a slot not decoding parks at the last position: a batched step computes every row below its top,
        # and a parked row's throw-away key lands where no prefill writes (a prompt leaves room for a passage)
        self.lengths = torch.full((slots,), max_len - 1, dtype=torch.long, device=device)
        self.next_input = torch.zeros(slots, config.hidden_size, dtype=dtype, device=device)
        self.live = torch.zeros(slots, dtype=torch.bool, device=device)
        self.slots, self.max_len, self.max_passages = slots, max_len, max_passages
        # the step's attention has no sliding-window mask: a window that would reach it runs on its own cache
        self.sliding = getattr(config, "sliding_window", None)
        self.count = [0] * slots  # passages per slot (host)
        self.host_lengths = [0] * slots

    def cache(self, slot: int) -> Cache:
        return Cache(layers=[SlotLayer(k[slot : slot + 1], v[slot : slot + 1]) for k, v in zip(self.keys, self.values)])

    def fits(self, prompt_tokens: int, passages: int) -> bool:
        tokens = prompt_tokens + passages
        return tokens <= self.max_len and passages <= self.max_passages and (self.sliding is None
                                                                            or tokens <= self.sliding)

    def bytes(self) -> int:
        tensors = [*self.keys, *self.values, self.passages, self.remaining, self.lengths, self.next_input]
        return sum(t.numel() * t.element_size() for t in tensors)


class PoolStepper:
    """Prefill into a slot, and one decode step for a set of slots, on a :class:`KVPool`."""

    def __init__(self, stepper: TorchStepper, slots: int, max_len: int, max_passages: int,
                 graphs: bool = False) -> None:
        self.stepper = stepper
        self.llm = stepper.llm
        self.pool = KVPool(self.llm, slots, max_len, max_passages, stepper.dtype, stepper.device)
        self.layers = list(self.llm.layers[: self.llm.config.num_hidden_layers])
        attention = self.layers[0].self_attn
        self.gqa = getattr(attention, "num_key_value_groups", 1) > 1
        self.head_dim = attention.head_dim
        self.graphs: dict[int, tuple] = {}
        if graphs and stepper.device.type == "cuda":
            self.capture()

    # ---- a window enters its slot

    def fits(self, prompt_tokens: int, passages: int) -> bool:
        return self.pool.fits(prompt_tokens, passages)

    @torch.inference_mode()
    def begin(self, slot: int, prompt_ids: np.ndarray, passage_embeds: np.ndarray) -> Prefill:
        """Start a window's prefill into ``slot``: its prompt head comes from the head cache."""
        pool = self.pool
        ids, embeds, inputs = self.stepper.window_inputs(prompt_ids, passage_embeds)
        n = embeds.shape[0]
        if not pool.fits(len(ids), n):
            raise InvalidRequest("PROMPT_IDS", f"a window of {len(ids)} prompt tokens and {n} passages does not fit "
                                               f"a slot of {pool.max_len} tokens and {pool.max_passages} passages")
        pool.live[slot] = False
        pool.lengths[slot] = pool.max_len - 1  # parked while its prefill spans turns with batched steps
        cache = pool.cache(slot)
        head, from_cache = self.stepper.heads.fill(cache, np.asarray(prompt_ids, dtype=np.int64), inputs, n)
        pool.passages[slot, :n] = embeds
        pool.passages[slot, n:] = 0
        return Prefill(slot=slot, n=n, inputs=inputs, cache=cache, done=head, cached_tokens=head if from_cache else 0)

    @torch.inference_mode()
    def advance(self, prefill: Prefill, tokens: int) -> None:
        """Prefill the next ``tokens`` of the prompt (transformers' forward, writing into the slot)."""
        end = min(prefill.done + tokens, len(prefill.inputs))
        prefill.hidden = self.llm(inputs_embeds=prefill.inputs[None, prefill.done : end], cache=prefill.cache,
                                  use_cache=True).last_hidden_state
        prefill.done = end

    @torch.inference_mode()
    def finish(self, prefill: Prefill) -> tuple[int, np.ndarray]:
        """The prefilled window goes live: (the device's first pick, its first scores [n], as TorchStepper's)."""
        pool, slot = self.pool, prefill.slot
        n = prefill.n
        pool.remaining[slot] = False
        pool.remaining[slot, :n] = True
        pool.lengths[slot] = len(prefill.inputs)
        pool.count[slot], pool.host_lengths[slot] = n, len(prefill.inputs)
        scores = prefill.hidden[0, -1] @ pool.passages[slot, :n].T  # as TorchStepper._scores
        packed = self._decide(torch.tensor([slot], device=pool.lengths.device), scores[None], n)
        pool.live[slot] = True
        host = packed.cpu().numpy()[0]
        return int(host[0]), host[1 : 1 + n].copy()

    def free(self, slot: int) -> None:
        self.pool.live[slot] = False
        self.pool.lengths[slot] = self.pool.max_len - 1
        self.pool.remaining[slot] = False
        self.pool.count[slot] = 0

    @torch.inference_mode()
    def overrule(self, slot: int, device_pick: int, pick: int) -> None:
        """The host rule chose otherwise than the device: feed the rule's pick (never expected)."""
        pool = self.pool
        pool.remaining[slot, device_pick] = True
        pool.remaining[slot, pick] = False
        pool.next_input[slot] = pool.passages[slot, pick]

    # ---- one decode step

    @torch.inference_mode()
    def step(self, slots: list[int]) -> StepResult:
        """Feed each slot its device-chosen passage; one forward for them all, one copy to the host."""
        if not slots:
            return StepResult([], [])
        if len(slots) == 1:
            packed = self._lone_step(slots[0])
        else:
            packed = self._batched_step(slots)
        host = packed.cpu().numpy()  # the step's one device -> host copy
        for slot in slots:
            self.pool.host_lengths[slot] += 1
        return StepResult([int(row[0]) for row in host],
                          [row[1 : 1 + self.pool.count[s]].copy() for s, row in zip(slots, host)])

    def _lone_step(self, slot: int) -> torch.Tensor:
        """One window: attention over exactly its filled keys, no mask; bit-identical to TorchStepper.step."""
        pool = self.pool
        rows = torch.tensor([slot], device=pool.lengths.device)
        length = pool.host_lengths[slot]
        hidden = self._forward(pool.next_input[slot : slot + 1], rows, pool.lengths[slot : slot + 1],
                               slice(slot, slot + 1), length + 1, None)
        n = pool.count[slot]
        scores = (hidden[0] @ pool.passages[slot, :n].T)[None]
        pool.lengths[slot] += 1
        return self._decide(rows, scores, n)

    def _batched_step(self, slots: list[int]) -> torch.Tensor:
        """Several windows: every slot below the highest stepped one runs; the others are masked out."""
        pool = self.pool
        top = max(slots) + 1
        kv_len = max(pool.host_lengths[s] for s in slots) + 1
        stepping = torch.zeros(top, dtype=torch.bool, device=pool.lengths.device)
        stepping[torch.tensor(slots, device=stepping.device)] = True
        packed = self._bucket(top, kv_len, stepping)
        return packed[torch.tensor(slots, device=packed.device)]

    def _bucket(self, top: int, kv_len: int, stepping: torch.Tensor) -> torch.Tensor:
        size = min((b for b in self.graphs if b >= top), default=None)
        if size is None:
            return self.bucket_step(top, kv_len, stepping)
        # CUDA: the captured step of the smallest bucket that holds these rows, over the whole pool length
        static_stepping, output, cuda_graph = self.graphs[size]
        static_stepping.zero_()
        static_stepping[:top] = stepping
        cuda_graph.replay()
        return output[:top].clone()

    def bucket_step(self, top: int, kv_len: int, stepping: torch.Tensor) -> torch.Tensor:
        """Rows [0, top) in fixed shapes: the capturable step (no host sync, no data-dependent Python).

        Rows not ``stepping`` (free slots, or windows not stepped now) compute and are discarded:
        their keys go to their next free position, which their own next step overwrites, and
        nothing of theirs advances.
        """
        pool = self.pool
        rows = torch.arange(top, device=pool.lengths.device)
        positions = pool.lengths[:top].clamp(max=pool.max_len - 1)  # a free slot's writes stay in its row
        key_positions = torch.arange(kv_len, device=rows.device)
        mask = (key_positions[None, :] <= positions[:, None])[:, None, None, :]
        hidden = self._forward(pool.next_input[:top], rows, positions, slice(0, top), kv_len, mask)
        scores = torch.bmm(pool.passages[:top], hidden[:, :, None])[:, :, 0]
        pool.lengths[:top] += stepping.long()
        return self._decide(rows, scores, pool.max_passages, stepping)

    def _forward(self, inputs: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, batch: slice,
                 kv_len: int, mask: torch.Tensor | None) -> torch.Tensor:
        """The decoder for one token per row, written for the pool; the model's own modules, in its order."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        pool = self.pool
        x = inputs[:, None, :]
        cos, sin = self.llm.rotary_emb(x, position_ids=positions[:, None])
        shape = (x.shape[0], 1, -1, self.head_dim)
        for index, layer in enumerate(self.layers):
            attention = layer.self_attn
            residual = x
            h = layer.input_layernorm(x)
            q = attention.q_proj(h).view(shape).transpose(1, 2)
            k = attention.k_proj(h).view(shape).transpose(1, 2)
            v = attention.v_proj(h).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys, values = pool.keys[index], pool.values[index]
            keys[rows, :, positions] = k[:, :, 0]
            values[rows, :, positions] = v[:, :, 0]
            extra = {"enable_gqa": True} if self.gqa else {}
            out = F.scaled_dot_product_attention(q, keys[batch, :, :kv_len], values[batch, :, :kv_len],
                                                 attn_mask=mask, dropout_p=0.0, scale=attention.scaling,
                                                 is_causal=False, **extra)
            out = out.transpose(1, 2).contiguous().reshape(x.shape[0], 1, -1).contiguous()
            x = residual + attention.o_proj(out)
            residual = x
            x = residual + layer.mlp(layer.post_attention_layernorm(x))
        return self.llm.norm(x)[:, 0]

    def _decide(self, rows: torch.Tensor, scores: torch.Tensor, width: int,
                stepping: torch.Tensor | None = None) -> torch.Tensor:
        """On the device: the pick (argmax over passages not yet emitted, ties to the lowest index), the
        pool's bookkeeping and the next input, for the ``stepping`` rows (default all); returns
        [rows, 1 + width]: each row's pick, then its scores."""
        pool = self.pool
        if stepping is None:
            stepping = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
        remaining = pool.remaining[rows, :width]
        picks = torch.where(remaining, scores, torch.finfo(scores.dtype).min).argmax(dim=1)
        emitted = remaining.clone()
        emitted[torch.arange(len(rows), device=rows.device), picks] = False
        pool.remaining[rows, :width] = torch.where(stepping[:, None], emitted, remaining)
        pool.next_input[rows] = torch.where(stepping[:, None], pool.passages[rows, picks], pool.next_input[rows])
        return torch.cat([picks[:, None].float(), scores.float()], dim=1)

    # ---- CUDA graphs (written for the GPU; not yet measured)

    def capture(self) -> None:
        """A CUDA graph of :meth:`bucket_step` per bucket (1, 2, 4, ... slots) over the whole pool length."""
        pool = self.pool
        bucket = 1
        while True:
            size = min(bucket, pool.slots)
            stepping = torch.zeros(size, dtype=torch.bool, device=pool.lengths.device)
            saved = [t.clone() for t in (pool.lengths, pool.remaining, pool.next_input)]
            self.bucket_step(size, pool.max_len, stepping)  # warm-up on a side stream is implicit in capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self.bucket_step(size, pool.max_len, stepping)
            for tensor, before in zip((pool.lengths, pool.remaining, pool.next_input), saved):
                tensor.copy_(before)
            self.graphs[size] = (stepping, output, graph)
            if size == pool.slots:
                break
            bucket *= 2
