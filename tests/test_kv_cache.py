"""Reserved KV caches and the reused batch workspace: the same numbers as transformers' own cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from pe_rank.core import steps
from pe_rank.core.inprocess import stepper_for
from pe_rank.core.kv_cache import ReservedLayer, reserved_cache
from pe_rank.core.model import load_model


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


def test_batch_workspace_reuse_leaks_nothing_between_batches(model):
    """Batches that shrink and grow in size and length reuse one workspace: each batched step still
    equals the same window stepped alone (a stale column would change the scores)."""
    stepper = stepper_for(model)
    windows = [_window(model, n, seed) for seed, n in enumerate((12, 3, 7, 10, 5))]
    picks = [0, 1, 2]
    alone = [_decode(stepper, ids, embeds, picks) for ids, embeds in windows]
    states = [stepper.start(ids, embeds)[0] for ids, embeds in windows]
    taken = [0] * len(windows)
    for members in ([0, 1, 2, 3, 4], [1, 4], [0, 2, 3], [4, 3, 2, 1, 0]):
        rows = stepper.step_many([states[m] for m in members], [picks[taken[m]] for m in members])
        for m, row in zip(members, rows):
            taken[m] += 1
            np.testing.assert_allclose(row, alone[m][taken[m]], rtol=0, atol=1e-5, err_msg=f"window {m}, step {taken[m]}")
    assert taken == [3, 3, 3, 3, 3]
