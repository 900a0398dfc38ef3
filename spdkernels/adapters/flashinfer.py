"""FlashInfer's ``flashinfer.sampling.chain_speculative_sampling``, served by :func:`spdkernels.rejection_sample`.

FlashInfer's layout is the dense batch of chains with ``n`` drafts per request: ``draft_probs [B, n, V]``,
``draft_token_ids [B, n]``, ``target_probs [B, n + 1, V]`` (its row ``i`` verifies draft ``i``, row ``n`` is the
bonus row). That is the op's own layout (``N + R`` rows, chains), read in place with ``target_is_probs=True``:
the adapter reshapes, draws the coins and updates the counters; the op walks every chain, reads the probability
of each draft from its row as given, and draws the correction or the bonus token.

**FlashInfer's rules, reproduced:** draft ``i`` is accepted iff ``u * draft_prob(t) < target_prob(t)`` with a
coin ``u``; the first rejection stops the chain and the token at that position is drawn from
``relu(target - draft)`` of its row (the bonus row, with no draft, after ``n`` acceptances) by inverse CDF (the
first id whose running sum exceeds ``u * sum``); the rest of the row is ``-1``.
``maybe_output_emitted_draft_token_num`` is incremented by the number of drafts emitted (accepted before the
first rejection) and ``maybe_output_accepted_token_num`` by the number of drafts that pass the test
*independently* (every position tested; those after the first rejection with coins of their own); both are
accumulated with ``+=`` into the caller's tensors, which are also returned.

**What differs** (``docs/adapters.md``): the accept test is the op's ``u * q(t) <= p(t)`` with ``u`` in (0, 1)
(FlashInfer: ``<`` with ``u`` in (0, 1]; the two differ only when ``u * q(t)`` equals ``p(t)`` exactly). The
random stream is not curand's: the coins are one draw of ``N + B + B x n`` fp32 uniforms (one per draft,
request-major, then one final coin per request, then ``B x n`` for the independent recount) from ``generator``, or a
``torch.Generator`` seeded with ``(seed, offset)``, or torch's default generator. The running sums of the draw
are accumulated in a different order (a coin within ~1e-7 of a CDF step can pick the neighbouring token). A
zero-mass correction distribution (``target == draft`` at the rejected row) is FlashInfer's undefined fallback;
the op samples from the target row.
``deterministic`` has no effect (the op is deterministic).

On CPU with the ``cpp`` backend the call is one C++ op (``torch.ops.spdkernels._cpu_flashinfer_chain_sampling``:
the rejection_sample kernel and FlashInfer's counters, no small tensor operations around it); elsewhere the same
steps are tensor operations around :func:`spdkernels.rejection_sample`. Same coins, same outputs
(tests/test_adapters_flashinfer.py compares the two).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

import spdkernels
from spdkernels import _config
from spdkernels.ops.rejection_sample import _check_values as _op_check_values

from ._common import _CPU, cached_arange, check, fail, fused_op, open_unit_fp32

__all__ = ["chain_speculative_sampling"]

_MASK64 = (1 << 64) - 1


def _stream_seed(seed, offset) -> Optional[int]:
    """The seed of the stream of ``(seed, offset)`` (None when neither is given): a 64-bit mix, so that offset
    advances give unrelated coins."""
    if seed is None and offset is None:
        return None
    s = int(seed.reshape(-1)[0]) if isinstance(seed, torch.Tensor) else int(seed or 0)
    o = int(offset.reshape(-1)[0]) if isinstance(offset, torch.Tensor) else int(offset or 0)
    return (s * 0x9E3779B97F4A7C15 + o * 0xBF58476D1CE4E5B9 + o) & _MASK64 >> 1


def _generator(device, generator, seed, offset) -> Optional[torch.Generator]:
    if generator is not None:
        return generator
    mixed = _stream_seed(seed, offset)
    return None if mixed is None else torch.Generator(device=device).manual_seed(mixed)


# the generic path everywhere when False (tests and the benchmark's baseline switch it)
_FUSED = True


def _fused(draft_probs, *counters):
    """The C++ op in FlashInfer's layout when it serves this call (the rejection_sample kernel and FlashInfer's
    counters in one call), else None: CPU tensors, the ``cpp`` backend chosen for ``rejection_sample``, the counters
    given contiguous (they are updated in place) or not given. The op makes every check of the generic path itself;
    an argument of the wrong type makes it raise, and the generic path's checks then name it."""
    if not (_FUSED and isinstance(draft_probs, torch.Tensor) and draft_probs.is_cpu and draft_probs.dim() == 3
            and draft_probs.shape[0] > 0):
        return None
    for c in counters:
        if c is not None and not (isinstance(c, torch.Tensor) and c.is_contiguous()):
            return None
    return fused_op("rejection_sample", "_cpu_flashinfer_chain_sampling")


