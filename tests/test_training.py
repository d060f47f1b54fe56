"""`pe-rank train` on a tiny checkpoint: losses learn, training matches inference, output and resume."""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pe_rank.cli import main
from pe_rank.core.checkpoint import PROJECTOR_PREFIX
from pe_rank.runtime.weights import WeightFiles
from pe_rank.runtime.model import load_model
from pe_rank.runtime.steps import TorchStepper
from pe_rank.training.data import load_data
from pe_rank.training.embeddings import EmbeddingCache
from pe_rank.training.loop import StageConfig, load_state, make_optimizer, run_stage
from pe_rank.runtime.weights import build_projector
from pe_rank.training.losses import decision_hidden, feature_decoder, passage_scores, query_loss, split_projector
from pe_rank.training.adapter import attach_lora, lower_states, merge_adapter, save_adapter, top_hidden
from pe_rank.training.cli import stages
from pe_rank.training.tasks import (AdapterTask, AlignmentTask, RankingTask, WordsAlignmentTask,
                                    sample_carried_window, sample_window, step_rng, teacher_order)
from pe_rank.training.train import freeze_all_but_projector

TRAIN_DATA = Path(__file__).resolve().parents[1] / "data" / "train"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """Two DL21 queries (with qrels) and one DL22 query from data/train, 24 hits each."""
    out = tmp_path_factory.mktemp("train-data")
    runs = {}
    for name, count in (("dl21", 2), ("dl22", 1)):
        with gzip.open(TRAIN_DATA / f"bm25_{name}.json.gz", "rt") as f:
            runs[name] = [dict(q, hits=q["hits"][:24]) for q in json.load(f)[:count]]
        with gzip.open(out / f"bm25_{name}.json.gz", "wt") as f:
            json.dump(runs[name], f)
    qids = {str(q["hits"][0]["qid"]) for q in runs["dl21"]}
    lines = (TRAIN_DATA / "qrels.dl21-passage.txt").read_text().splitlines(keepends=True)
    (out / "qrels.dl21-passage.txt").write_text("".join(l for l in lines if l.split()[0] in qids))
    return out


@pytest.fixture(scope="module")
def trainable_tiny(tiny_dir: Path):
    model = load_model(tiny_dir)
    freeze_all_but_projector(model)
    return model


class Fixed:
    """A task that returns the same batch every step (overfitting check)."""

    def __init__(self, task, batch) -> None:
        self.task, self.batch, self.stage = task, batch, task.stage

    def sample(self, rng):
        return self.batch

    def loss(self, batch):
        return self.task.loss(batch)


def overfit(model, task, batch, steps=30, lr=1e-2) -> list[float]:
    start = {k: v.clone() for k, v in model.projector.state_dict().items()}
    trainable = {"projector": model.projector}
    config = StageConfig(steps=steps, lr=lr, seed=0, warmup=1, save_every=10**6, log_every=10**6)
    try:
        result = run_stage(Fixed(task, batch), trainable, config, optimizer=make_optimizer(trainable, config),
                           start_step=0, deadline=None, checkpoint=lambda *_: None, log=lambda _: None)
    finally:
        model.projector.load_state_dict(start)
    return result.losses


def test_stage1_loss_learns_a_fixed_batch(tiny_dir, small_data):
    """A random 2-layer LLM barely hears any single input row (RMS norms, near-uniform attention,
    logits of about +-1), so the loss could hardly move whatever the projector did. This check
    uses a sharpened copy: attention logits x100 (q, k x10) and output logits x30."""
    model = load_model(tiny_dir)
    freeze_all_but_projector(model)
    with torch.no_grad():
        for layer in model.llm.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    data = load_data(small_data)
    task = AlignmentTask(model, EmbeddingCache(model), data.passages(), batch=2, target_tokens=8)
    task.lm_head = task.lm_head * 30
    losses = overfit(model, task, data.passages()[:2], steps=40)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_stage2_loss_learns_two_fixed_windows(trainable_tiny, small_data):
    data = load_data(small_data)
    task = RankingTask(trainable_tiny, EmbeddingCache(trainable_tiny), data, batch=2, window=8)
    windows = task.sample(step_rng(0, 2, 0))
    losses = overfit(trainable_tiny, task, windows)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_stage2_scores_are_the_rankers_scores(trainable_tiny, small_data):
    """Teacher-forced training scores equal TorchStepper's start/step scores along the same path."""
    model = trainable_tiny
    data = load_data(small_data)
    task = RankingTask(model, EmbeddingCache(model), data, batch=1, window=6)
    window = sample_window(data.queries, step_rng(3, 2, 0), 6)
    teacher = task.teacher(window)
    ids, positions = model.prompts.build(window.query, len(window.passages))
    embeds = model.project(model.encode(list(window.passages)))
    with torch.no_grad():
        e = torch.from_numpy(embeds)
        hidden = decision_hidden(model.llm, torch.from_numpy(np.array(ids)), torch.from_numpy(np.array(positions)),
                                 e, torch.from_numpy(teacher))
        trained = passage_scores(hidden, e).numpy()
    stepper = TorchStepper(model.llm, model.prompts, model.dtype, model.device)
    state, scores = stepper.start(ids, embeds)
    decoded = [scores]
    for pick in teacher[:-1]:
        decoded.append(stepper.step(state, int(pick)))
    np.testing.assert_allclose(trained, np.stack(decoded), rtol=1e-4, atol=1e-4)


