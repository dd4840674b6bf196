"""Input distributions peaked like a trained language model's head, beside cebench.cases' Gaussian logits.

Gaussian logits (std 2) make every softmax flat: no token takes more than a few times 1/V of the
mass and the loss sits near log V. Real heads are peaked (a few tokens take most of the mass, the
loss is 2 to 3 nats), which changes both precision (the gradient at the target, p - 1, and the
tiny probabilities of the tail) and speed (kernels that skip vocabulary blocks whose gradient is
negligible, as Cut Cross-Entropy does, almost never can with flat logits). Each row here is

    z[i, j] = prior[j] + CONTEXT_STD * noise[i, j]        for j != target
    z[i, t] = logsumexp_{j != t} z[i, j] + margin[i]      the target's logit

  - prior: a Zipf law over the vocabulary, prior[j] = -ZIPF_EXPONENT * log(j + 1), centred. Token
    ids are ranks (id 0 is the most frequent), as in BPE vocabularies whose merges come roughly in
    order of frequency;
  - noise: what the context adds, a standard normal per row and token;
  - the targets are drawn from the same Zipf law (frequent tokens are frequent targets);
  - margin: how far the target stands above everything else; the row's loss is softplus(-margin).
    "lm": the row's loss is drawn from an exponential law of mean MEAN_LOSS nats (stratified, so
    the batch mean is MEAN_LOSS to within ~1e-3 at N >= 128): many rows nearly certain, a long
    tail of surprises, as per-token losses of trained models are. "confident": margins uniform in
    CONFIDENT_MARGINS (1 - p_target from 2e-2 down to 6e-6); "unlikely": margins uniform in
    UNLIKELY_MARGINS (p_target from 3e-4 down to 1e-13). Both are where low-precision kernels lose
    the digits of the gradient at the target class.
ZIPF_EXPONENT and CONTEXT_STD were chosen (at V = 32000) so that the logits' spread matches the
Gaussian inputs (std ~2.1 per row) and the head is calibrated like a trained model (mean entropy
2.6 nats ~ mean loss 2.5); the mean top-1 probability is then ~0.45 and the top-10 mass ~0.8.
Measured at N=1024, V=32000 (float64, both families): mean loss 2.499, and 84% of the 128 x 128
(rows x vocabulary) blocks of the logits gradient lie below 2^-12 everywhere, the threshold under
which Cut Cross-Entropy skips a block; for Gaussian logits (loss 12.5), 0%.

The linear family gets hidden states and weights whose product is such logits (up to a small
cross-talk): a random unit "frequency direction" d carries the prior (w_j = prior_j / sqrt(H) * d
+ e_j, h_i = sqrt(H) * d + g_i with e_j, g_i orthogonal to d, e_j ~ N(0, CONTEXT_STD^2 / H) and
g_i ~ N(0, 1) per dimension, so g_i . e_j is the context noise), and each hidden state is pushed
along its target's weight direction, h_i += beta_i * e_t / |e_t|, with beta_i solved per row by
Newton's method so that the row's loss is the drawn one (that push also raises the tokens whose
weights resemble the target's, which is why it is solved for rather than computed).
Everything is float32 until the final rounding to the case's dtype, built in row chunks so the
temporaries stay a bounded multiple of the inputs, and deterministic for a case and seed.
"""

from __future__ import annotations

import math

import torch

ZIPF_EXPONENT = 1.5
CONTEXT_STD = 1.5
MEAN_LOSS = 2.5  # nats, the "lm" distribution's mean loss per row
CONFIDENT_MARGINS = (4.0, 12.0)
UNLIKELY_MARGINS = (-30.0, -8.0)
PEAKED = ("lm", "confident", "unlikely")  # distributions built here
MIN_PEAKED_H = 64  # linear family: below, a random token's weight can be more aligned with the push than the target's
_MIN_LOSS = 1e-6  # an exponential draw this small would be a margin of 14 nats: clamp there
_NEWTON_STEPS = 12
_LOSS_TOLERANCE = 1e-4  # relative: float32 resolves a loss of 20 nats to ~2e-6
_CHUNK_ELEMENTS = 1 << 24  # rows per chunk x V: 64 MiB of float32 per temporary


def log_prior(V: int, device) -> torch.Tensor:
    """The Zipf log-prior over token ids 0..V-1 (id = rank - 1), centred to mean 0, float32."""
    prior = -ZIPF_EXPONENT * torch.log(torch.arange(1, V + 1, device=device, dtype=torch.float64))
    return (prior - prior.mean()).float()


def zipf_targets(N: int, V: int, gen: torch.Generator, device) -> torch.Tensor:
    """N targets drawn from the Zipf law of log_prior (inverse CDF of uniform draws), int64."""
    probs = torch.softmax(log_prior(V, device).double(), dim=0)
    cdf = torch.cumsum(probs, dim=0)
    u = torch.rand(N, generator=gen, device=device, dtype=torch.float64)
    return torch.searchsorted(cdf, u).clamp_(max=V - 1)


def row_margins(kind: str, N: int, gen: torch.Generator, device) -> torch.Tensor:
    """Per-row margin of the target over the log-sum-exp of the other logits, float32 [N]."""
    if kind == "lm":
        # stratified quantiles of Exp(MEAN_LOSS) in a random order: the batch mean is pinned
        quantiles = (torch.randperm(N, generator=gen, device=device).double() + 0.5) / max(N, 1)
        loss = (-MEAN_LOSS * torch.log1p(-quantiles)).clamp_(min=_MIN_LOSS)
        return (-torch.log(torch.expm1(loss))).float()  # softplus(-margin) = loss
    low, high = {"confident": CONFIDENT_MARGINS, "unlikely": UNLIKELY_MARGINS}[kind]
    return low + (high - low) * torch.rand(N, generator=gen, device=device)


