"""Reserved KV caches (a window on a cache of its own): the same numbers as transformers' own cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from pe_rank.runtime import steps
from pe_rank.runtime.inprocess import stepper_for
from pe_rank.runtime.kv_cache import ReservedLayer, reserved_cache
from pe_rank.runtime.model import load_model


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir)


def _window(model, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids, _ = model.prompts.build(f"query number {seed} about fleas", n)
    return np.array(ids), rng.standard_normal((n, model.llm.config.hidden_size)).astype(np.float32)


def _decode(stepper, ids: np.ndarray, embeds: np.ndarray, picks: list[int]) -> list[np.ndarray]:
    state, first = stepper.start(ids, embeds)
    return [first] + [stepper.step(state, pick) for pick in picks]


@pytest.mark.parametrize("capacity", [None, 3])  # None: the stepper's own reservation; 3: forces growth
def test_reserved_cache_scores_equal_dynamic_cache_bit_for_bit(model, monkeypatch, capacity):
    ids, embeds = _window(model, 9, seed=1)
    picks = [8, 0, 4, 2, 7, 1, 3]
    stepper = stepper_for(model)
    if capacity is not None:
        monkeypatch.setattr(steps, "reserved_cache", lambda layers, _: reserved_cache(layers, capacity))
    reserved = _decode(stepper, ids, embeds, picks)
    monkeypatch.setattr(steps, "reserved_cache", lambda *_: DynamicCache())
    dynamic = _decode(stepper, ids, embeds, picks)
    for got, want in zip(reserved, dynamic):
        np.testing.assert_array_equal(got, want)


def test_reserved_layer_holds_what_was_written_and_grows():
    layer = ReservedLayer(capacity=4)
    k, v = torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 5)
    keys, values = layer.update(k, v)
    assert keys.shape == (1, 2, 3, 5) and layer.get_seq_length() == 3
    k2, v2 = torch.randn(1, 2, 1, 5), torch.randn(1, 2, 1, 5)
    buffer = layer._buffers[0]
    layer.update(k2, v2)
    assert layer._buffers[0] is buffer  # within the reservation: written in place
    k3, v3 = torch.randn(1, 2, 2, 5), torch.randn(1, 2, 2, 5)
    keys, values = layer.update(k3, v3)  # past it: grows, keeps what it held
    torch.testing.assert_close(keys, torch.cat([k, k2, k3], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([v, v2, v3], dim=2), rtol=0, atol=0)
    assert layer.get_seq_length() == 6
    layer.crop(-2)
    assert layer.get_seq_length() == 4
    k4, v4 = torch.randn(1, 2, 1, 5), torch.randn(1, 2, 1, 5)
    keys, _ = layer.update(k4, v4)  # after a crop, the next token lands right after what is kept
    torch.testing.assert_close(keys, torch.cat([k, k2, k4], dim=2), rtol=0, atol=0)


def test_windows_that_would_reach_the_sliding_window_run_on_their_own_cache(tiny_dir):
    """The pool's step has no sliding-window mask, so a window that would reach Mistral's sliding window
    is decoded on a cache of its own by transformers' forward, with its mask: exactly as alone."""
    import asyncio

    from conftest import decode_alone
    from pe_rank.core.ranker import WindowJob
    from pe_rank.runtime.engine import DecodeEngine, EngineBackend, EngineLimits

    model = load_model(tiny_dir)
    model.llm.config.sliding_window = 16  # shorter than every prompt here
    stepper = stepper_for(model)
    jobs = [WindowJob(*_window(model, n, seed)) for seed, n in enumerate((6, 9))]
    engine = DecodeEngine(stepper, limits=EngineLimits(max_live=2, max_tokens=4096, max_passages=16))
    assert not engine.pool.fits(len(jobs[0].prompt_ids), 6)

    async def go():
        backend = EngineBackend(engine)
        return await asyncio.gather(*(backend.rank_window(j) for j in jobs))

    try:
        outcomes = asyncio.run(go())
    finally:
        engine.close()
    assert [(o.order, o.decode_steps) for o in outcomes] == [decode_alone(stepper, j) for j in jobs]
