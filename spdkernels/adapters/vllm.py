"""vLLM V1 rejection sampler, served by :func:`spdkernels.rejection_sample`.

The public names and signatures of ``vllm/v1/sample/rejection_sampler.py`` (current release):
``PLACEHOLDER_TOKEN_ID``, ``GREEDY_TEMPERATURE``, ``MAX_SPEC_LEN``, :func:`rejection_sample`,
:func:`generate_uniform_probs`, :func:`sample_recovered_tokens`, :func:`apply_sampling_constraints` and the
:class:`RejectionSampler` module, plus :func:`register`, the ``vllm.general_plugins`` entry point that
installs our core into vLLM's own module when vLLM is present::

    [project.entry-points."vllm.general_plugins"]
    spdkernels = "spdkernels.adapters.vllm:register"

vLLM is never imported at module import time; without it, :class:`SamplingMetadata` and
:class:`SpecDecodeMetadata` below carry the fields the sampler reads (vLLM's own objects work too: only
attributes are read).

**vLLM's layout.** ``B`` requests, request ``r`` has ``k_r >= 0`` draft tokens, ``N = sum(k_r)``:
``draft_token_ids [N]``, ``num_draft_tokens: list[int]`` (host), ``cu_num_draft_tokens [B]`` int32 =
``cumsum(k)`` *without* a leading zero, ``target_logits [N, V]`` (one row per draft token: the row that
verifies it; no bonus rows), ``bonus_token_ids [B, 1]`` sampled outside, output
``[B, max_spec_len + 1]`` int32 padded with ``PLACEHOLDER_TOKEN_ID`` (-1).

**What is reproduced** (the tests re-express each rule):

* coins of seeded requests: each one's slice drawn with ``uniform_(generator=...)`` in float64, as vLLM
  redraws it (requests with no drafts skipped; no coin at all when ``all_greedy``), so its generator advances
  exactly as in vLLM;
* accept rule ``draft_prob > 0 and target_prob / draft_prob >= u``; a draft token id < 0 (padding) is
  rejected; greedy requests (``temperature == GREEDY_TEMPERATURE``) accept while the draft equals the
  argmax and emit the argmax at the first mismatch; the bonus token is ``bonus_token_ids`` when every draft
  was accepted;
* seeded requests (those in ``generators``) emit exactly vLLM's tokens and leave their generator in
  vLLM's state: recovered tokens by vLLM's rule ``argmax(residual * (1 / q))`` with ``q ~ Exp(1)``, one
  row of ``V`` per request drawn from the request's generator when it has drafts (``float64`` with
  ``use_fp64_gumbel``), residual ``max(p - draft_probs, 0)``, or ``p`` with the draft token zeroed when
  ``draft_probs is None``.

**What differs** (see ``docs/adapters.md``): unseeded requests (no seed semantics to keep) get the op's own
samples, distributed exactly as vLLM's but not the same tokens for the same default-generator state: their coins
are one fp32 draw of ``N + B`` from the default generator (vLLM: ``N`` float64), and the correction is drawn by
inverse CDF from the same residual with the request's final coin (no ``[B, V]`` noise is drawn). The op reads
vLLM's ``[N, V]`` rows in place (its ``bonus_token_ids`` layout) and
tests ``u * q(t) <= p(t)`` in fp32 with ``p`` from its own softmax (vLLM: ``p / q >= u``, ``u`` float64), so a
coin within ~1e-7 of the ratio can decide differently; a coin of exactly 0 (odds 2^-53) accepts a
zero-probability token in vLLM, not here. The positional 6th argument is
``target_logits`` (current vLLM); the older ``target_probs=`` keyword is accepted and read as probability rows
(``target_is_probs``; converted with ``log`` only on the rare path with padded drafts).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import torch

import spdkernels
from spdkernels import _config
from spdkernels.ops.rejection_sample import _check_values as _op_check_values

from ._common import UNUSED_COIN, check, check_shape, fail, fused_op, gather_rows, open_unit_fp32, probs_to_logits

log = logging.getLogger("spdkernels.adapters.vllm")

PLACEHOLDER_TOKEN_ID = -1
GREEDY_TEMPERATURE = 0
# vLLM's bound on the draft tokens of one request in one step
MAX_SPEC_LEN = 128

__all__ = ["GREEDY_TEMPERATURE", "MAX_SPEC_LEN", "PLACEHOLDER_TOKEN_ID", "RejectionSampler", "SamplerOutput",
           "SamplingMetadata", "SpecDecodeMetadata", "apply_sampling_constraints", "generate_uniform_probs",
           "register", "rejection_sample", "sample_recovered_tokens"]


# ---- the metadata the sampler reads --------------------------------------------------------------------

@dataclass
class SamplingMetadata:
    """The fields of vLLM's ``vllm.v1.sample.metadata.SamplingMetadata`` that the rejection sampler reads.

    ``temperature``: fp32 ``[B]`` (``None`` allowed when ``all_greedy``), ``GREEDY_TEMPERATURE`` (0) marks a
    greedy request; ``top_k``: int ``[B]`` (``V`` or 0 = off) or None; ``top_p``: fp32 ``[B]`` or None;
    ``generators``: batch index -> ``torch.Generator`` of the seeded requests."""
    temperature: Optional[torch.Tensor]
    all_greedy: bool
    all_random: bool
    top_p: Optional[torch.Tensor] = None
    top_k: Optional[torch.Tensor] = None
    generators: Dict[int, torch.Generator] = field(default_factory=dict)
    max_num_logprobs: Optional[int] = None


@dataclass
class SpecDecodeMetadata:
    """vLLM's ``SpecDecodeMetadata``: the flattened draft layout of one step.

    ``logits`` (the model output) has ``N + B`` rows, request ``r``'s ``k_r`` verification rows followed by
    its bonus row; ``target_logits_indices [N]`` and ``bonus_logits_indices [B]`` select them."""
    draft_token_ids: torch.Tensor
    num_draft_tokens: List[int]
    cu_num_draft_tokens: torch.Tensor
    cu_num_sampled_tokens: torch.Tensor
    target_logits_indices: torch.Tensor
    bonus_logits_indices: torch.Tensor
    logits_indices: torch.Tensor

    def __post_init__(self):
        self.max_spec_len = max(self.num_draft_tokens) if self.num_draft_tokens else 0

    @classmethod
    def make_dummy(cls, draft_token_ids: Sequence[Sequence[int]], device="cpu") -> SpecDecodeMetadata:
        """The metadata of a step whose request ``r`` drafted ``draft_token_ids[r]``."""
        k = [len(d) for d in draft_token_ids]
        flat = [t for d in draft_token_ids for t in d]
        cu_draft = torch.tensor(k, dtype=torch.int64).cumsum(0)
        cu_sampled = torch.tensor([x + 1 for x in k], dtype=torch.int64).cumsum(0)
        target_idx, bonus_idx = [], []
        start = 0
        for kr in k:
            target_idx.extend(range(start, start + kr))
            bonus_idx.append(start + kr)
            start += kr + 1
        return cls(draft_token_ids=torch.tensor(flat, dtype=torch.int32, device=device), num_draft_tokens=k,
                   cu_num_draft_tokens=cu_draft.to(torch.int32).to(device),
                   cu_num_sampled_tokens=cu_sampled.to(torch.int32).to(device),
                   target_logits_indices=torch.tensor(target_idx, dtype=torch.int32, device=device),
                   bonus_logits_indices=torch.tensor(bonus_idx, dtype=torch.int32, device=device),
                   logits_indices=torch.arange(start, dtype=torch.int32, device=device))


@dataclass
class SamplerOutput:
    """vLLM's ``SamplerOutput`` (its own class is returned when vLLM is installed)."""
    sampled_token_ids: torch.Tensor
    logprobs_tensors: Optional[object] = None


