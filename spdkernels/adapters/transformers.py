"""Speculative generation for any Hugging Face causal LM, verified by the spdkernels ops::

    from spdkernels.adapters.transformers import speculative_generate
    out = model.generate(input_ids, max_new_tokens=64, custom_generate=speculative_generate)

``transformers`` calls ``speculative_generate(model, input_ids, logits_processor, stopping_criteria,
generation_config, **model_kwargs)`` after preparing the generation config, the logits processors (with the
temperature / top-k / top-p warpers when ``do_sample``) and the stopping criteria; the keyword arguments
this function adds (``draft_model``, ``proposer``, ``num_draft_tokens``) are passed through ``generate``.

Each step drafts up to ``k`` tokens (prompt lookup by default, or an HF draft model, or one of our proposers),
runs the target once over ``[last token, drafts]``, applies the logits processors to every row with its own
prefix, verifies with :func:`spdkernels.verify_greedy` (``do_sample=False``; the output equals
``model.generate(do_sample=False)``) or :func:`spdkernels.rejection_sample` (``do_sample=True``: the tokens are
distributed as the processed target's), and crops the cache to the committed tokens. On CPU with the ``cpp``
backend the greedy step is one C++ op (``torch.ops.spdkernels._cpu_hf_verify_greedy``: verify_greedy's kernel on
the chain, the drafts as host ints, the committed tokens returned), with the same result.

Limits, by design of this adapter: batch size 1 and chains only (no token trees); the returned sequences carry
no scores, logits, attentions or hidden states; EOS and ``max_length`` are honoured inside an accepted run,
other stopping criteria after each step (as ``transformers``' assisted generation does). ``transformers`` is
imported only when the function runs.
"""

from __future__ import annotations

import inspect
from typing import Callable, List, Optional, Sequence, Union

import torch

import spdkernels
from spdkernels import _config
from spdkernels._validate import is_int
from spdkernels.ops.verify_greedy import _check_static as _vg_check_static
from spdkernels.ops.verify_greedy import _check_values as _vg_check_values

from ._common import _CPU, cached_arange, fused_op

__all__ = ["speculative_generate"]

DEFAULT_NUM_DRAFT_TOKENS = 4


def _forward(model, ids: torch.Tensor, cache, keep: int):
    """One forward of ``ids [1, T]`` on top of ``cache``; returns (logits of the last ``keep`` positions
    ``[keep, V]`` fp32, the cache). Works with both spellings of the cache argument."""
    params = inspect.signature(model.forward).parameters
    kw = {"cache": cache} if "cache" in params else {"past_key_values": cache}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = keep
    out = model(input_ids=ids, use_cache=True, **kw)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits[0, -keep:].to(torch.float32), new_cache


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _crop(cache, n: int) -> None:
    """Drop the last ``n`` entries (negative crop works across transformers versions; 0 would not)."""
    if n > 0:
        cache.crop(-n)


class _DraftModel:
    """An HF causal LM as drafter, with its own cache kept in step with the committed tokens."""

    def __init__(self, model):
        self.model, self.cache, self.len = model, _new_cache(model), 0

    def draft(self, ids: torch.Tensor, k: int, processors, do_sample: bool):
        toks: List[int] = []
        qs: List[torch.Tensor] = []
        feed = ids[:, self.len:]
        for _ in range(k):
            logits, self.cache = _forward(self.model, feed.to(self.model.device), self.cache, 1)
            self.len += feed.shape[1]
            prefix = torch.cat([ids, torch.tensor([toks], dtype=ids.dtype, device=ids.device)], dim=1) if toks else ids
            scores = processors(prefix, logits.to(ids.device))[0]
            if do_sample:
                q = torch.softmax(scores, dim=-1)
                t = int(torch.multinomial(q, 1))
                qs.append(q)
            else:
                t = int(scores.argmax())
            toks.append(t)
            feed = torch.tensor([[t]], dtype=ids.dtype, device=ids.device)
        return toks, (torch.stack(qs) if do_sample and qs else None)

    def commit(self, committed_before: int, accepted: int, drafted: int) -> None:
        """After verification: keep the drafts that were accepted (only the first ``drafted - 1`` were fed)."""
        valid = committed_before + min(accepted, max(drafted - 1, 0))
        _crop(self.cache, self.len - valid)
        self.len = min(self.len, valid)