def test_teacher_order_grades_then_cosine():
    grades = np.array([0, 2, 2, 1, 0])
    cosine = np.array([0.9, 0.1, 0.5, 0.0, 0.95])
    assert teacher_order(grades, cosine).tolist() == [2, 1, 3, 4, 0]


def test_windows_are_random_slices_in_shuffled_order(small_data):
    data = load_data(small_data)
    a = sample_window(data.queries, step_rng(0, 2, 5), 8)
    assert a == sample_window(data.queries, step_rng(0, 2, 5), 8)  # seeded
    query = next(q for q in data.queries if q.text == a.query)
    index = [query.docids.index(d) for d in a.docids]
    assert sorted(index) == list(range(min(index), min(index) + 8)) and index != sorted(index)
    assert a.passages == tuple(query.passages[i] for i in index)
    assert a.grades == tuple(query.grade(d) for d in a.docids)


def test_carried_windows_hold_a_slice_and_the_teachers_best_below_it(trainable_tiny, small_data):
    """Window at hit s (24 hits, window 8, step 4): hits [s, s+4) plus the teacher's best 4 of
    hits s+4..23, as a sliding pass with a perfect ranker would hand it up; the bottom window
    is hits 16..23. The teacher is recomputed here from the encoder, not taken from the cache."""
    data = load_data(small_data)
    cache = EmbeddingCache(trainable_tiny)
    starts = set()
    for step in range(40):
        w = sample_carried_window(data.queries, cache, step_rng(0, 3, step), 8)
        assert w == sample_carried_window(data.queries, cache, step_rng(0, 3, step), 8)  # seeded
        q = next(q for q in data.queries if q.text == w.query)
        index = sorted(q.docids.index(d) for d in w.docids)
        start = index[0]
        starts.add(start)
        assert start in (0, 4, 8, 12, 16) and len(set(index)) == 8
        if start == 16:
            assert index == list(range(16, 24))
            continue
        encoded = trainable_tiny.encode([q.text, *q.passages[start + 4:]])
        grades = np.array([q.grade(d) for d in q.docids[start + 4:]])
        best = start + 4 + teacher_order(grades, encoded[1:] @ encoded[0])[:4]
        assert index == list(range(start, start + 4)) + sorted(best.tolist())
        assert w.grades == tuple(q.grade(d) for d in w.docids)
    assert starts == {0, 4, 8, 12, 16}


def test_adapter_pool_without_carried_windows_is_unchanged(trainable_tiny, small_data):
    data = load_data(small_data)
    cache = EmbeddingCache(trainable_tiny)
    plain = AdapterTask(trainable_tiny, cache, data, trainable_tiny.llm, 1, pool=12, window=8)
    rng = np.random.default_rng([0, 3])
    assert plain.windows == [sample_window(data.queries, rng, 8) for _ in range(12)]
    mixed = AdapterTask(trainable_tiny, cache, data, trainable_tiny.llm, 1, pool=40, window=8, carried=0.5)
    assert 5 < sum(w not in set(plain.windows) and _is_carried(w, data) for w in mixed.windows) < 35


def _is_carried(window, data) -> bool:
    """Not one slice of consecutive hits: a carried window (above the bottom one)."""
    q = next(q for q in data.queries if q.text == window.query)
    index = sorted(q.docids.index(d) for d in window.docids)
    return index != list(range(index[0], index[0] + len(index)))