def _kept_margins(kind: str, targets: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Margins for the rows that are not ignored (drawn, and stratified, over those rows only); 0 elsewhere."""
    kept = targets >= 0
    margins = torch.zeros(targets.shape[0], device=targets.device)
    margins[kept] = row_margins(kind, int(kept.sum()), gen, targets.device)
    return margins


def _rows(N: int, V: int):
    step = max(1, _CHUNK_ELEMENTS // max(V, 1))
    return [(start, min(N, start + step)) for start in range(0, N, step)]


def _exp_sum(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row max, exp(z - max), row sum of it): log-sum-exp and softmax from one exp (torch.logsumexp
    is several times slower than softmax on the CPU)."""
    top = z.amax(dim=1, keepdim=True)
    e = (z - top).exp_()
    return top.squeeze(1), e, e.sum(dim=1)


def _lse(z: torch.Tensor) -> torch.Tensor:
    top, _, total = _exp_sum(z)
    return top + total.log()


def _rest_lse(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log-sum-exp of each row without its target's logit (float32 [n])."""
    rows = torch.arange(z.shape[0], device=z.device)
    held = z[rows, targets].clone()
    z[rows, targets] = -math.inf
    out = _lse(z)
    z[rows, targets] = held
    return out


def peaked_logits(kind: str, targets: torch.Tensor, V: int, dtype: torch.dtype, gen: torch.Generator,
                  device) -> torch.Tensor:
    """[N, V] logits in `dtype`: prior + context noise, the target's logit set to its row's margin.

    Ignored rows (negative targets) keep prior + noise only.
    """
    N = targets.shape[0]
    prior = log_prior(V, device)
    margins = _kept_margins(kind, targets, gen)
    out = torch.empty(N, V, device=device, dtype=dtype)
    for start, stop in _rows(N, V):
        z = torch.randn(stop - start, V, generator=gen, device=device).mul_(CONTEXT_STD).add_(prior)
        kept = (targets[start:stop] >= 0).nonzero().squeeze(1)
        t = targets[start:stop][kept]
        z[kept, t] = _rest_lse(z[kept], t) + margins[start:stop][kept]
        out[start:stop] = z
    return out


def _orthogonal_normal(rows: int, d: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, d.shape[0], generator=gen, device=d.device).mul_(std)
    return x.sub_(torch.outer(x @ d, d))


def peaked_linear(kind: str, targets: torch.Tensor, V: int, H: int, dtype: torch.dtype, gen: torch.Generator,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [N, H], weight [V, H]) in `dtype` whose product is peaked_logits-like logits."""
    N = targets.shape[0]
    d = torch.randn(H, generator=gen, device=device)
    d /= d.norm()
    extra = _orthogonal_normal(V, d, CONTEXT_STD / math.sqrt(H), gen)  # e_j
    weight = extra + torch.outer(log_prior(V, device) / math.sqrt(H), d)
    hidden = _orthogonal_normal(N, d, 1.0, gen).add_(math.sqrt(H) * d)  # g_i + sqrt(H) d
    margins = _kept_margins(kind, targets, gen)
    kept = (targets >= 0).nonzero().squeeze(1)
    if kept.numel() and H > 1:
        t = targets[kept]
        direction = extra[t] / extra[t].norm(dim=1, keepdim=True).clamp_(min=1e-30)
        beta = torch.empty(kept.numel(), device=device)
        for start, stop in _rows(kept.numel(), V):
            rows = kept[start:stop]
            beta[start:stop] = _solve_push(hidden[rows], direction[start:stop], weight, t[start:stop],
                                           margins[rows])
        hidden[kept] += beta[:, None] * direction
    return hidden.to(dtype), weight.to(dtype)


def _solve_push(h0: torch.Tensor, direction: torch.Tensor, weight: torch.Tensor, t: torch.Tensor,
                margin: torch.Tensor) -> torch.Tensor:
    """beta per row such that the loss of (h0 + beta * direction) @ weight.T at target t is softplus(-margin).

    The loss lse(z0 + beta c) - z0_t - beta c_t is convex in beta, and decreasing while the target's
    weight is the one most aligned with the push (always at realistic H), so Newton's method from
    the guess that ignores cross-talk converges in a few steps. At tiny H where another token is
    more aligned, a small loss may be out of reach: beta is then capped and the loss stays above.
    """
    rows = torch.arange(h0.shape[0], device=h0.device)
    z0 = h0 @ weight.T
    c = direction @ weight.T
    c_t = c[rows, t]
    goal = torch.nn.functional.softplus(-margin)
    m0 = z0[rows, t] - _rest_lse(z0, t)
    cap = 4.0 * (margin.abs().max() + m0.abs().max() + 1.0) / c_t.clamp(min=1e-3)
    beta = ((margin - m0) / c_t.clamp(min=1e-3)).clamp(-cap, cap)
    best, best_miss = beta, torch.full_like(beta, math.inf)
    for _ in range(_NEWTON_STEPS):
        z = torch.addcmul(z0, beta[:, None], c)
        top, e, total = _exp_sum(z)
        miss = top + total.log() - z[rows, t] - goal
        better = miss.abs() < best_miss  # kept: at tiny H a step can overshoot into a region it cannot leave
        best, best_miss = torch.where(better, beta, best), torch.where(better, miss.abs(), best_miss)
        if bool((best_miss <= _LOSS_TOLERANCE * goal.clamp(min=1.0)).all()):
            break
        slope = (e * c).sum(dim=1) / total - c_t  # d loss / d beta: E_softmax[c] - c_t, negative
        beta = (beta - miss / slope.clamp(max=-1e-6)).clamp(-cap, cap)
    return best
