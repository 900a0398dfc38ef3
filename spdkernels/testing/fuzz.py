"""Malformed inputs for the ops with validation off: the memory-safety fuzzer.

With ``spdkernels.set_validation(False)`` the ops skip the value checks that cost a pass over the inputs
(and a host sync on a GPU), but bad values must still never corrupt memory: an out-of-range draft token,
a non-monotone ``cu``, a parent out of range, a block table entry past the cache or a ``kv_len`` past the
block table must give a clear error or a defined result, never a crash.

:func:`cases` builds seeded malformed inputs per op; :func:`run_case` runs one under a forced backend;
``python -m spdkernels.testing.fuzz --backend cpp --op rejection_sample --seed 0 --count 50`` runs a batch
in this process and prints one line per case (``ok`` / ``error: <type>: <message>``), so that a parent
process that sees it die by a signal knows which case did it (the tests run it that way)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, Iterator, Tuple

import torch

OPS = ("verify_greedy", "rejection_sample", "tree_attention")
# the adapters' entry points, fuzzed through their fused C++ ops (backend cpp) and their generic paths (torch)
ADAPTER_OPS = ("sglang.verify_tree_greedy", "sglang.tree_speculative_sampling_target_only",
               "flashinfer.chain_speculative_sampling", "vllm.rejection_sample")

Case = Tuple[str, Callable[[], Dict]]


def _draft_batch(g: torch.Generator, R: int, k: int, V: int, tree: bool):
    cu = torch.arange(R + 1, dtype=torch.int32) * k
    N = R * k
    draft = torch.randint(0, V, (N,), generator=g, dtype=torch.int64)
    parents = None
    if tree:
        parents = torch.cat([torch.tensor([-1] + [int(torch.randint(-1, j, (1,), generator=g)) for j in range(1, k)],
                                          dtype=torch.int32) for _ in range(R)])
    logits = torch.randn(N + R, V, generator=g)
    return logits, draft, cu, parents


def _malform_draft(g: torch.Generator, name: str, logits, draft, cu, parents):
    """One named corruption of a well-formed draft batch."""
    R = cu.shape[0] - 1
    N, V = draft.shape[0], logits.shape[1]
    draft, cu = draft.clone(), cu.clone()
    parents = None if parents is None else parents.clone()
    i = int(torch.randint(0, max(N, 1), (1,), generator=g))
    if name == "token_ge_V":
        draft[i] = V + int(torch.randint(0, 1 << 20, (1,), generator=g))
    elif name == "token_negative":
        draft[i] = -1 - int(torch.randint(0, 1 << 20, (1,), generator=g))
    elif name == "token_huge":
        draft[i] = (1 << 62) + i
    elif name == "cu_not_monotone":
        r = int(torch.randint(1, R, (1,), generator=g)) if R > 1 else 0
        cu[r] = cu[r + 1] + 3 if R > 1 else -5
    elif name == "cu_last_too_big":
        cu[-1] = N + 1 + int(torch.randint(0, 1000, (1,), generator=g))
    elif name == "cu_first_negative":
        cu[0] = -7
    elif name == "cu_huge":
        cu[1:] = (1 << 30)
    elif name == "parent_out_of_range":
        parents = torch.full((N,), -1, dtype=torch.int32) if parents is None else parents
        parents[i] = 1 << 20
    elif name == "parent_below_minus_one":
        parents = torch.full((N,), -1, dtype=torch.int32) if parents is None else parents
        parents[i] = -(1 << 20)
    elif name == "parent_self_or_later":
        parents = torch.full((N,), -1, dtype=torch.int32) if parents is None else parents
        local = i - int(cu[max(0, int(torch.searchsorted(cu[1:], torch.tensor(i, dtype=torch.int32), right=True)))])
        parents[i] = local
    return logits, draft, cu, parents


DRAFT_CORRUPTIONS = ("token_ge_V", "token_negative", "token_huge", "cu_not_monotone", "cu_last_too_big",
                     "cu_first_negative", "cu_huge", "parent_out_of_range", "parent_below_minus_one",
                     "parent_self_or_later")
ATTN_CORRUPTIONS = ("block_id_ge_num_blocks", "block_id_negative", "kv_len_past_table", "kv_len_negative",
                    "cu_q_not_monotone", "cu_q_last_too_big", "kv_len_below_q_len", "mask_too_narrow")


def cases(op: str, seed: int = 0, count: int = 20) -> Iterator[Case]:
    """``count`` malformed inputs for ``op``, cycling through its corruptions; each is ``(name, make)``
    with ``make()`` returning the keyword arguments of the op's Python wrapper."""
    g = torch.Generator().manual_seed(seed)
    names = ATTN_CORRUPTIONS if op == "tree_attention" else DRAFT_CORRUPTIONS
    for j in range(count):
        name = names[j % len(names)]
        if op == "tree_attention":
            yield name, _attn_case(g, name)
            continue
        R, k, V = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g)), 50
        tree = bool(torch.randint(0, 2, (1,), generator=g))
        logits, draft, cu, parents = _malform_draft(g, name, *_draft_batch(g, R, k, V, tree))
        kw = dict(target_logits=logits, draft_token_ids=draft, cu_num_draft=cu, parents=parents, max_depth=k)
        if op == "rejection_sample":
            kw.update(temperature=torch.full((R,), 0.9), uniforms=torch.rand(draft.shape[0] + R, generator=g)
                      .clamp(1e-6, 1 - 1e-6))
            if j % 2:
                q = torch.rand(draft.shape[0], V, generator=g)
                kw["draft_probs"] = q / q.sum(-1, keepdim=True)
            if parents is None and j % 3 == 2:
                # vLLM's layout with bad probability rows too: one row per draft (no row after a request's last
                # draft), NaN and negative entries, bonus tokens outside the vocabulary
                N = draft.shape[0]
                probs = torch.softmax(logits[:N], -1)
                if N:
                    probs[0, 0], probs[-1, -1] = float("nan"), -0.5
                kw.update(target_logits=probs, target_is_probs=True,
                          bonus_token_ids=torch.randint(-5, V + 5, (cu.shape[0] - 1,), generator=g))
        yield name, (lambda kw=kw: kw)