def test_pseudo_queries_are_seeded_spans_of_a_passage_in_their_window(small_data):
    data = load_data(small_data)
    more = data.with_pseudo_queries(30, 8, seed=1)
    assert more.queries[:len(data.queries)] == data.queries
    pseudo = more.queries[len(data.queries):]
    assert len(pseudo) == 30 and pseudo == data.with_pseudo_queries(30, 8, seed=1).queries[len(data.queries):]
    assert pseudo != data.with_pseudo_queries(30, 8, seed=2).queries[len(data.queries):]
    assert data.with_pseudo_queries(0, 8, seed=1) is data
    for q in pseudo:
        assert q.grades is None and q.run == "pseudo" and len(q.passages) == 8
        source = next(r for r in data.queries if q.docids[0] in r.docids)
        start = source.docids.index(q.docids[0])
        assert q.docids == source.docids[start:start + 8] and q.passages == source.passages[start:start + 8]
        words = q.text.split()
        assert 1 <= len(words) <= 7 and q.text == q.text.lower()
        # the query is a span of one of its window's passages (the one it was made from)
        assert any(q.text in " ".join(re.findall(r"[a-z0-9][a-z0-9'-]*", p.lower())) for p in q.passages), q.text
    assert "30 pseudo-queries" in more.summary()


def _projector(folder: Path) -> dict[str, torch.Tensor]:
    weights = WeightFiles(folder)
    return {k: t for k, t, _ in weights.load(weights.keys(PROJECTOR_PREFIX))}


def _train(model: Path, out: Path, data: Path, *extra: str) -> int:
    return main(["train", "--model", str(model), "--out", str(out), "--data", str(data), "--window", "8",
                 "--batch", "2,2", "--save-every", "2", "--log-every", "100", *extra])


def test_train_writes_a_loadable_checkpoint(tiny_dir, small_data, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()}
    out = tmp_path / "trained"
    assert _train(tiny_dir, out, small_data, "--stage", "both", "--steps", "4,4") == 0
    assert {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()} == before  # input untouched

    trained, original = _projector(out), _projector(tiny_dir)
    assert set(trained) == set(original)
    assert any(not torch.equal(trained[k], original[k]) for k in trained)
    state = load_state(out / "train_state.pt")
    assert (state["stage"], state["step"]) == (2, 4)
    model = load_model(out)
    for key, value in model.projector.state_dict().items():
        assert torch.equal(value, trained[PROJECTOR_PREFIX + key])
        assert torch.equal(value, state["trainable"]["projector"][key])

    new, old = WeightFiles(out), WeightFiles(tiny_dir)
    rest = [k for k in old.keys() if not k.startswith(PROJECTOR_PREFIX)]
    assert sorted(rest) == sorted(k for k in new.keys() if not k.startswith(PROJECTOR_PREFIX))
    for (key, a, _), (_, b, _) in zip(old.load(rest), new.load(rest)):
        assert torch.equal(a, b), key

    report = (out / "TRAINING.md").read_text()
    assert "## Stage 1 (alignment)" in report and "## Stage 2 (ranking)" in report
    assert "--steps 4,4" in report and "seed 0" in report
    assert set(json.loads((out / "config.json").read_text())["pe_rank_training"]) == {"stage1", "stage2"}