def _sampler_output(ids: torch.Tensor):
    try:
        from vllm.v1.outputs import SamplerOutput as VllmSamplerOutput  # optional
    except ImportError:
        return SamplerOutput(sampled_token_ids=ids)
    return VllmSamplerOutput(sampled_token_ids=ids, logprobs_tensors=None)


# ---- randomness, exactly as vLLM draws it ---------------------------------------------------------------

def generate_uniform_probs(num_tokens: int, num_draft_tokens: List[int], generators: Dict[int, torch.Generator],
                           device) -> torch.Tensor:
    """float64 ``[num_tokens]`` coins in [0, 1): drawn from the default generator, then each seeded request's
    slice redrawn from its own generator (requests without drafts draw nothing), as vLLM does."""
    u = torch.rand((num_tokens,), dtype=torch.float64, device=device)
    start = 0
    for r, n in enumerate(num_draft_tokens):
        if n == 0:
            continue
        gen = generators.get(r)
        if gen is not None:
            u[start:start + n].uniform_(generator=gen)
        start += n
    return u


def _coins(N: int, B: int, num_draft_tokens: List[int], generators: Dict[int, torch.Generator], device
           ) -> torch.Tensor:
    """fp32 ``[N + B]`` in (0, 1): the op's draft coins (each seeded request's slice drawn from its generator exactly
    as :func:`generate_uniform_probs` draws it, the others from the default generator) and final coins."""
    u = torch.rand((N + B,), dtype=torch.float32, device=device)
    if generators:
        start = 0
        for r, n in enumerate(num_draft_tokens):
            gen = generators.get(r)
            if n and gen is not None:
                u[start:start + n] = torch.empty(n, dtype=torch.float64, device=device).uniform_(generator=gen)
            start += n
    return open_unit_fp32(u)


def _seeded_inv_q(num_draft_tokens: List[int], generators: Dict[int, torch.Generator], V: int, device,
                  dtype) -> Dict[int, torch.Tensor]:
    """1 / Exp(1) noise rows ``[V]`` of the seeded requests that have drafts, drawn from their generators (each
    generator advances by exactly what vLLM draws from it)."""
    out = {}
    for r, gen in generators.items():
        if num_draft_tokens[r] > 0:
            out[r] = torch.empty(V, dtype=dtype, device=device).exponential_(generator=gen).reciprocal_()
    return out


