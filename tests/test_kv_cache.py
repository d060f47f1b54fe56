"""Reserved KV caches and per-window batched steps: the same numbers as transformers' own cache."""
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


def test_batched_steps_of_changing_batches_equal_steps_alone(model):
    """Windows of different lengths join and leave batches: each batched step still equals the
    same window stepped alone (a key written into the wrong window's cache would change it)."""
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


def test_failed_batched_step_is_rolled_back(model, monkeypatch):
    """A forward that fails after some layers wrote their keys leaves every window as it was:
    same cache lengths, and the next batched step gives what stepping alone gives."""
    stepper = stepper_for(model)
    windows = [_window(model, n, seed) for seed, n in enumerate((6, 9, 4))]
    alone = [_decode(stepper, ids, embeds, [1, 2]) for ids, embeds in windows]
    states = [stepper.start(ids, embeds)[0] for ids, embeds in windows]
    lengths = [s.length for s in states]

    layers = model.llm.layers
    assert len(layers) >= 2, "the failure must come after a layer has written its keys"
    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")
    monkeypatch.setattr(layers[len(layers) - 1].mlp, "forward", fail)
    with pytest.raises(RuntimeError, match="injected"):
        stepper.step_many(states, [1, 1, 1])
    monkeypatch.undo()

    assert [s.length for s in states] == lengths
    for state in states:
        assert {layer.get_seq_length() for layer in state.cache.layers} == {state.length}
    for step, pick in enumerate([1, 2]):
        rows = stepper.step_many(states, [pick] * len(states))
        for w, row in enumerate(rows):
            np.testing.assert_allclose(row, alone[w][step + 1], rtol=0, atol=1e-5, err_msg=f"window {w}")


def test_windows_past_the_sliding_window_step_alone(tiny_dir):
    """Per-window attention has no sliding-window mask, so a batch reaching Mistral's sliding
    window must step one by one: then it equals stepping alone exactly."""
    model = load_model(tiny_dir)
    model.llm.config.sliding_window = 16  # shorter than every prompt here
    stepper = stepper_for(model)
    windows = [_window(model, n, seed) for seed, n in enumerate((6, 9))]
    alone = [_decode(stepper, ids, embeds, [1]) for ids, embeds in windows]
    states = [stepper.start(ids, embeds)[0] for ids, embeds in windows]
    assert min(s.length for s in states) > 16
    for row, want in zip(stepper.step_many(states, [1, 1]), alone):
        np.testing.assert_array_equal(row, want[1])