def _lookup_drafter(proposer, ngram: int):
    if proposer is None:
        from spdkernels.runtime.proposers import NGramProposer

        proposer = NGramProposer(k=64, max_ngram=ngram)
    if hasattr(proposer, "lookup"):
        def draft(ctx: List[int], k: int) -> List[int]:
            found = proposer.lookup(ctx, k)
            return list(found[0][:k]) if found else []
        return draft
    if callable(proposer):
        return lambda ctx, k: list(proposer(ctx, k))[:k]
    raise ValueError(f"proposer: expected an object with .lookup(tokens, k) (e.g. spdkernels' NGramProposer) or a "
                     f"callable (tokens, k) -> draft tokens, got {type(proposer).__name__}")


def _eos_ids(generation_config, device) -> Optional[torch.Tensor]:
    eos = getattr(generation_config, "_eos_token_tensor", None)
    if eos is None and getattr(generation_config, "eos_token_id", None) is not None:
        e = generation_config.eos_token_id
        eos = torch.tensor(e if isinstance(e, (list, tuple)) else [e], device=device)
    return None if eos is None else eos.reshape(-1).to(device)


def apply_processors(ids: torch.Tensor, drafts: torch.Tensor, rows: torch.Tensor, processors) -> None:
    """HF's logits processors on ``rows [k + 1, V]`` in place, row ``i`` with the prefix ``ids + drafts[:i]``, as HF's
    assisted generation applies them."""
    if len(processors):
        full = torch.cat([ids, drafts[None]], dim=1)
        L = ids.shape[1]
        for i in range(drafts.shape[0] + 1):
            rows[i:i + 1] = processors(full[:, :L + i], rows[i:i + 1])


def verify_step(ids: torch.Tensor, drafts: List[int], rows: torch.Tensor, processors, q: Optional[torch.Tensor],
                do_sample: bool):
    """One verification: ``rows [k + 1, V]`` fp32 target logits after ``ids`` and after each draft; the logits
    processors are applied to row ``i`` with the prefix ``ids + drafts[:i]`` (in place), then the op decides.
    Returns (accepted drafts ``a``, the committed tokens ``[a + 1]`` in ``ids``' dtype: the accepted drafts and one
    more token)."""
    k = len(drafts)
    device = rows.device
    dt = None
    if len(processors):
        dt = torch.tensor(drafts, dtype=ids.dtype, device=device)
        apply_processors(ids, dt, rows, processors)
    if not do_sample:
        new = _fused_greedy(rows, drafts)
        if new is not None:
            return new.shape[0] - 1, (new if new.dtype == ids.dtype else new.to(ids.dtype))
    if dt is None:
        dt = torch.tensor(drafts, dtype=ids.dtype, device=device)
    cu = cached_arange(2, device, k)  # [0, k], made once per (k, device): each small tensor op costs (docs/adapters.md)
    if do_sample:
        out, num, _ = spdkernels.rejection_sample(rows, dt, cu, draft_probs=q, max_depth=k)
    else:
        out, num, _ = spdkernels.verify_greedy(rows, dt, cu, max_depth=k)
    a = num.item() - 1
    return a, out[0, :a + 1].to(ids.dtype)


# the generic path everywhere when False (tests and the benchmark's baseline switch it)
_FUSED = True


def _fused_greedy(rows: torch.Tensor, drafts: List[int]) -> Optional[torch.Tensor]:
    """The committed tokens (int64 ``[a + 1]``) from one C++ op (``_cpu_hf_verify_greedy``: verify_greedy's kernel on
    the chain, the drafts as host ints) when it serves this call: CPU rows and the ``cpp`` backend chosen for
    ``verify_greedy``. None otherwise, and for arguments the op's schema refuses (the generic path then names them).
    With validation on, the op's value checks run first, as on the generic path."""
    if not (_FUSED and rows.is_cpu):
        return None
    op = fused_op("verify_greedy", "_cpu_hf_verify_greedy")
    if op is None:
        return None
    try:
        if _config.validation_enabled():
            k = len(drafts)
            args = (rows, torch.tensor(drafts, dtype=torch.int64), cached_arange(2, _CPU, k), None, k)
            _vg_check_static(*args)
            _vg_check_values(*args)
        return op(rows, drafts)
    except (TypeError, RuntimeError):
        return None


