"""FlashInfer's ``flashinfer.sampling.chain_speculative_sampling``, served by :func:`spdkernels.rejection_sample`.

FlashInfer's layout is the dense batch of chains with ``n`` drafts per request: ``draft_probs [B, n, V]``,
``draft_token_ids [B, n]``, ``target_probs [B, n + 1, V]`` (its row ``i`` verifies draft ``i``, row ``n`` is the
bonus row). The accept decisions are made here, in FlashInfer's fp32 arithmetic; the op then draws the token
at the first rejection (from ``relu(target - draft)`` of that row, the rejected draft being its one node,
forced to be rejected) or the bonus token: only those rows are converted to logits (``log``), one per request.

**FlashInfer's rules, reproduced:** draft ``i`` is accepted iff ``u * draft_prob(t) < target_prob(t)``
(strict ``<``, fp32 product) with a coin ``u`` in (0, 1]; the first rejection stops the chain and the token at
that position is drawn from ``relu(target - draft)`` of its row (the bonus row, with no draft, after ``n``
acceptances) by inverse CDF (the first id whose running sum exceeds ``u * sum``); the rest of the row is
``-1``. ``maybe_output_emitted_draft_token_num`` is incremented by the number of drafts emitted (accepted
before the first rejection) and ``maybe_output_accepted_token_num`` by the number of drafts that pass the
test *independently* (every position tested, those after the first rejection with fresh coins); both are
accumulated with ``+=`` into the caller's tensors, which are also returned.

**What differs** (``docs/adapters.md``): the op draws the correction from its own softmax of
``log(target_probs)`` (a row that does not sum to exactly 1 is renormalised, and the running sums are
computed in a different order, so a coin within ~1e-7 of a CDF step can pick the neighbouring token). The
random stream is not curand's: coins come from ``generator``, or a ``torch.Generator`` seeded with
``(seed, offset)``, or torch's default generator. A decision "reject" for a draft whose target probability
is within one fp32 ulp of its draft probability (possible only for a coin within 2^-24 of 1) cannot be
forced: that draft is then emitted at its position (the row still ends there). A zero-mass correction
distribution (``target == draft`` at the rejected row, again only for such a coin) gives FlashInfer's
undefined fallback; the op samples from the target row.
``deterministic`` has no effect (the op is deterministic).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

import spdkernels

from ._common import REJECT_COIN, check, fail, final_rows_logits, gather_rows, open_unit_fp32

__all__ = ["chain_speculative_sampling"]

_MASK64 = (1 << 64) - 1


def _generator(device, generator, seed, offset) -> Optional[torch.Generator]:
    if generator is not None:
        return generator
    if seed is None and offset is None:
        return None
    s = int(seed.reshape(-1)[0]) if isinstance(seed, torch.Tensor) else int(seed or 0)
    o = int(offset.reshape(-1)[0]) if isinstance(offset, torch.Tensor) else int(offset or 0)
    g = torch.Generator(device=device)
    # one stream per (seed, offset): a 64-bit mix, so that offset advances give unrelated coins
    g.manual_seed((s * 0x9E3779B97F4A7C15 + o * 0xBF58476D1CE4E5B9 + o) & _MASK64 >> 1)
    return g


def _coins_in_0_1_closed_open(shape, gen, device) -> torch.Tensor:
    """fp32 coins in (0, 1], the range of curand_uniform."""
    return 1.0 - torch.rand(shape, generator=gen, device=device, dtype=torch.float32)


def chain_speculative_sampling(
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    maybe_output_accepted_token_num: Optional[torch.Tensor] = None,
    maybe_output_emitted_draft_token_num: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's chain speculative sampling.

    Args:
        draft_probs: fp32 ``[B, n, V]``: the distribution each draft was drawn from.
        draft_token_ids: int32/int64 ``[B, n]``.
        target_probs: fp32 ``[B, n + 1, V]``: row ``i < n`` verifies draft ``i``; row ``n`` is the bonus row.
        maybe_output_accepted_token_num: int32 ``[B]`` or None: ``+=`` the number of drafts that pass the test
            independently (in place).
        maybe_output_emitted_draft_token_num: int32 ``[B]`` or None: ``+=`` the number of drafts emitted
            (accepted before the first rejection; in place).
        deterministic: accepted for compatibility; no effect.
        generator, seed, offset: where the coins come from (see the module docstring).

    Returns:
        ``(output_token_ids int32 [B, n + 1] padded with -1, accepted_token_num [B], emitted_draft_token_num
        [B])``, the last two being the caller's tensors when given.

    Raises:
        ValueError: naming the argument, for the shapes and dtypes FlashInfer checks (ranks, batch sizes,
            ``n`` and ``n + 1``, vocabulary sizes, float32 probabilities, int counters of shape ``[B]``).

    Example:
        >>> dp = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]])  # B = 1, n = 2
        >>> tp = torch.tensor([[[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])
        >>> out, acc, emitted = chain_speculative_sampling(dp, torch.tensor([[2, 1]], dtype=torch.int32), tp)
        >>> out.tolist(), acc.tolist(), emitted.tolist()  # draft 2 is certain, draft 1 impossible, then token 0
        ([[2, 0, -1]], [1], [1])
    """
    check("draft_probs", draft_probs, 3, (torch.float32,))
    dev = draft_probs.device
    check("draft_token_ids", draft_token_ids, 2, (torch.int32, torch.int64), dev)
    check("target_probs", target_probs, 3, (torch.float32,), dev)
    B, n, V = draft_probs.shape
    if tuple(draft_token_ids.shape) != (B, n):
        fail("draft_token_ids", f"expected shape [batch_size, num_speculate_tokens] = [{B}, {n}], "
             f"got {list(draft_token_ids.shape)}")
    if tuple(target_probs.shape) != (B, n + 1, V):
        fail("target_probs", f"expected shape [batch_size, num_speculate_tokens + 1, vocab_size] = "
             f"[{B}, {n + 1}, {V}], got {list(target_probs.shape)}")
    counters = []
    for name, c in (("maybe_output_accepted_token_num", maybe_output_accepted_token_num),
                    ("maybe_output_emitted_draft_token_num", maybe_output_emitted_draft_token_num)):
        if c is None:
            c = torch.zeros(B, dtype=torch.int32, device=dev)
        else:
            check(name, c, 1, (torch.int32, torch.int64), dev)
            if c.shape[0] != B:
                fail(name, f"expected shape [batch_size] = [{B}], got {list(c.shape)}")
        counters.append(c)
    acc_num, emitted_num = counters
    if B == 0:
        return torch.empty((0, n + 1), dtype=torch.int32, device=dev), acc_num, emitted_num

    gen = _generator(dev, generator, seed, offset)
    u = _coins_in_0_1_closed_open((B, n), gen, dev)
    u_recount = _coins_in_0_1_closed_open((B, n), gen, dev)
    u_final = _coins_in_0_1_closed_open((B,), gen, dev)

    t = draft_token_ids.long()
    if n:
        if bool(((t < 0) | (t >= V)).any()):
            fail("draft_token_ids", f"token ids must be in [0, vocab_size) = [0, {V})")
        p_draft = draft_probs.gather(2, t[..., None])[..., 0]
        p_target = target_probs[:, :n].gather(2, t[..., None])[..., 0]
        accept = u * p_draft < p_target  # FlashInfer: strict, fp32 product
        idx = torch.arange(n, device=dev).expand(B, n)
        pos = torch.where(accept, torch.full_like(idx, n), idx).amin(dim=1)  # first rejection, n if none
        after = idx >= pos[:, None]
        independent = pos + ((u_recount * p_draft < p_target) & after).sum(1)
    else:
        pos = torch.zeros(B, dtype=torch.long, device=dev)
        independent = pos
    acc_num += independent.to(acc_num.dtype)
    emitted_num += pos.to(emitted_num.dtype)

    # The accepted drafts are settled; what is left for the op is the draw of the token at ``pos``: from
    # relu(target - draft) of that row when a draft was rejected there (the rejected draft is the op's only
    # node, forced to be rejected), from the bonus row otherwise. Only those rows are converted to logits.
    # One host sync (the positions).
    pos_l = pos.tolist()
    rejected = [b for b in range(B) if pos_l[b] < n]
    leaves = [1 if pos_l[b] < n else 0 for b in range(B)]
    finals = [b * (n + 1) + pos_l[b] for b in range(B)]
    cu = torch.tensor([0] + leaves, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
    nodes = torch.tensor([b * n + pos_l[b] for b in rejected], dtype=torch.long, device=dev)
    uniforms = torch.cat([torch.full((len(rejected),), REJECT_COIN, dtype=torch.float32, device=dev),
                          open_unit_fp32(u_final)])
    sampled, _, _ = spdkernels.rejection_sample(
        final_rows_logits(target_probs.reshape(B * (n + 1), V), finals, leaves),
        draft_token_ids.reshape(B * n).index_select(0, nodes), cu,
        draft_probs=gather_rows("q", draft_probs.reshape(B * n, V), nodes), uniforms=uniforms, max_depth=1)
    out = torch.full((B, n + 1), -1, dtype=torch.int32, device=dev)
    if n:
        out[:, :n] = torch.where(idx < pos[:, None], draft_token_ids.to(torch.int32), out[:, :n])
    out.scatter_(1, pos[:, None], sampled[:, :1])
    return out, acc_num, emitted_num