def _attn_case(g: torch.Generator, name: str) -> Callable[[], Dict]:
    """Two requests (3 and 2 query rows, 20 and 9 cached positions, pages of 16 in a 6-block cache), with
    one corruption."""
    Hq, Hkv, D, bs, nb = 4, 2, 16, 16, 6
    kv_lens = torch.tensor([20, 9], dtype=torch.int32)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    T = 5
    bt = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    mask = torch.tensor([[1], [3], [7], [1], [3]], dtype=torch.int32)
    if name == "block_id_ge_num_blocks":
        bt[0, 1] = nb + 1000
    elif name == "block_id_negative":
        bt[1, 0] = -3
    elif name == "kv_len_past_table":
        kv_lens[0] = 2 * bs + 100
    elif name == "kv_len_negative":
        kv_lens[1] = -4
    elif name == "cu_q_not_monotone":
        cu = torch.tensor([0, 4, 3], dtype=torch.int32)
    elif name == "cu_q_last_too_big":
        cu = torch.tensor([0, 3, 40], dtype=torch.int32)
    elif name == "kv_len_below_q_len":
        kv_lens[1] = 1
    elif name == "mask_too_narrow":  # 40 query rows of one request, a one-word (32-bit) mask
        T, cu = 40, torch.tensor([0, 0, 40], dtype=torch.int32)
        kv_lens = torch.tensor([1, 40], dtype=torch.int32)
        bt = torch.tensor([[0, 1, 3], [2, 4, 5]], dtype=torch.int32)
        mask = torch.full((T, 1), -1, dtype=torch.int32)
    q = torch.randn(T, Hq, D, generator=g)
    k = torch.randn(nb, bs, Hkv, D, generator=g)
    v = torch.randn(nb, bs, Hkv, D, generator=g)
    return lambda: dict(q=q, k_cache=k, v_cache=v, block_table=bt, kv_lens=kv_lens, cu_q_lens=cu, tree_mask=mask)


_BIG = (1 << 62, -(1 << 62), -2, -1, 0, 1, 3, 7, 1 << 31)


def _poke(g: torch.Generator, t: torch.Tensor) -> torch.Tensor:
    """``t`` (an integer tensor) with one entry set to a value from the edges of its range or a random one."""
    t = t.clone()
    if t.numel():
        i = int(torch.randint(0, t.numel(), (1,), generator=g))
        j = int(torch.randint(0, len(_BIG) + 1, (1,), generator=g))
        v = _BIG[j] if j < len(_BIG) else int(torch.randint(-20, 20, (1,), generator=g))
        info = torch.iinfo(t.dtype)
        t.view(-1)[i] = max(info.min, min(info.max, v))
    return t


