"""Reference lossless speculative sampling for chains and token trees (docs/contract.md section 3).

Written to be read: the target distribution of a row is materialised (softmax, sort-based top-k and
top-p), and each request is walked in Python exactly as the algorithm is stated:

    at a node with target distribution p and children c_1..c_m (index order), for child c with token t
    drawn from q: accept if p(t) > 0 and u_c * q(t) <= p(t); on acceptance move to c (p <- c's row);
    on rejection p <- normalise(max(0, p - q)) (kept as it is if that has zero mass) and try the next
    child. With no child accepted, emit one token from p by inverse CDF with the request's final coin.

Precise definitions shared by every backend (the docstring of spdkernels.rejection_sample repeats them):

* weights ``w_v = exp((x_v - max(x)) / T)`` in fp32; p = w restricted to the kept set, normalised;
* top-k keeps every token whose logit is >= the k-th largest logit (ties at the boundary are kept);
* top-p keeps every token whose logit is >= tau_p, the largest logit value whose upper set
  ``{v : x_v >= tau_p}`` holds at least ``top_p`` of the mass left by top-k (ties kept);
* inverse CDF: the smallest id v with ``cumsum(w)[v] > u * sum(w)`` over the current (unnormalised)
  weights, so the sampled token always has positive mass;
* coins from (seed, offset): Philox4x32-10 (:func:`philox_uniform`).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .verify_greedy import children_of
from .verify_greedy import verify_greedy as _verify_greedy

# ---- counter-based coins ---------------------------------------------------------------------------

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF
STREAM_ACCEPT, STREAM_FINAL = 0, 1


def philox4x32(c0: int, c1: int, c2: int, c3: int, k0: int, k1: int, rounds: int = 10) -> int:
    """First output word of Philox4x32-10 (Salmon et al., SC'11) for counter (c0..c3), key (k0, k1)."""
    for i in range(rounds):
        if i:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _MASK, p1 & _MASK, ((p0 >> 32) ^ c3 ^ k1) & _MASK, p0 & _MASK
    return c0


def philox_uniform(seed: int, offset: int, index: int, stream: int) -> float:
    """The coin of draft node ``index`` (stream 0) or the final sample (stream 1, index 0) of a request
    with this seed and offset: ``((x >> 9) + 0.5) / 2^23`` with x the Philox word, strictly in (0, 1)
    and exactly representable in fp32, so every backend uses bit-identical coins."""
    x = philox4x32(index & _MASK, stream, offset & _MASK, (offset >> 32) & _MASK, seed & _MASK, (seed >> 32) & _MASK)
    return ((x >> 9) + 0.5) / 8388608.0


def coins_from_seed(cu_num_draft: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """fp32 [N + R] uniforms in the layout of the explicit ``uniforms`` argument."""
    cu = cu_num_draft.tolist()
    R = len(cu) - 1
    seeds, offs = seed.tolist(), offset.tolist()
    acc: List[float] = []
    fin: List[float] = []
    for r in range(R):
        acc.extend(philox_uniform(seeds[r], offs[r], i, STREAM_ACCEPT) for i in range(cu[r + 1] - cu[r]))
        fin.append(philox_uniform(seeds[r], offs[r], 0, STREAM_FINAL))
    return torch.tensor(acc + fin, dtype=torch.float32)


# ---- target distribution ---------------------------------------------------------------------------

def target_weights(x: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Unnormalised fp32 weights of the target distribution of one logit row (zero outside the kept
    set). Greedy (temperature 0): the one-hot of the argmax (lowest id on ties)."""
    x = x.float()
    V = x.shape[0]
    if temperature == 0:
        w = torch.zeros(V)
        w[int(x.argmax())] = 1.0
        return w
    w = temperature_weights(x, temperature)
    return torch.where(kept(x, w, top_k, top_p), w, torch.zeros_like(w))


def probs_weights(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """The weights of a probability row (``target_is_probs``): the row itself in fp32, or the one-hot of its
    argmax (lowest id on ties) for a greedy request."""
    x = x.float()
    if temperature == 0:
        w = torch.zeros(x.shape[0])
        w[int(x.argmax())] = 1.0
        return w
    return x.clone()


# The floor on a sampled request's temperature: 2^-126, the smallest normal fp32. The kernels scale by log2(e) / T,
# which overflows to inf below ~4.2e-39 (and inf * 0 at the row max is NaN); every backend raises T to this floor,
# which only changes the weights of logits within ~1.2e-36 of the row max.
TEMPERATURE_FLOOR = 2.0 ** -126


def temperature_weights(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp((x - max x) / T) in fp32 with T = max(temperature, TEMPERATURE_FLOOR), before top-k / top-p."""
    T = torch.tensor(max(temperature, TEMPERATURE_FLOOR), dtype=torch.float32)
    return torch.exp((x - x.max()) / T)


def kept(x: torch.Tensor, w: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The kept set of a row with fp32 logits ``x`` and weights ``w``: top-k keeps x >= the k-th largest;
    top-p then keeps x >= the largest value whose upper set holds ``top_p`` of the remaining mass."""
    V = x.shape[0]
    keep = torch.ones(V, dtype=torch.bool)
    if 0 < top_k < V:
        kth = torch.sort(x, descending=True).values[top_k - 1]
        keep &= x >= kth
    if top_p < 1.0:
        wk = torch.where(keep, w, torch.zeros_like(w))
        order = torch.sort(x, descending=True, stable=True).indices
        # masses in float64: an fp32 cumsum over 128k weights is off by ~1e-4 relative, enough to move
        # the boundary (the C++ kernel sums in double too; Triton's searches sum fp32 within 4096-token tiles and
        # fp64 across them: ~1e-7 relative, an estimate)
        csum = torch.cumsum(wk[order].double(), 0)
        need = float(top_p) * float(wk.double().sum())
        j = int((csum >= need).nonzero()[0, 0]) if bool((csum >= need).any()) else V - 1
        keep &= x >= x[order[j]]
    return keep


def normalise(w: torch.Tensor) -> torch.Tensor:
    """w / sum(w): the sum accumulated in float64, rounded to fp32, then an fp32 division (as the
    kernels do)."""
    return w / torch.tensor(float(w.double().sum()), dtype=torch.float32)


def sample_inverse_cdf(w: torch.Tensor, u: float) -> int:
    """Smallest id v with cumsum(w)[v] > u * sum(w) and w[v] > 0; when there is none (rounding, or a row that is
    not finite, which only validation off lets through) the last positive weight, else 0, as the kernels do."""
    c = torch.cumsum(w.double(), 0)
    hit = ((c > u * float(c[-1])) & (w > 0)).nonzero()
    if hit.numel():
        return int(hit[0, 0])
    pos = (w > 0).nonzero()
    return int(pos[-1, 0]) if pos.numel() else 0


# ---- the op ------------------------------------------------------------------------------------------

def rejection_sample(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    cu_num_draft: torch.Tensor,
    parents: Optional[torch.Tensor],
    draft_probs: Optional[torch.Tensor],
    temperature: Optional[torch.Tensor],
    top_k: Optional[torch.Tensor],
    top_p: Optional[torch.Tensor],
    uniforms: torch.Tensor,
    max_depth: int,
    bonus_token_ids: Optional[torch.Tensor] = None,
    target_is_probs: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference walk with explicit ``uniforms [N + R]`` (see :func:`coins_from_seed`).

    ``target_is_probs``: the rows hold probabilities, used as given (p(t) is the row's entry: rows are expected
    to sum to 1; a residual after a rejection is normalised by its own sum, and the final token is drawn by inverse
    CDF against the actual sum); temperature 0 still means greedy, any other temperature is not applied.
    ``bonus_token_ids [R]`` (chains
    only): the rows are ``[N, V]`` without the row after each chain's last draft; a request that accepts all
    its drafts emits its bonus token there (a request without drafts emits it at once)."""
    device = target_logits.device
    R = cu_num_draft.shape[0] - 1
    bonus = bonus_token_ids.tolist() if bonus_token_ids is not None else None
    N = draft_token_ids.shape[0]
    cu = cu_num_draft.tolist()
    tokens = draft_token_ids.tolist()
    par = parents.tolist() if parents is not None else None
    temps = temperature.tolist() if temperature is not None else [1.0] * R
    ks = top_k.tolist() if top_k is not None else [0] * R
    ps = top_p.tolist() if top_p is not None else [1.0] * R
    u = uniforms.float().tolist()
    logits = target_logits.float().cpu()
    q_all = draft_probs.float().cpu() if draft_probs is not None else None

    greedy = None  # the greedy walk of the whole batch, computed only if some request is greedy
    out = torch.full((R, max_depth + 1), -1, dtype=torch.int32)
    path = torch.full((R, max_depth), -1, dtype=torch.int32)
    num = torch.zeros(R, dtype=torch.int32)
    for r in range(R):
        if temps[r] == 0 and bonus is None and not target_is_probs:  # greedy requests: exactly verify_greedy
            if greedy is None:
                greedy = _verify_greedy(logits, draft_token_ids.cpu(), cu_num_draft.cpu(),
                                        parents.cpu() if parents is not None else None, max_depth)
            out[r], num[r], path[r] = greedy[0][r], greedy[1][r], greedy[2][r]
            continue
        start, k = cu[r], cu[r + 1] - cu[r]
        row0 = start if bonus is not None else start + r
        if bonus is not None and k == 0:  # no verification row: the bonus token
            out[r, 0], num[r] = bonus[r], 1
            continue
        local_par = par[start:start + k] if par is not None else None
        T_r, k_r, p_r = temps[r], ks[r], ps[r]
        if target_is_probs:  # the row is the distribution (a greedy request: the one-hot of its argmax)
            T_r = 0.0 if T_r == 0 else 1.0
            dist = lambda row, T_r=T_r: probs_weights(logits[row], T_r)  # noqa: E731
        else:  # (greedy rows give the one-hot of the argmax, so the walk below is verify_greedy's)
            dist = lambda row, T_r=T_r, k_r=k_r, p_r=p_r: target_weights(logits[row], T_r, k_r, p_r)  # noqa: E731
        # a probability row is used as given (mass 1, as the serving stacks use theirs): no pass over an accepted row
        load = dist if target_is_probs else (lambda row, dist=dist: normalise(dist(row)))  # noqa: E731
        p = load(row0)
        node, depth, emitted_bonus = -1, 0, False
        while depth < max_depth:
            accepted = None
            for c in children_of(local_par, k, node):
                t = tokens[start + c]
                if q_all is not None:
                    q = q_all[start + c]
                else:
                    q = torch.zeros_like(p)
                    q[t] = 1.0
                coin_times_q = float(torch.tensor(u[start + c], dtype=torch.float32) * q[t])  # fp32 product
                if float(p[t]) > 0 and coin_times_q <= float(p[t]):
                    accepted = c
                    break
                resid = torch.clamp(p - q, min=0)
                if float(resid.double().sum()) > 0:
                    p = normalise(resid)
            if accepted is None:
                break
            out[r, depth] = tokens[start + accepted]
            path[r, depth] = accepted
            depth += 1
            node = accepted
            if bonus is not None and node == k - 1:  # the chain's last draft: no row after it
                emitted_bonus = True
                break
            p = load(row0 + 1 + node)
        out[r, depth] = bonus[r] if emitted_bonus else sample_inverse_cdf(p, u[N + r])
        num[r] = depth + 1
    return out.to(device), num.to(device), path.to(device)