def speculative_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    draft_model=None,
    proposer: Optional[Union[object, Callable[[Sequence[int], int], Sequence[int]]]] = None,
    num_draft_tokens: Optional[int] = None,
    **model_kwargs,
):
    """Speculative decoding for ``model.generate(..., custom_generate=speculative_generate)``.

    Args:
        model: an HF causal LM whose cache can be cropped (``DynamicCache``).
        input_ids: int64 ``[1, L]`` (batch 1; an all-ones attention mask or none).
        logits_processor, stopping_criteria, generation_config: as ``generate`` prepared them.
        draft_model: an HF causal LM with the target's vocabulary, drafting greedily (``do_sample=False``) or by
            sampling its processed distribution (then verified with its probabilities).
        proposer: instead, an object with ``lookup(tokens, k)`` (spdkernels' ``NGramProposer``) or a callable
            ``(tokens, k) -> list of draft tokens``. Default: prompt lookup with
            ``generation_config.max_matching_ngram_size`` (2 if unset).
        num_draft_tokens: drafts per step (default ``generation_config.prompt_lookup_num_tokens`` or 4).

    Returns:
        int64 ``[1, L + new]`` sequences, or a ``GenerateDecoderOnlyOutput`` with only ``sequences`` when
        ``return_dict_in_generate`` (no scores / logits are recorded).

    Raises:
        ValueError: for a batch larger than 1, a padded attention mask, ``num_beams > 1``, a draft model whose
            vocabulary differs, or a ``proposer`` of another kind.
    """
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    generation_config = generation_config if generation_config is not None else GenerationConfig()
    processors = logits_processor if logits_processor is not None else LogitsProcessorList()
    stopping = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: speculative_generate runs batch 1, got shape {list(input_ids.shape)}")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise ValueError("attention_mask: padded inputs are not supported (batch 1, no padding)")
    if getattr(generation_config, "num_beams", 1) not in (None, 1):
        raise ValueError("num_beams: speculative_generate does not do beam search")
    do_sample = bool(getattr(generation_config, "do_sample", False))
    if num_draft_tokens is not None and (not is_int(num_draft_tokens) or num_draft_tokens < 1):
        raise ValueError(f"num_draft_tokens: expected an integer >= 1 (None: the generation config's "
                         f"prompt_lookup_num_tokens or {DEFAULT_NUM_DRAFT_TOKENS}), got {num_draft_tokens!r}")
    k_cfg = num_draft_tokens or getattr(generation_config, "prompt_lookup_num_tokens", None) or DEFAULT_NUM_DRAFT_TOKENS
    max_length = generation_config.max_length
    device = input_ids.device
    eos = _eos_ids(generation_config, device)

    drafter = _DraftModel(draft_model) if draft_model is not None else None
    lookup = None if drafter else _lookup_drafter(
        proposer, getattr(generation_config, "max_matching_ngram_size", None) or 2)

    ids = input_ids
    cache = _new_cache(model)
    if ids.shape[1] > 1:  # the cache holds every committed token but the last
        _, cache = _forward(model, ids[:, :-1].to(model.device), cache, 1)
    while ids.shape[1] < max_length:
        room = max_length - ids.shape[1]
        k = max(0, min(k_cfg, room - 1))
        q = None
        if k == 0:
            drafts: List[int] = []
        elif drafter is not None:
            drafts, q = drafter.draft(ids, k, processors, do_sample)
        else:
            drafts = lookup(ids[0].tolist(), k)
        k = len(drafts)
        feed = torch.tensor([[int(ids[0, -1])] + drafts], dtype=ids.dtype, device=model.device)
        rows, cache = _forward(model, feed, cache, k + 1)
        if q is not None and q.shape[-1] != rows.shape[-1]:
            raise ValueError(f"draft_model: vocabulary of {q.shape[-1]} tokens, the target has {rows.shape[-1]}")
        a, new = verify_step(ids, drafts, rows.to(device), processors, q, do_sample)
        if eos is not None:  # stop at the first end-of-sequence token of the run
            hit = torch.isin(new, eos).nonzero()
            if hit.numel():
                new = new[: int(hit[0, 0]) + 1]
        _crop(cache, k - a)
        if drafter is not None:
            drafter.commit(ids.shape[1], a, k)
        ids = torch.cat([ids, new[None, :]], dim=1)
        if streamer is not None:
            streamer.put(new.cpu())
        if eos is not None and bool(torch.isin(new[-1:], eos).any()):
            break
        if bool(stopping(ids, None).any()):
            break
    if streamer is not None:
        streamer.end()
    if getattr(generation_config, "return_dict_in_generate", False):
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=ids)
    return ids
