"""DRO's math (Shi et al., Direct Retrieval-augmented Optimization): the selection as a latent.

The selector's scores s over a question's k candidates define a Plackett-Luce policy with
temperature T: the probability of an ordered selection z = (z_1..z_n) drawn without replacement is

    log PL(z) = sum_j [ s_{z_j} / T - logsumexp_{i not in z_<j} s_i / T ].

E-step: draw m selections z^1..z^m from PL (Gumbel top-n, i.i.d. across samples), score each by
the reader's log-likelihood l_s = log p(answer | question, z^s). The posterior over selections is
proportional to PL(z) p(a | q, z), so with PL as the proposal the self-normalised importance
weights are w_s = exp(l_s) / sum_t exp(l_t) = softmax(l)_s, and

    log p(a | q) ~= log mean_s exp(l_s) = logsumexp(l) - log m

is the importance-sampled estimate of the evidence. M-step: maximise sum_s w_s log PL(z^s) under
the selector, the weights held fixed (a REINFORCE-like update: samples that made the answer
likely are pushed up).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def pl_log_prob(
    scores: torch.Tensor, prefix: Sequence[int], temperature: float = 1.0
) -> torch.Tensor:
    """log PL(prefix) under ``scores`` (k,) at ``temperature``; differentiable in ``scores``."""
    if len(set(prefix)) != len(prefix):
        raise ValueError(f"a selection has no repeated candidate: {list(prefix)}")
    s = scores.float() / temperature
    remaining = torch.ones_like(s, dtype=torch.bool)
    total = s.new_zeros(())
    for i in prefix:
        total = total + s[i] - torch.logsumexp(s[remaining], dim=0)
        remaining = remaining.clone()
        remaining[i] = False
    return total


def sample_prefixes(
    scores: torch.Tensor, n: int, m: int, temperature: float, generator: torch.Generator
) -> list[list[int]]:
    """m independent top-``n`` selections from PL(scores / T), each without replacement.

    Gumbel top-n: the n largest of s_i / T + G_i (G_i standard Gumbel) are distributed as n
    successive Plackett-Luce draws.
    """
    k = scores.shape[0]
    n = min(n, k)
    s = scores.detach().float().cpu() / temperature
    u = torch.rand((m, k), generator=generator, dtype=torch.float64).clamp_(1e-12, 1.0 - 1e-12)
    keys = s.double()[None, :] - torch.log(-torch.log(u))
    return [row.tolist() for row in keys.topk(n, dim=1).indices]


def normalized_weights(log_likelihoods: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """w_s = exp(l_s) / sum_t exp(l_t), computed as softmax (stable for l of -1e4)."""
    ll = torch.as_tensor(log_likelihoods, dtype=torch.float64)
    return torch.softmax(ll, dim=0)


def log_evidence(log_likelihoods: Sequence[float] | torch.Tensor) -> float:
    """log mean_s exp(l_s): the importance-sampled estimate of log p(answer | question)."""
    ll = torch.as_tensor(log_likelihoods, dtype=torch.float64)
    return float(torch.logsumexp(ll, dim=0) - math.log(ll.numel()))


def weight_variance(weights: torch.Tensor) -> float:
    """Population variance of the normalised weights (0 when all are 1/m; m = 1 gives 0)."""
    return float(((weights - weights.mean()) ** 2).mean())


def mstep_loss(
    scores: torch.Tensor,
    samples: Sequence[Sequence[int]],
    weights: Sequence[float] | torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """-sum_s w_s log PL(z^s): the M-step loss of one question (weights detached)."""
    w = torch.as_tensor(weights, dtype=torch.float32, device=scores.device).detach()
    logps = torch.stack([pl_log_prob(scores, z, temperature) for z in samples])
    return -(w * logps).sum()


def merged_weights(
    samples: Sequence[Sequence[int]], weights: Sequence[float] | torch.Tensor
) -> list[tuple[tuple[int, ...], float]]:
    """The distinct selections among ``samples`` with their summed weights (first-drawn order):
    a selection drawn twice is one term of the generator's loss with twice the weight."""
    merged: dict[tuple[int, ...], float] = {}
    for z, w in zip(samples, torch.as_tensor(weights).tolist(), strict=True):
        merged[tuple(z)] = merged.get(tuple(z), 0.0) + float(w)
    return list(merged.items())


def generator_loss(
    log_likelihoods: torch.Tensor, weights: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """-sum_s w_s log p(answer | question, z^s): DRO's generator M-step of one question, the
    weighted NLL of the gold answer (weights detached; log-likelihoods differentiable)."""
    w = torch.as_tensor(weights, dtype=log_likelihoods.dtype, device=log_likelihoods.device)
    return -(w.detach() * log_likelihoods).sum()