def _check_values(draft_probs, draft_token_ids, target_probs) -> None:
    """(validation on) the op's value checks, on FlashInfer's tensors as the op reads them."""
    if not all(isinstance(t, torch.Tensor) for t in (draft_probs, draft_token_ids, target_probs)):
        return  # (the op raises; the generic path's checks name the argument)
    if draft_probs.dim() != 3 or target_probs.dim() != 3 or draft_token_ids.dim() != 2:
        return  # (the op names the shape error)
    B, n, V = draft_probs.shape
    if tuple(target_probs.shape) != (B, n + 1, V) or tuple(draft_token_ids.shape) != (B, n):
        return
    _op_check_values(target_probs.reshape(B * (n + 1), V), draft_token_ids.reshape(B * n),
                     cached_arange(B + 1, _CPU, n), None, draft_probs.reshape(B * n, V), None, None, None, None,
                     None, None, n, target_is_probs=True)


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
    op = _fused(draft_probs, maybe_output_accepted_token_num, maybe_output_emitted_draft_token_num)
    if op is not None:
        try:
            if _config.validation_enabled():
                _check_values(draft_probs, draft_token_ids, target_probs)
            # the coins are drawn inside, as the generic path draws them (no Generator object made for a seed)
            out, acc, emitted = op(draft_probs, draft_token_ids, target_probs, generator,
                                   None if generator is not None or (seed is None and offset is None)
                                   else _stream_seed(seed, offset),
                                   maybe_output_accepted_token_num, maybe_output_emitted_draft_token_num)
        except (TypeError, RuntimeError):  # an argument of the wrong type (the schema): the checks below name it
            pass
        else:
            return (out, acc if maybe_output_accepted_token_num is None else maybe_output_accepted_token_num,
                    emitted if maybe_output_emitted_draft_token_num is None else maybe_output_emitted_draft_token_num)
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

    N = B * n
    gen = _generator(dev, generator, seed, offset)
    # one draw: the op's coins (one per draft, request-major, then one final coin per request), then FlashInfer's
    # recount coins (B x n)
    all_coins = torch.rand(N + B + N, generator=gen, device=dev)
    coins = open_unit_fp32(all_coins[:N + B])
    out, num, _ = spdkernels.rejection_sample(
        target_probs.reshape(N + B, V), draft_token_ids.reshape(N), cached_arange(B + 1, dev, n),
        draft_probs=draft_probs.reshape(N, V), uniforms=coins, max_depth=n, target_is_probs=True)
    emitted = num - 1
    emitted_num += emitted
    if n:  # FlashInfer's accepted count: the drafts from the first rejection on tested again, independently
        t = draft_token_ids.long()[..., None]
        p_t = target_probs[:, :n].gather(2, t)[..., 0]
        q_t = draft_probs.gather(2, t)[..., 0]
        retest = cached_arange(n, dev)[None] >= emitted[:, None]  # from the first rejection on
        again = ((1.0 - all_coins[N + B:].reshape(B, n)) * q_t < p_t) & retest  # coins in (0, 1], as curand's
        acc_num += emitted + again.sum(1, dtype=emitted.dtype)
    return out, acc_num, emitted_num

