"""The two training losses, as small pure functions of tensors.

Both run the frozen LLM (``PeRankModel.llm``: the decoder stack with its final norm, no
lm_head) on input embeddings whose ``<PLACEHOLDER>`` rows are replaced by projected
passage embeddings, as :class:`pe_rank.runtime.steps.TorchStepper` does at inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100


def splice_rows(tokens: Tensor, positions: Tensor, rows: Tensor) -> Tensor:
    """``tokens`` [T, H] with rows ``positions`` replaced by ``rows`` (differentiable in ``rows``)."""
    return tokens.index_put((positions,), rows.to(tokens.dtype))


# ---- stage 2: ranking

def decision_hidden(llm: nn.Module, prompt_ids: Tensor, positions: Tensor, embeds: Tensor,
                    teacher: Tensor) -> Tensor:
    """Final-norm hidden states [n, H] at the n positions where decoding picks a passage.

    Inputs: the prompt with the window's projected embeddings [n, H] at the placeholders,
    followed by the teacher's first n-1 passages (teacher forcing), exactly what the ranker
    feeds when it emits the teacher's order. Row k decides the (k+1)-th passage.
    """
    inputs = teacher_forced_inputs(llm, prompt_ids, positions, embeds, teacher)
    hidden = llm(inputs_embeds=inputs[None], use_cache=False).last_hidden_state[0]
    return hidden[len(prompt_ids) - 1:]


def teacher_forced_inputs(llm: nn.Module, prompt_ids: Tensor, positions: Tensor, embeds: Tensor,
                          teacher: Tensor) -> Tensor:
    """Input embeddings [T + n - 1, H]: the prompt with its soft tokens, then the teacher's first n-1 passages."""
    tokens = llm.get_input_embeddings()(prompt_ids)
    return torch.cat([splice_rows(tokens, positions, embeds), embeds[teacher[:-1]]])


def passage_scores(hidden: Tensor, embeds: Tensor) -> Tensor:
    """s_i = h . e_i for every decision row: [k, H] x [n, H] -> [k, n] (the ranker's scores)."""
    return hidden @ embeds.T


def listmle(scores: Tensor, teacher: Tensor) -> Tensor:
    """Mean over decision rows k of -log softmax(scores[k] over passages not yet emitted)[teacher[k]]."""
    n = len(teacher)
    rank_of = torch.empty_like(teacher)
    rank_of[teacher] = torch.arange(n, device=teacher.device)
    emitted = rank_of[None, :] < torch.arange(n, device=teacher.device)[:, None]  # [k, j]: j emitted before k
    logp = torch.log_softmax(scores.float().masked_fill(emitted, float("-inf")), dim=-1)
    return -logp[torch.arange(n, device=teacher.device), teacher].mean()


def split_projector(projector: nn.Module) -> tuple[nn.Module, Tensor]:
    """``(features, W)`` with ``projector(x) = features(x) @ W.T + b``: its last Linear split off.

    A passage's score is ``h . (W f(x) + b)``, so across one window's passages only
    ``W.T h`` (in the features' space) decides the order.
    """
    if isinstance(projector, nn.Linear):
        return nn.Identity(), projector.weight.detach()
    if isinstance(projector, nn.Sequential) and isinstance(projector[-1], nn.Linear):
        return projector[:-1], projector[-1].weight.detach()
    raise ValueError(f"the query loss needs a projector ending in a Linear layer, not {type(projector).__name__}")


def feature_decoder(features: Tensor, encoded: Tensor, ridge: float = 1e-2) -> Tensor:
    """``D`` [F, E] with ``features @ D ~= encoded`` (ridge least squares over passages).

    Then ``(D q) . f(x) ~= q . x``: a score direction that orders passages as the encoder's
    cosine to the query ``q`` does (both are L2-normalised).
    """
    f = features.double()
    gram = f.T @ f + ridge * torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
    return torch.linalg.solve(gram, f.T @ encoded.double()).float()


def query_loss(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    """Mean over decision rows of ``1 - cos(W.T h, target)``: every row should score the window's
    passages along ``target`` (the query's encoder embedding carried into feature space)."""
    return (1 - F.cosine_similarity(hidden.float() @ weight.float(), target.float()[None], dim=-1)).mean()


def ranking_loss(llm: nn.Module, prompt_ids: Tensor, positions: Tensor, embeds: Tensor, teacher: Tensor) -> Tensor:
    hidden = decision_hidden(llm, prompt_ids, positions, embeds, teacher)
    return listmle(passage_scores(hidden, embeds), teacher)


# ---- stage 1: alignment (reconstruct the passage text from its soft token)

def pad_targets(targets: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Targets padded to the longest: (labels [B, L] with IGNORE padding, mask [B, L])."""
    length = max(len(t) for t in targets)
    labels = torch.full((len(targets), length), IGNORE, dtype=torch.long, device=device)
    for i, t in enumerate(targets):
        labels[i, :len(t)] = torch.tensor(t, dtype=torch.long, device=device)
    return labels, labels != IGNORE


def alignment_loss(llm: nn.Module, lm_head: Tensor, prompt_ids: Tensor, position: int, embeds: Tensor,
                   targets: list[list[int]]) -> Tensor:
    """Next-token cross-entropy on the target tokens only.

    Each row is ``prompt + target`` (right-padded); the prompt's one placeholder row is the
    passage's projected embedding [B, H]. The last prompt position predicts the first target
    token, and so on.
    """
    labels, mask = pad_targets(targets, embeds.device)
    batch, prompt_len = len(targets), len(prompt_ids)
    ids = torch.cat([prompt_ids.expand(batch, -1), labels.clamp(min=0)], dim=1)
    tokens = llm.get_input_embeddings()(ids)
    inputs = torch.cat([tokens[:, :position], embeds[:, None].to(tokens.dtype), tokens[:, position + 1:]], dim=1)
    attention = torch.cat([torch.ones_like(ids[:, :prompt_len]), mask.long()], dim=1)
    hidden = llm(inputs_embeds=inputs, attention_mask=attention, use_cache=False).last_hidden_state
    logits = hidden[:, prompt_len - 1:-1] @ lm_head.T
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