def _residual(p: torch.Tensor, draft_probs_rows: Optional[torch.Tensor], draft_tokens: torch.Tensor) -> torch.Tensor:
    """vLLM's recovery weights (unnormalised): ``max(p - q, 0)``, or ``p`` with the draft token zeroed when the
    drafter gave no probabilities (a negative, padded draft id zeroes nothing)."""
    if draft_probs_rows is not None:
        return torch.clamp(p - draft_probs_rows, min=0)
    res = p.clone()
    t = draft_tokens.long()
    valid = t >= 0
    rows = torch.arange(p.shape[0], device=p.device)
    res[rows[valid], t[valid]] = 0
    return res


def _recover(scores: torch.Tensor, V: int) -> torch.Tensor:
    return scores.argmax(dim=-1).clamp_(max=V - 1)


def sample_recovered_tokens(max_spec_len: int, num_draft_tokens: List[int], cu_num_draft_tokens: torch.Tensor,
                            draft_token_ids: torch.Tensor, draft_probs: Optional[torch.Tensor],
                            target_probs: torch.Tensor, sampling_metadata, device,
                            use_fp64_gumbel: bool = False) -> torch.Tensor:
    """The recovered token of every draft position, ``[N]`` (dtype of ``draft_token_ids``): for request ``r``,
    ``argmax(residual * inv_q[r])`` with one ``inv_q = 1 / Exp(1)`` row of ``V`` per request (the default
    generator for all rows, then the seeded requests with drafts redrawn from their generators), as vLLM
    computes it. ``target_probs [N, V]`` fp32 probabilities; ``max_spec_len`` is accepted for signature
    compatibility."""
    B = len(num_draft_tokens)
    N, V = target_probs.shape
    dtype = torch.float64 if use_fp64_gumbel else torch.float32
    q = torch.empty((B, V), dtype=dtype, device=device)
    q.exponential_()
    for r, gen in sampling_metadata.generators.items():
        if num_draft_tokens[r] > 0:
            q[r].exponential_(generator=gen)
    inv_q = q.reciprocal()
    req = torch.repeat_interleave(torch.arange(B, device=device),
                                  torch.tensor(num_draft_tokens, device=device), output_size=N)
    res = _residual(target_probs, draft_probs, draft_token_ids)
    return _recover(res * inv_q[req], V).to(draft_token_ids.dtype)


# ---- the sampler ------------------------------------------------------------------------------------------

def _check_args(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs, target,
                target_name, bonus_token_ids):
    """The layouts vLLM's own ``rejection_sample`` asserts on (ndim, contiguity, shapes), as ValueErrors."""
    check("draft_token_ids", draft_token_ids, 1, (torch.int32, torch.int64), contiguous=True)
    dev = draft_token_ids.device
    check(target_name, target, 2, (torch.float32, torch.float16, torch.bfloat16), dev, contiguous=True)
    N = draft_token_ids.shape[0]
    V = target.shape[1]
    check_shape(target_name, target, (N, V), "[num_tokens, vocab_size] (one row per draft token)")
    B = len(num_draft_tokens)
    if sum(num_draft_tokens) != N or any(n < 0 for n in num_draft_tokens):
        fail("num_draft_tokens", f"expected {B} counts >= 0 summing to num_tokens = {N}, got {list(num_draft_tokens)}")
    check("cu_num_draft_tokens", cu_num_draft_tokens, 1, (torch.int32, torch.int64), dev)
    check_shape("cu_num_draft_tokens", cu_num_draft_tokens, (B,), "[batch_size] (no leading zero)")
    if draft_probs is not None:
        check("draft_probs", draft_probs, 2, (torch.float32,), dev, contiguous=True)
        check_shape("draft_probs", draft_probs, (N, V), "[num_tokens, vocab_size]")
    check("bonus_token_ids", bonus_token_ids, None, (torch.int32, torch.int64), dev, contiguous=True)
    if bonus_token_ids.numel() != B or bonus_token_ids.dim() not in (1, 2):
        fail("bonus_token_ids", f"expected shape [batch_size, 1] = [{B}, 1], got {list(bonus_token_ids.shape)}")
    if not isinstance(max_spec_len, int) or max_spec_len < max(num_draft_tokens, default=0):
        fail("max_spec_len", f"expected an int >= max(num_draft_tokens) = {max(num_draft_tokens, default=0)}, "
             f"got {max_spec_len!r}")
    if _config.validation_enabled() and B:
        want = torch.tensor(num_draft_tokens, dtype=torch.int64).cumsum(0)
        if not torch.equal(cu_num_draft_tokens.cpu().long(), want):
            fail("cu_num_draft_tokens", f"expected cumsum(num_draft_tokens) = {want.tolist()[:16]}, "
                 f"got {cu_num_draft_tokens.tolist()[:16]}")
        if bool(((bonus_token_ids < 0) | (bonus_token_ids >= V)).any()):
            fail("bonus_token_ids", f"expected token ids in [0, {V})")
    return B, N, V