def adapter_cases(op: str, seed: int = 0, count: int = 20) -> Iterator[Case]:
    """``count`` malformed calls of an adapter entry point (a random integer argument with one entry poked to an
    edge value: tree links, flat indices, draft tokens, counts), each ``(name, make)``."""
    from spdkernels import tree as tr

    g = torch.Generator().manual_seed(seed)
    for j in range(count):
        if op.startswith("sglang."):
            bs, n, V = 1 + j % 3, 1 + j % 7, 20
            par = [int(torch.randint(-1, i, (1,), generator=g)) for i in range(n - 1)]
            nt, ns = (torch.tensor([x] * bs, dtype=torch.int64) for x in tr.to_sglang(par))
            kw = dict(predicts=torch.zeros(bs * n, dtype=torch.int32),
                      accept_index=torch.zeros(bs, n, dtype=torch.int32),
                      accept_token_num=torch.zeros(bs, dtype=torch.int32),
                      candidates=torch.randint(0, V, (bs, n), generator=g),
                      retrive_index=torch.arange(bs * n).reshape(bs, n), retrive_next_token=nt,
                      retrive_next_sibling=ns)
            if op.endswith("greedy"):
                kw["target_predict"] = torch.randint(0, V, (bs, n), generator=g)
            else:
                kw.update(uniform_samples=torch.rand(bs, n, generator=g),
                          uniform_samples_for_final_sampling=torch.rand(bs, generator=g),
                          target_probs=torch.softmax(torch.randn(bs, n, V, generator=g), -1),
                          draft_probs=torch.zeros(bs, n, V))
            names = ("candidates", "retrive_index", "retrive_next_token", "retrive_next_sibling")
        elif op.startswith("flashinfer."):
            B, n, V = 1 + j % 4, j % 4, 20
            kw = dict(draft_probs=torch.softmax(torch.randn(B, n, V, generator=g), -1),
                      draft_token_ids=torch.randint(0, V, (B, n), generator=g),
                      target_probs=torch.softmax(torch.randn(B, n + 1, V, generator=g), -1), seed=j)
            names = ("draft_token_ids",)
        else:
            ks = [int(x) for x in torch.randint(0, 4, (1 + j % 4,), generator=g)]
            N, V = sum(ks), 20
            from spdkernels.adapters.vllm import SamplingMetadata

            kw = dict(draft_token_ids=torch.randint(0, V, (N,), generator=g, dtype=torch.int32),
                      num_draft_tokens=ks, max_spec_len=max(ks, default=0),
                      cu_num_draft_tokens=torch.tensor(ks, dtype=torch.int32).cumsum(0).to(torch.int32),
                      draft_probs=torch.softmax(torch.randn(N, V, generator=g), -1) if j % 2 else None,
                      target_logits=torch.randn(N, V, generator=g),
                      bonus_token_ids=torch.randint(0, V, (len(ks), 1), generator=g, dtype=torch.int32),
                      sampling_metadata=SamplingMetadata(temperature=(torch.arange(len(ks)) % 2).float(),
                                                         all_greedy=False, all_random=False))
            names = ("draft_token_ids", "cu_num_draft_tokens")
        name = names[j % len(names)]
        kw[name] = _poke(g, kw[name])
        yield name, (lambda kw=kw: kw)


def run_adapter_case(op: str, backend: str, kw: Dict) -> str:
    """One adapter call with validation off under ``backend`` (``cpp``: the fused C++ op where the adapter has one):
    ``"ok"`` or ``"error: <type>: <message>"``; the outputs (in place or returned) are read."""
    import importlib

    import spdkernels

    mod, fn = op.split(".")
    f = getattr(importlib.import_module(f"spdkernels.adapters.{mod}"), fn)
    with spdkernels.validation(False), spdkernels.use_backend(backend):
        try:
            out = f(**kw)
        except (ValueError, RuntimeError, IndexError) as e:
            return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    outs = out if isinstance(out, tuple) else (out,) if out is not None else tuple(
        v for k, v in kw.items() if k in ("predicts", "accept_index", "accept_token_num"))
    for t in outs:
        t.float().sum().item() if t.is_floating_point() else int(t.sum())
    return "ok"


def run_case(op: str, backend: str, kw: Dict) -> str:
    """Run one case with validation off under ``backend``: ``"ok"`` or ``"error: <type>: <message>"``."""
    import spdkernels

    fn = getattr(spdkernels, op)
    with spdkernels.validation(False), spdkernels.use_backend(backend):
        try:
            out = fn(**kw)
        except (ValueError, RuntimeError, IndexError) as e:
            return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    outs = out if isinstance(out, tuple) else (out,)
    for t in outs:  # touch every output element: a result must be readable
        t.float().sum().item() if t.is_floating_point() else int(t.sum())
    return "ok"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spdkernels.testing.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--op", choices=OPS + ADAPTER_OPS, required=True)
    ap.add_argument("--backend", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=20)
    args = ap.parse_args(argv)
    adapter = args.op in ADAPTER_OPS
    for j, (name, make) in enumerate((adapter_cases if adapter else cases)(args.op, args.seed, args.count)):
        print(f"case {j} {name}: ", end="", flush=True)
        print((run_adapter_case if adapter else run_case)(args.op, args.backend, make()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