def test_resume_continues_where_it_stopped(tiny_dir, small_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(tiny_dir, straight, small_data, "--stage", "2", "--steps", "6") == 0
    assert _train(tiny_dir, resumed, small_data, "--stage", "2", "--steps", "3") == 0
    assert load_state(resumed / "train_state.pt")["step"] == 3
    assert _train(tiny_dir, resumed, small_data, "--stage", "2", "--steps", "6", "--resume") == 0
    state = load_state(resumed / "train_state.pt")
    assert state["step"] == 6 and len(state["losses"]) == 6
    a, b = _projector(straight), _projector(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert "(resumed at 3)" in (resumed / "TRAINING.md").read_text()


def test_time_limit_stops_and_saves(tiny_dir, small_data, tmp_path):
    out = tmp_path / "limited"
    assert _train(tiny_dir, out, small_data, "--stage", "1", "--steps", "50", "--max-minutes", "0") == 0
    assert load_state(out / "train_state.pt")["step"] == 0
    assert "stopped early: time limit" in (out / "TRAINING.md").read_text()
    load_model(out)
    assert _train(tiny_dir, out, small_data, "--stage", "1", "--steps", "2", "--resume") == 0
    assert load_state(out / "train_state.pt")["step"] == 2


def test_user_mistakes_are_one_line_errors(tiny_dir, small_data, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "file").write_text("x")
    assert _train(tiny_dir, out, small_data) == 2
    assert _train(tiny_dir, tmp_path / "fresh", small_data, "--resume") == 2
    assert _train(tiny_dir, tiny_dir, small_data) == 2
    dl19 = tmp_path / "dl19"
    dl19.mkdir()
    (dl19 / "bm25_dl19.json.gz").write_bytes((small_data / "bm25_dl22.json.gz").read_bytes())
    assert _train(tiny_dir, tmp_path / "x", dl19) == 2
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(errors) == 4 and "never used for training" in errors[-1]
    assert _train(tiny_dir, tmp_path / "y", small_data, "--carried-windows", "1.5") == 2
    assert "--carried-windows in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


# ---- stage 1 "words" alignment and stage 3 (LoRA adapter on the top layers)

def test_top_layers_on_cached_states_equal_the_full_forward(trainable_tiny):
    """Stage 3 trains on layer-k inputs computed once: running the rest from there is the same function."""
    llm = trainable_tiny.llm
    x = torch.randn(17, trainable_tiny.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = llm(inputs_embeds=x[None]).last_hidden_state[0]
        for first in range(len(llm.layers)):
            assert torch.equal(top_hidden(llm, lower_states(llm, x, first), first), full), first


def test_words_alignment_targets_and_learning(trainable_tiny, small_data):
    model = trainable_tiny
    data = load_data(small_data)
    task = WordsAlignmentTask(model, EmbeddingCache(model), data.passages(), batch=4, target_tokens=16)
    target = task.target(0)
    assert target.norm().item() == pytest.approx(task.row_norm, rel=1e-5)
    ids = torch.tensor(task._ids[0])
    manual = (task.idf[ids][:, None] * task.rows[ids]).sum(0)
    assert torch.allclose(target, manual / manual.norm() * task.row_norm, atol=1e-5)
    assert task.idf.max() > task.idf[ids].min()  # frequent tokens weigh less than rare ones
    losses = overfit(model, task, [0, 1, 2, 3], steps=40)
    assert losses[-1] < 0.5 * losses[0], losses


def test_query_loss_pieces():
    """The projector's last Linear splits off; the decoder maps features back to encoder space so that
    (D q) . f(x) orders passages like the encoder cosine q . x; the loss is 0 exactly along D q."""
    torch.manual_seed(0)
    mlp = build_projector("mlp2x_gelu", 16, 24)
    features, weight = split_projector(mlp)
    x = torch.nn.functional.normalize(torch.randn(400, 16), dim=-1)
    torch.testing.assert_close(features(x) @ weight.T + mlp[-1].bias, mlp(x))
    linear = build_projector("linear", 16, 24)
    assert torch.equal(split_projector(linear)[1], linear.weight)
    with pytest.raises(ValueError, match="Linear"):
        split_projector(build_projector("identity", 16, 16))
    with torch.no_grad():
        decoder = feature_decoder(features(x), x)
        q = torch.nn.functional.normalize(torch.randn(16), dim=0)
        others = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
        decoded, cosine = features(others) @ (decoder @ q), others @ q
    assert np.corrcoef(decoded.numpy(), cosine.numpy())[0, 1] > 0.95
    target = decoder @ q
    along = torch.linalg.lstsq(weight.T, target[:, None]).solution.T  # W.T h = target exactly
    assert query_loss(torch.cat([along, 3 * along]), weight, target).item() == pytest.approx(0, abs=1e-5)
    assert query_loss(-along, weight, target).item() == pytest.approx(2, abs=1e-5)


def test_stage3_query_loss_adds_to_listmle_and_learns(trainable_tiny, small_data):
    data = load_data(small_data)
    stack, task = _adapter_task(trainable_tiny, data, pool=1, gain=10.0)
    plain = task.window_loss(0).item()
    stack, task = _adapter_task(trainable_tiny, data, pool=1, gain=10.0, query_weight=1.0)
    assert task.decoder.shape == (trainable_tiny.hidden_size, trainable_tiny.info.embedding_size)
    assert task.window_loss(0).item() > plain  # the same ListMLE plus a positive query term
    trainable = {"adapter": stack}
    config = StageConfig(steps=40, lr=5e-2, seed=0, warmup=1, save_every=10**6, log_every=10**6)
    result = run_stage(Fixed(task, [0]), trainable, config, optimizer=make_optimizer(trainable, config),
                       start_step=0, deadline=None, checkpoint=lambda *_: None, log=lambda _: None)
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses


def _adapter_task(model, data, pool=3, gain=1.0, query_weight=0.0):
    """A stage-3 task on copies of ``model``'s LLM and projector (output scaled by ``gain``)."""
    first = len(model.llm.layers) - 1
    stack = attach_lora(copy.deepcopy(model.llm), first, rank=4)
    m = copy.copy(model)
    m.llm = stack.get_base_model()
    m.projector = copy.deepcopy(model.projector)
    with torch.no_grad():
        for p in m.projector.parameters():
            p.mul_(gain)
    return stack, AdapterTask(m, EmbeddingCache(model), data, m.llm, first, batch=1, pool=pool, window=6,
                              query_weight=query_weight)


def test_stage3_scores_are_the_rankers_scores_of_the_merged_model(trainable_tiny, small_data, tmp_path):
    """With LoRA weights set, the cached-state training scores equal what TorchStepper decodes
    with the adapter merged into the weights (the checkpoint pe-rank train writes)."""
    model = trainable_tiny
    stack, task = _adapter_task(model, load_data(small_data))
    with torch.no_grad():
        for name, p in stack.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        states, embeds, teacher, prompt_len = task.prepared(0)
        trained = passage_scores(top_hidden(task.stack, states, task.first)[prompt_len - 1:], embeds).numpy()
    save_adapter(stack, tmp_path / "adapter")
    merged = merge_adapter(copy.deepcopy(model.llm), tmp_path / "adapter")
    window = task.windows[0]
    ids, _ = model.prompts.build(window.query, len(window.passages))
    stepper = TorchStepper(merged, model.prompts, model.dtype, model.device)
    state, scores = stepper.start(ids, embeds.numpy())
    decoded = [scores] + [stepper.step(state, int(pick)) for pick in teacher[:-1]]
    np.testing.assert_allclose(trained, np.stack(decoded), rtol=1e-4, atol=1e-4)
    base = TorchStepper(model.llm, model.prompts, model.dtype, model.device).start(ids, embeds.numpy())[1]
    assert not np.allclose(base, decoded[0], atol=1e-3)  # the adapter does change the scores


def test_stage3_loss_learns_a_fixed_window(trainable_tiny, small_data):
    # the final RMSNorm bounds |h|, so the tiny projector's small rows (|e| ~ 0.3) would keep every
    # score near 0 whatever the adapter did; the demo's rows have token-embedding norms
    stack, task = _adapter_task(trainable_tiny, load_data(small_data), pool=1, gain=10.0)
    trainable = {"adapter": stack}
    config = StageConfig(steps=40, lr=5e-2, seed=0, warmup=1, save_every=10**6, log_every=10**6)
    result = run_stage(Fixed(task, [0]), trainable, config, optimizer=make_optimizer(trainable, config),
                       start_step=0, deadline=None, checkpoint=lambda *_: None, log=lambda _: None)
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    assert not any(p.requires_grad for n, p in stack.named_parameters() if "lora_" not in n)


def test_train_stage3_writes_merged_layers_and_the_adapter(tiny_dir, small_data, tmp_path):
    out = tmp_path / "adapted"
    assert _train(tiny_dir, out, small_data, "--stage", "1,3", "--align", "words", "--steps", "2,1,4",
                  "--adapter-layers", "1", "--adapter-pool", "4") == 0
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    new, old = WeightFiles(out), WeightFiles(tiny_dir)
    changed = sorted(k for k in new.keys() if new.key_to_file[k].name == "llm_layers.safetensors")
    assert changed and all(k.startswith("model.layers.1.") for k in changed)  # the top layer only
    assert sorted(new.keys()) == sorted(old.keys())
    state = load_state(out / "train_state.pt")
    assert (state["stage"], state["step"]) == (3, 4)
    assert all("lora_" in k for k in state["trainable"]["adapter"])
    # the merged checkpoint equals the input LLM with the saved adapter merged in
    merged = merge_adapter(load_model(tiny_dir).llm, out / "adapter")
    loaded = load_model(out).llm
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=1e-6)
    assert "## Stage 3 (adapter)" in (out / "TRAINING.md").read_text()
    # resuming stage 3 picks up the adapter and the projector
    assert _train(tiny_dir, out, small_data, "--stage", "1,3", "--align", "words", "--steps", "2,1,6",
                  "--adapter-layers", "1", "--adapter-pool", "4", "--resume") == 0
    assert load_state(out / "train_state.pt")["step"] == 6
    assert "steps 4 -> 6 of 6 (resumed at 4)" in (out / "TRAINING.md").read_text()  # not stage 3 afresh


def test_stage_lists_parse():
    assert stages("1,3") == (1, 3) and stages("all") == (1, 2, 3) and stages("2") == (2,)
    for bad in ("3,1", "4", "1,1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            stages(bad)
