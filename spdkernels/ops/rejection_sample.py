"""rejection_sample: lossless speculative sampling of draft chains and token trees, from logits.

``torch.ops.spdkernels.rejection_sample`` takes explicit ``uniforms`` or ``seed``/``offset`` tensors and runs
the kernel torch's dispatcher holds for the tensors' device (on CPU the C++ kernel of csrc/ops.cpp when the
extension is built); the Python wrapper below adds the policy (value validation, a forced backend) and also
accepts neither coins nor seeds, drawing seeds from torch's default generator (outside the op, so the op itself
stays a pure function of its inputs).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from spdkernels import _registry, reference
from spdkernels import _validate as V
from spdkernels._library import define_op
from spdkernels.ops._common import call_op, op_kernel
from spdkernels.ops._common import verify_outputs as _outputs

OP = "rejection_sample"
# How far from 1 a probability row's sum may be (validation on): rounding of fp32 / bf16 / fp16 softmax outputs
PROBS_SUM_TOLERANCE = 1e-2


def _check_static(target_logits, draft_token_ids, cu_num_draft, parents, draft_probs, temperature, top_k, top_p,
                  uniforms, seed, offset, max_depth, bonus_token_ids=None, target_is_probs=False) -> int:
    R, N, Vv = V.check_draft_batch_static(target_logits, draft_token_ids, cu_num_draft, parents, max_depth,
                                          bonus_rows=bonus_token_ids is not None)
    dev = target_logits.device
    if bonus_token_ids is not None:
        V.check_tensor("bonus_token_ids", bonus_token_ids, 1, V.TOKEN_DTYPES, dev, "target_logits")
        if bonus_token_ids.shape[0] != R:
            V.fail("bonus_token_ids", f"expected shape [R] = [{R}], got {tuple(bonus_token_ids.shape)}")
        if parents is not None:
            V.fail("bonus_token_ids", "only for chains (parents must be None): a tree needs the row after every leaf")
    if target_is_probs:
        for name, t in (("top_k", top_k), ("top_p", top_p)):
            if t is not None:
                V.fail(name, "not applied to probabilities (target_is_probs=True): filter the rows before "
                       "normalising them, or pass logits")
    if draft_probs is not None:
        V.check_tensor("draft_probs", draft_probs, 2, (torch.float32,), dev, "target_logits")
        if tuple(draft_probs.shape) != (N, Vv):
            V.fail("draft_probs", f"expected shape [N, V] = [{N}, {Vv}], got {tuple(draft_probs.shape)}")
    for name, t, dts in (("temperature", temperature, (torch.float32,)), ("top_k", top_k, (torch.int32,)),
                         ("top_p", top_p, (torch.float32,)), ("seed", seed, (torch.int64,)),
                         ("offset", offset, (torch.int64,))):
        if t is not None:
            V.check_tensor(name, t, 1, dts, dev, "target_logits")
            if t.shape[0] != R:
                V.fail(name, f"expected shape [R] = [{R}], got {tuple(t.shape)}")
    if uniforms is not None:
        V.check_tensor("uniforms", uniforms, 1, (torch.float32,), dev, "target_logits")
        if uniforms.shape[0] != N + R:
            V.fail("uniforms", f"expected shape [N + R] = [{N + R}], got {tuple(uniforms.shape)}")
        if seed is not None or offset is not None:
            V.fail("uniforms", "pass either uniforms or seed/offset, not both")
    elif seed is None:
        V.fail("seed", "the op needs explicit uniforms or a seed tensor (spdkernels.rejection_sample draws "
               "seeds from torch's default generator when given neither)")
    if offset is not None and seed is None:
        V.fail("offset", "offset given without seed")
    return R


def _check_values(target_logits, draft_token_ids, cu_num_draft, parents, draft_probs, temperature, top_k, top_p,
                  uniforms, seed, offset, max_depth, bonus_token_ids=None, target_is_probs=False) -> None:
    V.check_draft_batch_values(target_logits, draft_token_ids, cu_num_draft, parents, max_depth)
    if bonus_token_ids is not None and bonus_token_ids.numel():
        Vv = target_logits.shape[1]
        if bool(((bonus_token_ids < 0) | (bonus_token_ids >= Vv)).any()):
            V.fail("bonus_token_ids", f"token ids must lie in [0, V) = [0, {Vv}), got {bonus_token_ids.tolist()[:8]}")
    if target_is_probs:
        if target_logits.numel():
            if not bool(torch.isfinite(target_logits).all()):
                V.fail("target_logits", "contains NaN or inf (target_is_probs=True: probabilities)")
            if bool((target_logits < 0).any()):
                V.fail("target_logits", "contains negative probabilities (target_is_probs=True)")
            sums = target_logits.sum(dim=1, dtype=torch.float64)
            off = (sums - 1).abs() > PROBS_SUM_TOLERANCE
            if bool(off.any()):
                i = int(off.nonzero()[0, 0])
                V.fail("target_logits", f"row {i} sums to {float(sums[i]):.6g}: probability rows are used as given "
                       f"and must sum to 1 (within {PROBS_SUM_TOLERANCE}; target_is_probs=True)")
        if temperature is not None and temperature.numel() and bool(((temperature != 0) & (temperature != 1)).any()):
            V.fail("temperature", "with target_is_probs=True a request is greedy (0) or samples its row as given "
                   f"(1), got {temperature.tolist()[:8]}")
    elif target_logits.numel():
        if bool(torch.isnan(target_logits).any()):
            V.fail("target_logits", "contains NaN")
        if bool(torch.isposinf(target_logits).any()):
            V.fail("target_logits", "contains +inf")
        row_max = target_logits.amax(dim=1)
        if bool(torch.isneginf(row_max).any()):
            V.fail("target_logits", f"row {int(torch.isneginf(row_max).nonzero()[0, 0])} has no finite logit")
    if draft_probs is not None and draft_probs.numel():
        if not bool(torch.isfinite(draft_probs).all()):
            V.fail("draft_probs", "contains NaN or inf")
        if bool((draft_probs < 0).any()):
            V.fail("draft_probs", "contains negative probabilities")
    if temperature is not None and temperature.numel():
        if not bool(torch.isfinite(temperature).all()) or bool((temperature < 0).any()):
            V.fail("temperature", f"must be finite and >= 0 (0 = greedy), got {temperature.tolist()[:8]}")
    if top_k is not None and top_k.numel() and bool((top_k < 0).any()):
        V.fail("top_k", f"must be >= 0 (0 = off), got {top_k.tolist()[:8]}")
    if top_p is not None and top_p.numel():
        if bool(torch.isnan(top_p).any()) or bool(((top_p <= 0) | (top_p > 1)).any()):
            V.fail("top_p", f"must be in (0, 1] (1 = off), got {top_p.tolist()[:8]}")
    if uniforms is not None and uniforms.numel():
        if bool(torch.isnan(uniforms).any()) or bool(((uniforms <= 0) | (uniforms >= 1)).any()):
            V.fail("uniforms", "must lie in the open interval (0, 1)")


def _run(name, impl, target_logits, draft_token_ids, cu_num_draft, parents, draft_probs, temperature, top_k, top_p,
         uniforms, seed, offset, max_depth, bonus_token_ids=None, target_is_probs=False):
    if seed is not None and offset is None:
        offset = torch.zeros(seed.shape[0], dtype=torch.int64, device=seed.device)
    return impl(target_logits, draft_token_ids, cu_num_draft, parents, draft_probs, temperature, top_k, top_p,
                uniforms, seed, offset, max_depth, bonus_token_ids, target_is_probs)


def _fake(target_logits, draft_token_ids, cu_num_draft, parents, draft_probs, temperature, top_k, top_p,
          uniforms, seed, offset, max_depth, bonus_token_ids=None, target_is_probs=False):
    R = _check_static(target_logits, draft_token_ids, cu_num_draft, parents, draft_probs, temperature, top_k, top_p,
                      uniforms, seed, offset, max_depth, bonus_token_ids, target_is_probs)
    return _outputs(R, max_depth, target_logits.device)


define_op("rejection_sample(Tensor target_logits, Tensor draft_token_ids, Tensor cu_num_draft, Tensor? parents, "
          "Tensor? draft_probs, Tensor? temperature, Tensor? top_k, Tensor? top_p, Tensor? uniforms, "
          "Tensor? seed, Tensor? offset, SymInt max_depth, Tensor? bonus_token_ids=None, bool target_is_probs=False) "
          "-> (Tensor, Tensor, Tensor)", op_kernel(OP, _check_static, _run), _fake, integer_outputs=True)


# ---- backends --------------------------------------------------------------------------------------

@_registry.register(OP, "torch")
def _torch_impl(target_logits, draft_token_ids, cu_num_draft, parents, draft_probs, temperature, top_k, top_p,
                uniforms, seed, offset, max_depth, bonus_token_ids=None, target_is_probs=False):
    V.check_draft_batch_indices(target_logits, draft_token_ids, cu_num_draft, parents)  # always: it indexes
    if uniforms is None:
        uniforms = reference.coins_from_seed(cu_num_draft, seed, offset)
    return reference.rejection_sample(target_logits, draft_token_ids, cu_num_draft, parents, draft_probs,
                                      temperature, top_k, top_p, uniforms, max_depth, bonus_token_ids,
                                      target_is_probs)


@_registry.register(OP, "cpp")
def _cpp_impl(*args):
    """csrc/rejection_sample.cpp through its dispatcher registration (csrc/ops.cpp)."""
    return torch.ops.spdkernels.rejection_sample.default(*args)


@_registry.register(OP, "triton")
def _triton_impl(target_logits, draft_token_ids, cu_num_draft, parents, draft_probs, temperature, top_k, top_p,
                 uniforms, seed, offset, max_depth, bonus_token_ids=None, target_is_probs=False):
    from spdkernels.triton_kernels import rejection_sample as k
    from spdkernels.triton_kernels._common import int32_ids, launch_device

    with launch_device(target_logits):
        return k.rejection_sample(target_logits, int32_ids(draft_token_ids), cu_num_draft, parents, draft_probs,
                                  temperature, top_k, top_p, uniforms, seed, offset, max_depth, bonus_token_ids,
                                  target_is_probs)


@_registry.register(OP, "nki")
def _nki_impl(target_logits, draft_token_ids, cu_num_draft, parents, draft_probs, temperature, top_k, top_p,
              uniforms, seed, offset, max_depth, bonus_token_ids=None, target_is_probs=False):
    from spdkernels.nki_kernels import _launch

    return _launch.rejection_sample(target_logits, draft_token_ids, cu_num_draft, parents, draft_probs,
                                    temperature, top_k, top_p, uniforms, seed, offset, max_depth, bonus_token_ids,
                                    target_is_probs)


# ---- public wrapper --------------------------------------------------------------------------------

def rejection_sample(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    cu_num_draft: torch.Tensor,
    *,
    parents: Optional[torch.Tensor] = None,
    draft_probs: Optional[torch.Tensor] = None,
    temperature: Optional[torch.Tensor] = None,
    top_k: Optional[torch.Tensor] = None,
    top_p: Optional[torch.Tensor] = None,
    uniforms: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    max_depth: Optional[int] = None,
    bonus_token_ids: Optional[torch.Tensor] = None,
    target_is_probs: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling: emitted tokens are distributed exactly as if the target model had
    sampled them one at a time (Leviathan et al. 2023, Chen et al. 2023; SpecInfer's multi-step
    sampling for trees).

    At a node with target distribution ``p`` and children ``c_1..c_m`` (index order), child ``c`` with
    token ``t`` drawn from ``q`` is accepted if ``p(t) > 0`` and ``u_c * q(t) <= p(t)``; then its row
    becomes ``p``. On rejection ``p <- normalise(max(0, p - q))`` (unchanged if that has zero mass) and
    the next child is tried. With no child accepted, one token is drawn from ``p`` by inverse CDF over
    token ids with the request's final coin. Greedy requests (``temperature == 0``) give exactly
    :func:`spdkernels.verify_greedy`'s result; a batch may mix greedy and sampled requests.

    Target distribution of a row with logits ``x``: weights ``exp((x - max x) / T)`` (fp32) restricted
    to the kept set, normalised. top-k keeps every token whose logit is >= the k-th largest; top-p keeps
    every token whose logit is >= the largest logit value whose upper set holds at least ``top_p`` of
    the mass left by top-k. Ties at either boundary are kept.

    Args:
        target_logits, draft_token_ids, cu_num_draft, parents, max_depth: as in
            :func:`spdkernels.verify_greedy` (``max_depth=None`` costs a host sync).
        draft_probs: fp32 ``[N, V]``, row ``i`` the distribution node ``i`` was drawn from; ``None`` for
            deterministic drafters (point mass ``q = onehot(token)``).
        temperature: fp32 ``[R]``, >= 0; ``None`` means 1.0 for every request. 0 = greedy. A positive temperature
            below 2^-126 (the smallest normal fp32) acts as 2^-126, so ``log2(e) / T`` stays finite in every kernel.
        top_k: int32 ``[R]``, >= 0; 0 (or ``None``) = off.
        top_p: fp32 ``[R]`` in (0, 1]; 1 (or ``None``) = off.
        uniforms: fp32 ``[N + R]`` in (0, 1): entry ``i < N`` is node ``i``'s acceptance coin, entry
            ``N + r`` request ``r``'s final coin.
        seed, offset: int64 ``[R]``: coins from Philox4x32-10 keyed by the seed, counter
            (node index, stream, offset); a request's coins never depend on the rest of the batch, and
            no host sync is needed. ``offset`` defaults to zeros.
            With neither ``uniforms`` nor ``seed``, seeds are drawn from torch's default generator.
        bonus_token_ids: int32/int64 ``[R]``, chains only (``parents=None``): the tokens that follow each
            request's last draft, sampled by the caller (vLLM's layout). ``target_logits`` then has ``N`` rows,
            row ``cu_num_draft[r] + i`` verifying draft ``i`` of request ``r``, and no row after a request's last
            draft: a request that accepts all its drafts emits its bonus token there (one without drafts emits
            it at once). Coins and outputs as without it.
        target_is_probs: ``target_logits`` holds probabilities, as vLLM, FlashInfer and sgl-kernel hand them
            over: each row sums to 1 (checked to 1e-2 with validation on) and is used as given, ``p(t)`` being
            the row's entry, so an accepted row costs one read (a residual after a rejection is normalised by its
            own sum; the final token is drawn against the row's actual sum). No exponential, no temperature.
            A request with ``temperature`` 0 is greedy (the argmax of its rows);
            any other temperature must be 1 (checked with validation on). ``top_k`` / ``top_p`` must be None.

    Returns:
        ``(output_token_ids [R, max_depth + 1], num_emitted [R], accepted_path [R, max_depth])``,
        int32, ``-1`` padded, as in :func:`spdkernels.verify_greedy`.

    Raises:
        ValueError: naming the argument (shapes, dtypes, devices; with validation on also NaN/+inf
            logits, rows without a finite logit, NaN/inf/negative ``draft_probs``, ``top_p`` outside
            (0, 1], negative ``top_k`` or ``temperature``, ``uniforms`` outside (0, 1), and the ragged
            batch rules of verify_greedy).

    Example:
        >>> logits = torch.tensor([[0., 0., 9.], [5., 0., 0.]])  # R=1, one draft; T=1
        >>> out, num, _ = rejection_sample(logits, torch.tensor([2]), torch.tensor([0, 1], dtype=torch.int32),
        ...                                uniforms=torch.tensor([0.5, 0.5]))
        >>> out.tolist(), num.tolist()  # p(2) = 0.9997 >= 0.5: accepted; then the median token of row 1
        ([[2, 0]], [2])
    """
    if not isinstance(target_is_probs, bool):
        V.fail("target_is_probs", f"expected a bool, got {type(target_is_probs).__name__}")
    if max_depth is None or (uniforms is None and seed is None):  # these read the batch: check it first
        V.check_draft_batch_static(target_logits, draft_token_ids, cu_num_draft, parents,
                                   0 if max_depth is None else max_depth, bonus_rows=bonus_token_ids is not None)
        if max_depth is None:
            max_depth = V.tree_max_depth(cu_num_draft, parents)
        if uniforms is None and seed is None:
            R = cu_num_draft.shape[0] - 1
            seed = torch.randint(0, 2**62, (R,), dtype=torch.int64, device=target_logits.device)
    return call_op(OP, torch.ops.spdkernels.rejection_sample.default,
                   (target_logits, draft_token_ids, cu_num_draft, parents, draft_probs, temperature, top_k, top_p,
                    uniforms, seed, offset, max_depth, bonus_token_ids, target_is_probs),
                   _check_static, _check_values, _run)