def _check_metadata(sampling_metadata, B: int, all_greedy: bool, all_random: bool) -> None:
    """The metadata the generic path reads: temperatures for a mixed batch, generators keyed by request index."""
    if not (all_greedy or all_random) and not isinstance(sampling_metadata.temperature, torch.Tensor):
        fail("sampling_metadata.temperature", "a batch of greedy and sampled requests needs a [batch_size] "
             f"tensor of temperatures, got {type(sampling_metadata.temperature).__name__}")
    gens = sampling_metadata.generators or {}
    bad = [r for r in gens if not (isinstance(r, int) and 0 <= r < B)]
    if bad and not all_greedy:
        fail("sampling_metadata.generators", f"expected request indices in [0, {B}) as keys, got {bad[:8]}")


def rejection_sample(draft_token_ids: torch.Tensor, num_draft_tokens: List[int], max_spec_len: int,
                     cu_num_draft_tokens: torch.Tensor, draft_probs: Optional[torch.Tensor],
                     target_logits: Optional[torch.Tensor] = None, bonus_token_ids: Optional[torch.Tensor] = None,
                     sampling_metadata=None, *, target_probs: Optional[torch.Tensor] = None,
                     synthetic_mode: bool = False, synthetic_conditional_rates=None,
                     use_fp64_gumbel: bool = False) -> torch.Tensor:
    """vLLM's ``rejection_sample``: verify a flattened batch of draft chains.

    Args:
        draft_token_ids: int32/int64 ``[N]``, contiguous; ``-1`` marks a padded draft (always rejected).
        num_draft_tokens: host ``list[int]`` of ``B`` counts ``k_r >= 0``.
        max_spec_len: int >= ``max(k_r)``; the output has ``max_spec_len + 1`` columns.
        cu_num_draft_tokens: int32 ``[B]`` = ``cumsum(k)``, no leading zero.
        draft_probs: fp32 ``[N, V]`` (row ``i`` the distribution draft ``i`` was drawn from) or ``None``
            (n-gram drafts: ``q = 1`` for the draft token).
        target_logits: fp32/bf16/fp16 ``[N, V]``, contiguous, row ``i`` verifies draft ``i``; temperature,
            top-k and top-p already applied (vLLM's ``apply_sampling_constraints``), greedy rows unscaled.
        bonus_token_ids: int ``[B, 1]``: emitted after ``k_r`` accepted drafts.
        sampling_metadata: ``all_greedy``, ``all_random``, ``temperature [B]`` (0 = greedy), ``generators``.
        target_probs: the older keyword: fp32 probabilities ``[N, V]`` instead of logits (converted with
            ``log``; recovered tokens then use these probabilities directly, as older vLLM did).
        synthetic_mode, synthetic_conditional_rates: vLLM's benchmarking mode; not supported here
            (the vLLM plugin hands such calls back to vLLM's own implementation).
        use_fp64_gumbel: draw the recovery noise in float64, as vLLM's flag does.

    Returns:
        int32 ``[B, max_spec_len + 1]``: accepted drafts, then the recovered token at the first rejection or
        the bonus token after ``k_r`` acceptances, then ``PLACEHOLDER_TOKEN_ID``. Nothing is written in place.

    Raises:
        ValueError: naming the argument, for the layouts vLLM asserts on (rank, contiguity, shapes, counts),
            for both or neither of ``target_logits`` / ``target_probs``, and (with spdkernels validation on)
            ``cu_num_draft_tokens`` inconsistent with ``num_draft_tokens`` or draft ids >= V.

    Costs one host sync (whether any draft is padded or has ``q(t) == 0``).
    """
    if synthetic_mode:
        raise NotImplementedError("synthetic_mode: vLLM's synthetic acceptance benchmark is not reproduced by the "
                                  "spdkernels adapter (the vLLM plugin defers such calls to vLLM)")
    if (target_logits is None) == (target_probs is None):
        fail("target_logits", "pass exactly one of target_logits (current vLLM) and target_probs (older vLLM)")
    if sampling_metadata is None:
        fail("sampling_metadata", "expected vLLM's SamplingMetadata (all_greedy, all_random, temperature, generators)")
    if bonus_token_ids is None:
        fail("bonus_token_ids", "expected an int tensor [batch_size, 1]")
    probs_given = target_probs is not None
    target = target_probs if probs_given else target_logits
    all_greedy = bool(sampling_metadata.all_greedy)
    op = _fused(target)
    if op is not None and (all_greedy or not sampling_metadata.generators):
        out = _fused_call(op, draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
                          target, probs_given, bonus_token_ids, sampling_metadata, all_greedy)
        if out is not None:
            return out
    B, N, V = _check_args(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs, target,
                          "target_probs" if probs_given else "target_logits", bonus_token_ids)
    device = target.device
    bonus = bonus_token_ids.reshape(B).to(torch.int32)  # (the output is int32; vLLM's bonus ids may be int64)
    out_shape = (B, max_spec_len + 1)
    all_random = bool(sampling_metadata.all_random) and not all_greedy  # no greedy request
    _check_metadata(sampling_metadata, B, all_greedy, all_random)
    generators = sampling_metadata.generators if not all_greedy else {}

    # coins first, as vLLM does (its greedy kernel runs after they are drawn): the op's N + B fp32 coins in one
    # draw, each seeded request's slice then redrawn from its generator as vLLM draws it (float64)
    coins = None if all_greedy else _coins(N, B, num_draft_tokens, generators, device)
    uniform = None if coins is None else coins[:N]
    if all_greedy or all_random:
        greedy = None  # (made only if the rare padded-draft path needs it)
    else:
        greedy = sampling_metadata.temperature.to(device) == GREEDY_TEMPERATURE
    noise_dtype = torch.float64 if use_fp64_gumbel else torch.float32
    seeded_inv_q = {} if all_greedy else _seeded_inv_q(num_draft_tokens, generators, V, device, noise_dtype)

    if N == 0 or B == 0:
        out = torch.full(out_shape, PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
        if B:
            out[:, 0] = bonus
        return out

    tokens = draft_token_ids
    # seeded sampled requests emit exactly vLLM's tokens for their generator; the others get the op's own
    # (equally distributed) samples
    exact = [r for r in generators if r < B and num_draft_tokens[r] > 0]
    if exact and not all_random:
        exact = [r for r in exact if float(sampling_metadata.temperature[r]) != GREEDY_TEMPERATURE]
    temperature = None if all_random else _op_temperature(greedy, B, device, all_greedy)
    ctx = _Recovery(target_logits, target_probs, draft_probs, tokens, seeded_inv_q, noise_dtype, V)
    # drafts vLLM rejects whatever the coin: padded ids, and q(t) == 0 for sampled requests (one host sync)
    if draft_probs is not None and not all_greedy:
        hi = int(tokens.max())
        if hi >= V:  # (the gather below would read out of bounds)
            fail("draft_token_ids", f"token {hi} is outside the vocabulary [0, {V})")
        bad = draft_probs.gather(1, tokens.long().clamp(min=0)[:, None])[:, 0] <= 0
        if not all_random:
            bad &= ~_expand(greedy, num_draft_tokens)
        bad |= tokens < 0
        bad = bad if bool(bad.any()) else None
    else:
        bad = tokens < 0 if int(tokens.min()) < 0 else None
    if bad is None:
        return _bonus_path(target, probs_given, tokens, num_draft_tokens, draft_probs, coins, temperature, exact,
                           bonus, max_spec_len, ctx)
    logits = probs_to_logits(target) if probs_given else target
    if greedy is None:
        greedy = torch.full((B,), all_greedy, dtype=torch.bool, device=device)
    temperature = torch.where(greedy, 0.0, 1.0).to(torch.float32)
    k = torch.tensor(num_draft_tokens, dtype=torch.int64, device=device)
    starts = torch.cumsum(k, 0) - k
    req = torch.repeat_interleave(torch.arange(B, device=device), k, output_size=N)
    pos = torch.arange(N, device=device) - starts[req]
    ex = torch.zeros(B, dtype=torch.bool, device=device)
    ex[exact] = True
    out = torch.full(out_shape, PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
    # the final coins of the one draw above (a greedy row reads none): this path draws from the default generator
    # exactly what the others do
    final_coins = coins[N:] if coins is not None else torch.full((B,), UNUSED_COIN, dtype=torch.float32,
                                                                  device=device)
    _gather_path(out, logits, tokens, draft_probs, k, starts, req, pos, bad, True, uniform, greedy, ex,
                 temperature, final_coins, bonus, max_spec_len, ctx)
    return out


# the generic path everywhere when False (tests and the benchmark's baseline switch it)
_FUSED = True


def _fused(target):
    """The C++ op in vLLM's layout when it may serve this call (else None): CPU tensors and the ``cpp`` backend chosen
    for ``rejection_sample``. The op makes the checks of the generic path itself (with validation on, the generic
    path's checks run first) and hands back the calls it does not serve (seeded requests are not given to it, padded
    drafts and empty batches it returns): the generic path then runs."""
    if not (_FUSED and isinstance(target, torch.Tensor) and target.is_cpu):
        return None
    return fused_op("rejection_sample", "_cpu_vllm_rejection_sample")


def _fused_call(op, draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs, target,
                probs_given, bonus_token_ids, sampling_metadata, all_greedy) -> Optional[torch.Tensor]:
    """One C++ op (csrc/ops.cpp, vllm_rejection_sample_cpu): the generic path's coins (N + B fp32 from the default
    generator), temperatures and op call in vLLM's layout. None when the generic path must serve the call."""
    all_random = bool(sampling_metadata.all_random) and not all_greedy
    temperature = None
    if not (all_greedy or all_random):  # (the op reads fp32 temperatures; vLLM's are fp32 already)
        temperature = sampling_metadata.temperature
        if isinstance(temperature, torch.Tensor) and temperature.dtype != torch.float32:
            # only "greedy or not" matters to the op: kept exactly (an fp64 1e-50 must not round to greedy)
            temperature = (temperature != GREEDY_TEMPERATURE).to(torch.float32)
    if _config.validation_enabled():
        if isinstance(draft_token_ids, torch.Tensor) and draft_token_ids.numel() and int(draft_token_ids.min()) < 0:
            return None  # padded drafts: the generic path (the op's value checks refuse negative ids)
        B, N, _ = _check_args(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
                              target, "target_probs" if probs_given else "target_logits", bonus_token_ids)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(num_draft_tokens, dtype=torch.int32).cumsum(0)
        # the temperatures the op is given on the generic path: 0 (greedy) or 1 (vLLM's rows are already scaled)
        temp = _op_temperature(temperature.to(bonus_token_ids.device) == GREEDY_TEMPERATURE, B, target.device,
                               all_greedy) if temperature is not None else None
        _op_check_values(target, draft_token_ids, cu, None, draft_probs, temp, None, None, None, None, None,
                         max_spec_len, bonus_token_ids.reshape(B), target_is_probs=probs_given)
    try:
        out = op(target, draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
                 bonus_token_ids, temperature, all_greedy, all_random, probs_given)
    except (TypeError, RuntimeError):  # an argument of the wrong type (the schema): the generic path's checks name it
        return None
    return out if out.numel() else None


def _op_temperature(greedy: torch.Tensor, B: int, device, all_greedy: bool) -> torch.Tensor:
    """The op's temperature: 0 for greedy requests, 1 for the others (vLLM's rows are already scaled)."""
    if all_greedy:
        return torch.zeros(B, dtype=torch.float32, device=device)
    return (~greedy).to(torch.float32)


class _Recovery:
    """vLLM's recovered-token rule for chosen rows: ``argmax(residual * inv_q)``, with the seeded requests'
    noise rows (drawn up front, as vLLM draws them) or fresh Exp(1) noise from the default generator."""

    def __init__(self, target_logits, target_probs, draft_probs, tokens, seeded_inv_q, noise_dtype, V):
        self.target_logits, self.target_probs, self.draft_probs = target_logits, target_probs, draft_probs
        self.tokens, self.seeded_inv_q, self.noise_dtype, self.V = tokens, seeded_inv_q, noise_dtype, V

    def probs(self, vrows: torch.Tensor) -> torch.Tensor:
        if self.target_probs is not None:
            return self.target_probs.index_select(0, vrows).to(torch.float32)
        return torch.softmax(self.target_logits.index_select(0, vrows), dim=-1, dtype=torch.float32)

    def __call__(self, reqs: torch.Tensor, vrows: torch.Tensor) -> torch.Tensor:
        q_rows = None if self.draft_probs is None else self.draft_probs.index_select(0, vrows)
        res = _residual(self.probs(vrows), q_rows, self.tokens[vrows])
        inv_q = torch.empty((reqs.numel(), self.V), dtype=self.noise_dtype, device=res.device)
        for j, r in enumerate(reqs.tolist()):
            if r in self.seeded_inv_q:
                inv_q[j] = self.seeded_inv_q[r]
            else:
                inv_q[j].exponential_().reciprocal_()
        return _recover(res * inv_q, self.V).to(torch.int32)


def _bonus_path(target, probs_given: bool, tokens, ks: List[int], draft_probs, coins, temperature,
                exact: List[int], bonus, max_spec_len: int, recover) -> torch.Tensor:
    """No padded draft: the op verifies vLLM's own ``[N, V]`` rows in place (its ``bonus_token_ids`` layout: no
    row after a request's last draft) with vLLM's coins and emits the bonus token after ``k_r`` acceptances;
    probability rows (the older ``target_probs``) are read as given. Seeded requests then get vLLM's recovered
    token at their first rejection."""
    dev = tokens.device
    B, N = len(ks), tokens.shape[0]
    cu = [0]
    for kr in ks:
        cu.append(cu[-1] + kr)
    if coins is None:  # all greedy: the op reads no coin
        coins = torch.full((N + B,), UNUSED_COIN, dtype=torch.float32, device=dev)
    out, num, _ = spdkernels.rejection_sample(
        target, tokens, torch.tensor(cu, dtype=torch.int32, device=dev), draft_probs=draft_probs,
        temperature=temperature, uniforms=coins, max_depth=max_spec_len, bonus_token_ids=bonus,
        target_is_probs=probs_given)
    if exact:  # vLLM's own recovery, exactly, at the first rejection of each seeded request
        nums = num[exact].tolist()
        for r, m in zip(exact, nums):
            pos = m - 1
            if pos < ks[r]:
                out[r, pos] = recover(torch.tensor([r], device=dev), torch.tensor([cu[r] + pos], device=dev))[0]
    return out


def _gather_path(out, logits, tokens, draft_probs, k, starts, req, pos, bad, any_bad, uniform, greedy, exact,
                 temperature, final_coins, bonus, max_spec_len, recover):
    """Draft probabilities or padded drafts: the op's layout is gathered (per request its verification rows up
    to its first padded draft, then one more row), the op walks every draft with vLLM's coins and samples the
    correction; seeded requests, and requests stopped by a padded draft, recover with vLLM's rule."""
    B = k.shape[0]
    dev = k.device
    N = tokens.shape[0]
    if any_bad:  # truncate each request at its first such draft (the op then emits at that row)
        cap = k.clone().scatter_reduce_(0, req[bad], pos[bad], reduce="amin")
        keep = pos < cap[req]
    else:
        cap, keep = k, None
    n_keep = N if keep is None else int(keep.sum())
    T = n_keep + B
    row_req = torch.repeat_interleave(torch.arange(B, device=dev), cap + 1, output_size=T)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(cap, 0)
    local = torch.arange(T, device=dev) - (cu.long()[row_req] + row_req)
    src = starts[row_req] + local
    # after every kept draft: the row of the first padded draft, or any valid row standing in for the bonus row
    stand_in = (local == cap[row_req]) & (cap[row_req] == k[row_req])
    src = torch.where(stand_in, (starts[row_req] + k[row_req] - 1).clamp(min=0), src)
    op_q = None
    if draft_probs is not None:
        op_q = draft_probs if keep is None else draft_probs[keep]
    coins = torch.empty((T,), dtype=torch.float32, device=dev)
    coins[:n_keep] = UNUSED_COIN if uniform is None else open_unit_fp32(uniform if keep is None else uniform[keep])
    coins[n_keep:] = final_coins
    o, num, _ = spdkernels.rejection_sample(gather_rows("rows", logits, src), tokens if keep is None else tokens[keep],
                                            cu, draft_probs=op_q, temperature=temperature, uniforms=coins,
                                            max_depth=max_spec_len)
    out.copy_(o)
    accepted = num.long() - 1
    rows = torch.arange(B, device=dev)
    all_acc = accepted == k
    out[rows[all_acc], k[all_acc]] = bonus[all_acc]
    vllm_rule = ~all_acc & ~greedy & (exact | (cap < k))
    rej = vllm_rule.nonzero()[:, 0]
    if rej.numel():
        out[rej, accepted[rej]] = recover(rej, starts[rej] + accepted[rej])


# ---- the module ---------------------------------------------------------------------------------------------

def _expand(x: torch.Tensor, num_draft_tokens: List[int]) -> torch.Tensor:
    counts = torch.tensor(num_draft_tokens, device=x.device)
    return torch.repeat_interleave(x, counts, output_size=sum(num_draft_tokens))


def _apply_top_k_top_p(logits: torch.Tensor, top_k: Optional[torch.Tensor],
                       top_p: Optional[torch.Tensor]) -> torch.Tensor:
    """vLLM's masking rule, re-expressed: top-k keeps the logits >= the k-th largest (``k >= V`` keeps all);
    top-p sorts ascending and masks every token whose cumulative probability from the bottom is
    ``<= 1 - p``, never the most likely one. Masked logits become -inf."""
    V = logits.shape[1]
    if top_k is not None:
        kk = top_k.long().clamp(min=1, max=V)
        kth = torch.sort(logits, dim=-1, descending=True).values.gather(1, (kk - 1)[:, None])
        off = (top_k.long() <= 0) | (top_k.long() >= V)
        kth = torch.where(off[:, None], torch.full_like(kth, float("-inf")), kth)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        srt, idx = torch.sort(logits, dim=-1, descending=False)
        csum = torch.softmax(srt, dim=-1).cumsum(dim=-1)
        mask = csum <= (1 - top_p.to(csum.dtype))[:, None]
        mask[:, -1] = False
        srt = srt.masked_fill(mask, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, idx, srt)
    return logits


def apply_sampling_constraints(logits: torch.Tensor, cu_num_draft_tokens: torch.Tensor, sampling_metadata,
                               num_draft_tokens: Optional[List[int]] = None) -> torch.Tensor:
    """vLLM's ``apply_sampling_constraints``: divide each row by its request's temperature (greedy rows by 1),
    then top-k / top-p masking; ``all_greedy`` returns ``logits`` untouched. ``logits [N, V]`` fp32 may be
    updated in place (as in vLLM). ``num_draft_tokens`` (host) avoids a host sync; without it the counts
    are read from ``cu_num_draft_tokens``."""
    if sampling_metadata.all_greedy:
        return logits
    if num_draft_tokens is None:
        cu = [0] + cu_num_draft_tokens.tolist()
        num_draft_tokens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    t = sampling_metadata.temperature
    t = torch.where(t == GREEDY_TEMPERATURE, torch.ones_like(t), t)
    logits.div_(_expand(t, num_draft_tokens).to(logits.dtype)[:, None])
    top_k = None if sampling_metadata.top_k is None else _expand(sampling_metadata.top_k, num_draft_tokens)
    top_p = None if sampling_metadata.top_p is None else _expand(sampling_metadata.top_p, num_draft_tokens)
    return _apply_top_k_top_p(logits, top_k, top_p)


def _sample_bonus(logits: torch.Tensor, sm) -> torch.Tensor:
    """Bonus tokens ``[B, 1]`` int32 when no vLLM ``Sampler`` is given: argmax for greedy requests, otherwise
    vLLM's random sampler (constraints, softmax, ``argmax(p / Exp(1))`` with the request's generator)."""
    logits = logits.to(torch.float32)
    greedy_tok = logits.argmax(dim=-1)
    if sm.all_greedy:
        return greedy_tok.to(torch.int32)[:, None]
    B = logits.shape[0]
    probs = torch.softmax(apply_sampling_constraints(logits.clone(), torch.arange(1, B + 1), sm, [1] * B), dim=-1)
    q = torch.empty_like(probs).exponential_()
    for r, gen in sm.generators.items():
        q[r].exponential_(generator=gen)
    sampled = probs.div_(q).argmax(dim=-1)
    if sm.all_random:
        return sampled.to(torch.int32)[:, None]
    greedy = sm.temperature == GREEDY_TEMPERATURE
    return torch.where(greedy, greedy_tok, sampled).to(torch.int32)[:, None]


class RejectionSampler(torch.nn.Module):
    """vLLM's ``RejectionSampler`` module: ``forward(metadata, draft_probs, logits, sampling_metadata)``.

    ``logits [N + B, V]`` is the model output (verification rows and bonus rows, selected by the
    metadata's indices); returns a ``SamplerOutput`` whose ``sampled_token_ids`` is int32
    ``[B, metadata.max_spec_len + 1]`` padded with ``PLACEHOLDER_TOKEN_ID``.

    Differs from vLLM's module: the bonus token comes from ``sampler`` (vLLM's ``Sampler``, called as vLLM
    calls it) when one is given, else from a built-in sampler (argmax / vLLM's exponential-race sampling with
    temperature, top-k, top-p); vLLM's logits processors (penalties, bad words, allowed ids, min tokens) and
    logprobs are not applied here: inside vLLM, use the plugin (:func:`register`), which keeps vLLM's own
    module and swaps in the core only."""

    def __init__(self, sampler=None):
        super().__init__()
        self.sampler = sampler

    def forward(self, metadata, draft_probs: Optional[torch.Tensor], logits: torch.Tensor, sampling_metadata):
        if metadata.max_spec_len > MAX_SPEC_LEN:
            fail("metadata", f"max_spec_len {metadata.max_spec_len} exceeds MAX_SPEC_LEN = {MAX_SPEC_LEN}")
        bonus_logits = logits[metadata.bonus_logits_indices]
        if self.sampler is not None:
            bonus = self.sampler(logits=bonus_logits, sampling_metadata=replace(sampling_metadata, max_num_logprobs=-1),
                                 predict_bonus_token=True).sampled_token_ids
        else:
            bonus = _sample_bonus(bonus_logits, sampling_metadata)
        target_logits = logits[metadata.target_logits_indices].to(torch.float32)
        target_logits = apply_sampling_constraints(target_logits, metadata.cu_num_draft_tokens, sampling_metadata,
                                                   metadata.num_draft_tokens)
        ids = rejection_sample(metadata.draft_token_ids, metadata.num_draft_tokens, metadata.max_spec_len,
                               metadata.cu_num_draft_tokens, draft_probs, target_logits, bonus, sampling_metadata)
        return _sampler_output(ids)

    @staticmethod
    def parse_output(output_token_ids: torch.Tensor, vocab_size: int, discard_req_indices: Sequence[int] = (),
                     return_cu_num_tokens: bool = False):
        """vLLM's ``parse_output``: per request the list of valid token ids (placeholders and ids >= vocab_size
        dropped; discarded requests empty), and the cumulative counts when asked."""
        ids = output_token_ids.cpu()
        valid = (ids != PLACEHOLDER_TOKEN_ID) & (ids < vocab_size)
        cu = None
        if return_cu_num_tokens:
            cu = [0] + valid.sum(1).cumsum(0).tolist()
        for r in discard_req_indices:
            valid[r] = False
        return [row[v].tolist() for row, v in zip(ids, valid)], cu


# ---- the vLLM plugin --------------------------------------------------------------------------------------

PLUGIN_ENV = "SPDKERNELS_VLLM_PLUGIN"


def _rebinding(orig):
    """Our ``rejection_sample`` called with the installed vLLM's argument names (its 6th parameter is named
    ``target_logits`` in current vLLM, ``target_probs`` in older releases)."""
    params = list(inspect.signature(orig).parameters)
    names_probs = len(params) > 5 and params[5] == "target_probs"

    def patched(*args, **kwargs):
        if kwargs.get("synthetic_mode"):
            return orig(*args, **kwargs)
        if names_probs:
            if len(args) > 5:
                args = list(args)
                kwargs["target_probs"] = args.pop(5)
                # what followed target_probs positionally keeps its name
                for name, value in zip(params[6:], args[5:]):
                    kwargs[name] = value
                args = args[:5]
        return rejection_sample(*args, **kwargs)

    patched.__wrapped__ = orig
    patched.__doc__ = rejection_sample.__doc__
    return patched


def register() -> bool:
    """vLLM general plugin: replace ``vllm.v1.sample.rejection_sampler.rejection_sample`` (the core that
    vLLM's ``RejectionSampler.forward`` calls) with the spdkernels one, keeping vLLM's module, logits
    processors, bonus sampler and logprobs. Idempotent; returns whether our core is installed. Does nothing
    when vLLM is absent or ``SPDKERNELS_VLLM_PLUGIN=0``."""
    if os.environ.get(PLUGIN_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        log.info("spdkernels vLLM plugin disabled by %s", PLUGIN_ENV)
        return False
    try:
        import vllm.v1.sample.rejection_sampler as mod
    except ImportError:
        log.info("spdkernels vLLM plugin: vLLM's V1 rejection sampler not found, nothing installed")
        return False
    if getattr(mod, "_spdkernels_original", None) is not None:
        return True
    orig = mod.rejection_sample
    mod._spdkernels_original = orig
    mod.rejection_sample = _rebinding(orig)
    log.info("spdkernels: vLLM's rejection_sample now runs on spdkernels (backends: %s)",
             ", ".join(spdkernels.available_backends()))
    return True
