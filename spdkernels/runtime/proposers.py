"""Proposers: who drafts the tokens the target model verifies.

A proposer gets the active requests of a step and returns, per request, a :class:`Draft`: a token tree in
the ops' layout (tokens in topological order, ``parents`` local indices with -1 = the root, i.e. the last
committed token). A chain is the tree with ``parents = [-1, 0, 1, ...]``. Drafts are deterministic (n-gram
lookups, greedy or top-k expansion), so verification treats them as point-mass proposals
(``draft_probs=None``), which keeps sampling lossless.

To plug in a new proposer, subclass :class:`Proposer` and implement :meth:`Proposer.propose` (and
:meth:`Proposer.release` if it keeps per-request state)."""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch

from .model import LlamaModel, build_batch

if TYPE_CHECKING:  # pragma: no cover
    from .engine import RequestState
    from .kv_cache import PagedKVCache


@dataclass
class Draft:
    """``tokens`` in topological order, ``parents`` (-1 = the root). ``probs``: ``[len, V]`` fp32, row ``i``
    the distribution node ``i`` was drawn from (None: deterministic drafts, verified as point masses)."""
    tokens: List[int] = field(default_factory=list)
    parents: List[int] = field(default_factory=list)
    probs: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> List[int]:
        """Each node's depth (the root's children: 1)."""
        d: List[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def depth(self) -> int:
        return max(self.depths(), default=0)

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))


class Proposer:
    """Base class. ``max_nodes``: the most draft tokens per request and step; ``max_depth``: the longest
    path. The engine passes each request's own limits (room left before ``max_new_tokens`` or the context
    end) to :meth:`propose`."""
    name = "proposer"

    def __init__(self, max_nodes: int, max_depth: int):
        if not 1 <= max_depth <= max_nodes:
            raise ValueError(f"max_depth: expected 1 <= max_depth <= max_nodes ({max_nodes}), got {max_depth}")
        if max_nodes > 64:
            raise ValueError(f"max_nodes: expected at most 64 draft tokens per step, got {max_nodes}")
        self.max_nodes, self.max_depth = max_nodes, max_depth

    def bind(self, target: LlamaModel, cache: PagedKVCache) -> None:
        """Called once by the engine with the target model and its KV cache."""

    def propose(self, states: Sequence[RequestState], depth_limits: Sequence[int]) -> List[Draft]:
        raise NotImplementedError

    def release(self, state: RequestState) -> None:
        """The request finished: drop what the proposer keeps for it."""

    def feedback(self, state: RequestState, drafted: int, accepted: int) -> None:
        """After each verification: how many of the request's draft tokens were proposed and accepted."""

    # hidden-state indices (0 = the embedding, b = after b layers) the proposer wants for every committed
    # token; the engine captures them in its prefill and verification passes and calls observe()
    taps: Tuple[int, ...] = ()

    def observe(self, state: RequestState, positions: List[int], hidden: torch.Tensor) -> None:
        """The committed tokens at ``positions`` and their hidden states ``[len, len(taps), hidden]``."""

    def describe(self) -> str:
        return self.name


def _trie(continuations: Sequence[Sequence[int]], budget: int) -> Draft:
    """Merge token sequences into one tree sharing common prefixes, at most ``budget`` nodes, in
    insertion (hence topological) order."""
    d = Draft()
    children: Dict[Tuple[int, int], int] = {}
    for seq in continuations:
        node = -1
        for t in seq:
            nxt = children.get((node, t))
            if nxt is None:
                if len(d) >= budget:
                    break
                nxt = len(d)
                children[(node, t)] = nxt
                d.tokens.append(int(t))
                d.parents.append(node)
            node = nxt
    return d


def keep_best_children(drafts: List[Draft], scores: List[List[float]], frontier: List[List[int]],
                       owners: Sequence[Tuple[int, int]], values, ids, width: int, max_nodes: int
                       ) -> List[Tuple[int, int]]:
    """One EAGLE-2 level: row ``i`` of ``values``/``ids`` (top-k log-probabilities and token ids) holds the
    children of node ``owners[i] = (request, node)`` (node -1 = the root); each request keeps its ``width``
    best children by cumulative log-probability within ``max_nodes``, appended to its draft, and they become
    its frontier. Returns ``(request, token)`` of every node added, in order."""
    cand: Dict[int, List[Tuple[float, int, int]]] = {}
    for (r, f), vals, toks in zip(owners, values, ids):
        base = 0.0 if f < 0 else scores[r][f]
        cand.setdefault(r, []).extend((base + v, f, t) for v, t in zip(vals, toks))
    added = []
    for r, cs in cand.items():
        d = drafts[r]
        frontier[r] = []
        for s, f, t in heapq.nlargest(min(width, max_nodes - len(d)), cs, key=lambda x: x[0]):
            d.tokens.append(t)
            d.parents.append(f)
            scores[r].append(s)
            frontier[r].append(len(d) - 1)
            added.append((r, t))
    return added


class NGramProposer(Proposer):
    """Prompt lookup: find the most recent earlier occurrence of the last n tokens (n from ``max_ngram``
    down to ``min_ngram``) in the prompt and the text generated so far, and propose the tokens that followed
    it. With ``branches > 1`` the continuations of up to that many distinct earlier occurrences are merged
    into a token tree (shared prefixes become one path)."""
    name = "ngram"

    def __init__(self, k: int = 8, max_ngram: int = 3, min_ngram: int = 1, branches: int = 1,
                 max_nodes: Optional[int] = None, adaptive: bool = False):
        if k < 1:
            raise ValueError(f"k: expected at least 1 draft token, got {k}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"min_ngram/max_ngram: expected 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if branches < 1:
            raise ValueError(f"branches: expected at least 1, got {branches}")
        super().__init__(max_nodes or k * branches, k)
        self.k, self.max_ngram, self.min_ngram, self.branches = k, max_ngram, min_ngram, branches
        # adaptive: each request's draft depth starts at k // 2, grows by 2 after a fully accepted draft and
        # shrinks by 1 after a rejection (within 1..k), so requests whose lookups keep failing pay for short
        # verification passes only
        self.adaptive = adaptive
        self._depth: Dict[object, int] = {}
        self._deepest: Dict[object, int] = {}  # the depth of each request's last draft

    def describe(self) -> str:
        s = f"ngram k={'<=' if self.adaptive else ''}{self.k} n={self.min_ngram}..{self.max_ngram}"
        return s + (f" tree x{self.branches}" if self.branches > 1 else "")

    def feedback(self, state, drafted, accepted):
        if self.adaptive and drafted:
            d = self._depth.get(state.rid, max(1, self.k // 2))
            # fully accepted: as deep as the draft went (a tree's node count is not its depth: one path is taken)
            full = accepted >= self._deepest.get(state.rid, drafted)
            self._depth[state.rid] = min(self.k, d + 2) if full else max(1, d - 1)

    def release(self, state):
        self._depth.pop(state.rid, None)
        self._deepest.pop(state.rid, None)

    def lookup(self, ctx: Sequence[int], k: int) -> List[List[int]]:
        L = len(ctx)
        found: List[List[int]] = []
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            pat = list(ctx[L - n:])
            first = pat[0]
            for j in range(L - n - 1, -1, -1):  # most recent first; the match must end before the pattern
                if ctx[j] == first and list(ctx[j:j + n]) == pat:
                    cont = list(ctx[j + n:j + n + k])
                    if cont and cont not in found:
                        found.append(cont)
                        if len(found) >= self.branches:
                            return found
            if found:
                return found
        return found

    def propose(self, states, depth_limits):
        out = []
        for st, lim in zip(states, depth_limits):
            k = min(self._depth.get(st.rid, max(1, self.k // 2)) if self.adaptive else self.k, lim)
            d = _trie(self.lookup(st.tokens, k), self.max_nodes) if k > 0 else Draft()
            if self.adaptive:
                self._deepest[st.rid] = d.depth()
            out.append(d)
        return out


class ModelProposer(Proposer):
    """Drafts with a (small) causal LM, greedily (a chain) or by top-k expansion per level kept to a token
    budget by cumulative log-probability (a tree, as EAGLE-2 shapes it). Each level re-runs the request's
    pending tokens and the whole draft tree so far in one forward pass with a tree mask, so no draft K/V
    needs to be kept or rolled back between levels.

    Subclasses say which model and cache drafting uses and how many committed tokens that cache holds."""

    def __init__(self, k: int, branching: int = 1, width: int = 1, max_nodes: Optional[int] = None,
                 draft_vocab: int = 0):
        if k < 1:
            raise ValueError(f"k: expected at least 1 draft token, got {k}")
        if branching < 1 or width < 1:
            raise ValueError(f"branching/width: expected >= 1, got {branching}, {width}")
        if draft_vocab < 0:
            raise ValueError(f"draft_vocab: expected >= 0 (0 = the full vocabulary), got {draft_vocab}")
        super().__init__(max_nodes or k * width, k)
        self.k, self.branching, self.width, self.draft_vocab = k, branching, width, draft_vocab

    # subclasses
    def draft_model(self) -> LlamaModel:
        raise NotImplementedError

    def draft_cache(self) -> PagedKVCache:
        raise NotImplementedError

    def draft_layers(self) -> int:
        return self.draft_model().num_layers

    def committed(self, st: RequestState) -> int:
        """Tokens of ``st`` whose K/V the draft cache holds (a prefix of ``st.tokens``)."""
        raise NotImplementedError

    def after_draft(self, st: RequestState, kept: int) -> None:
        """``kept``: tokens of ``st`` the draft cache now holds (its pending tokens were written)."""

    def _logits(self, m: LlamaModel, h: torch.Tensor) -> torch.Tensor:
        if self.draft_vocab and self.draft_vocab < m.config.vocab_size:
            from .linear import linear

            return linear(m._rms(h, m.norm), m.lm_head[:self.draft_vocab])
        return m.logits(h)

    @torch.inference_mode()
    def propose(self, states, depth_limits):
        m, cache = self.draft_model(), self.draft_cache()
        R = len(states)
        drafts = [Draft() for _ in states]
        scores: List[List[float]] = [[] for _ in states]
        frontier: List[List[int]] = [[-1] for _ in states]  # nodes to expand (-1: the root)
        pend = []
        for st in states:
            c = self.committed(st)
            pend.append(st.tokens[c:])  # pending committed tokens; the last one is the root
        depth = max(depth_limits, default=0)
        forwarded = set()
        for level in range(min(depth, self.k)):
            active = [r for r in range(R) if frontier[r] and level < depth_limits[r]]
            if not active:
                break
            forwarded.update(active)
            toks, starts, positions, par_all, rows, row_owner = [], [], [], [], [], []
            q0 = 0
            for r in active:
                st, d = states[r], drafts[r]
                c = self.committed(st)
                n_p = len(pend[r])
                q = pend[r] + d.tokens
                positions.append(list(range(c, c + n_p)) + [c + n_p - 1 + x for x in d.depths()])
                starts.append(c)
                toks += q
                # tree over the local queries [pending..., nodes...]: pending form a chain, node parents
                # shift by n_p (the root is pending[-1])
                par_all.append([j - 2 for j in range(1, n_p)]
                               + [n_p - 2 if p < 0 else n_p - 1 + p for p in d.parents])
                for f in frontier[r]:
                    rows.append(q0 + (n_p - 1 if f < 0 else n_p + f))
                    row_owner.append((r, f))
                q0 += len(q)
            batch = build_batch(cache, [states[r].rid for r in active], starts, positions, toks, par_all,
                                device=m.device)
            h, _ = m.forward_layers(m.embed_tokens(batch.token_ids), batch, cache, 0, self.draft_layers())
            logp = torch.log_softmax(self._logits(m, h[torch.tensor(rows, device=h.device)]).float(), dim=-1)
            top = logp.topk(self.branching, dim=-1)
            keep_best_children(drafts, scores, frontier, row_owner, top.values.tolist(), top.indices.tolist(),
                               self.width, self.max_nodes)
        for r in sorted(forwarded):  # their pending tokens are now in the draft cache
            self.after_draft(states[r], self.committed(states[r]) + len(pend[r]))
        return drafts


class EarlyExitProposer(ModelProposer):
    """Self-speculation: the target's first ``layers`` layers, its final norm and LM head (optionally over
    the first ``draft_vocab`` token ids only: byte-pair vocabularies put frequent tokens first). It shares
    the target's KV cache: those layers' K/V of the committed tokens are exactly what the target wrote, and
    the draft's scratch entries past the committed length are overwritten by the verification pass."""
    name = "early-exit"

    def __init__(self, layers: int, k: int = 4, branching: int = 1, width: int = 1,
                 max_nodes: Optional[int] = None, draft_vocab: int = 0):
        if layers < 1:
            raise ValueError(f"layers: expected at least 1 layer, got {layers}")
        super().__init__(k, branching, width, max_nodes, draft_vocab)
        self.layers = layers

    def describe(self) -> str:
        s = f"early-exit L={self.layers} k={self.k}"
        if self.width > 1 or self.branching > 1:
            s += f" tree {self.branching}x{self.width}"
        return s + (f" vocab={self.draft_vocab}" if self.draft_vocab else "")

    def bind(self, target, cache):
        if self.layers >= target.num_layers:
            raise ValueError(f"layers: expected fewer than the target's {target.num_layers} layers, got {self.layers}")
        self._m, self._cache = target, cache

    def draft_model(self):
        return self._m

    def draft_cache(self):
        return self._cache

    def draft_layers(self):
        return self.layers

    def committed(self, st):
        return self._cache.length(st.rid)


class DraftModelProposer(ModelProposer):
    """A separate small model with the target's vocabulary, with its own paged KV cache."""
    name = "draft-model"

    def __init__(self, model: LlamaModel, k: int = 4, branching: int = 1, width: int = 1,
                 max_nodes: Optional[int] = None, draft_vocab: int = 0, cache_blocks: int = 0):
        super().__init__(k, branching, width, max_nodes, draft_vocab)
        self.model = model
        self._cache_blocks = cache_blocks
        self._cache = None
        self._len: Dict[object, int] = {}

    def describe(self) -> str:
        return f"draft-model {self.model.config.name} k={self.k}" + (
            f" tree {self.branching}x{self.width}" if self.width > 1 or self.branching > 1 else "")

    def bind(self, target, cache):
        if target.config.vocab_size != self.model.config.vocab_size:
            raise ValueError(f"model: the draft model's vocabulary ({self.model.config.vocab_size}) differs from the "
                             f"target's ({target.config.vocab_size})")
        # 16-position blocks for the target's capacity: a request holding b target blocks needs at most
        # b * block_size / 16 of them, rounded up, so one more per request unless block_size is a multiple of 16
        # (a request holds at least one target block: at most num_blocks requests)
        bs = cache.block_size
        blocks = self._cache_blocks or -(-cache.num_blocks * bs // 16) + (0 if bs % 16 == 0 else cache.num_blocks)
        self._cache = self.model.new_cache(blocks, 16, scrub=cache.scrub)
        self._len = {}

    def draft_model(self):
        return self.model

    def draft_cache(self):
        return self._cache

    def committed(self, st):
        if st.rid not in self._len:
            self._cache.add(st.rid)
            self._len[st.rid] = 0
        return self._len[st.rid]

    def after_draft(self, st, kept):
        self._len[st.rid] = kept
        self._cache.set_length(st.rid, kept)

    def release(self, st):
        if st.rid in self._len:
            self._cache.release(st.rid)
            del self._len[st.rid]


class _Composite(Proposer):
    """Proposers made of parts: each part is bound to the target, sees the hidden states it taps of every
    committed token (``taps``: the union of the parts') and is told when a request finishes."""

    def __init__(self, parts: Sequence[Proposer], max_nodes: int, max_depth: int):
        super().__init__(max_nodes, max_depth)
        self.parts = list(parts)
        self.taps = tuple(sorted({t for p in self.parts for t in p.taps}))

    def bind(self, target, cache):
        for p in self.parts:
            p.bind(target, cache)

    def observe(self, state, positions, hidden):
        for p in self.parts:
            if p.taps:
                idx = [self.taps.index(t) for t in p.taps]
                p.observe(state, positions, hidden[:, idx] if len(positions) else hidden)

    def release(self, state):
        for p in self.parts:
            p.release(state)


class UnionProposer(_Composite):
    """Several deterministic proposers at once: their drafts merged into one token tree (shared prefixes
    become one path), within ``max_nodes``. For example n-gram lookups, which win on text that repeats
    the prompt, with a trained drafter, which wins elsewhere. Every part must draft deterministically
    (no ``probs``), so the merged tree is verified as point masses, which keeps sampling lossless."""
    name = "union"

    def __init__(self, parts: Sequence[Proposer], max_nodes: Optional[int] = None):
        if not parts:
            raise ValueError("parts: expected at least one proposer")
        super().__init__(parts, max_nodes or min(64, sum(p.max_nodes for p in parts)),
                         max(p.max_depth for p in parts))

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.parts)

    def feedback(self, state, drafted, accepted):
        for p in self.parts:
            p.feedback(state, drafted, accepted)

    def propose(self, states, depth_limits):
        per = [p.propose(states, depth_limits) for p in self.parts]
        out = []
        for r in range(len(states)):
            seqs = []
            for drafts in per:
                d = drafts[r]
                if d.probs is not None:
                    raise ValueError(f"parts: {type(d).__name__} drafts from a distribution; a union needs "
                                     "deterministic drafts")
                # every root-to-leaf path of the part's tree, in node order
                kids = {i for i in d.parents if i >= 0}
                for leaf in range(len(d)):
                    if leaf in kids:
                        continue
                    path, i = [], leaf
                    while i >= 0:
                        path.append(d.tokens[i])
                        i = d.parents[i]
                    seqs.append(path[::-1])
            out.append(_trie(seqs, self.max_nodes))
        return out


class FallbackProposer(_Composite):
    """Several proposers in order of preference: each request's draft comes from the first part that drafts
    anything for it, and the later parts are not run for it that step. For example prompt lookup first,
    which costs nothing and wins on text that repeats the prompt, then a trained drafter where the lookup
    finds nothing, so the drafter's forwards are spent only where they are needed. Each part sees the
    feedback of the drafts it made; ``observe`` reaches every part (a model drafter needs every committed
    token's hidden states, and catches up on those it was not asked about the next time it drafts)."""
    name = "fallback"

    def __init__(self, parts: Sequence[Proposer]):
        if len(parts) < 2:
            raise ValueError(f"parts: expected at least two proposers, got {len(parts)}")
        super().__init__(parts, max(p.max_nodes for p in parts), max(p.max_depth for p in parts))
        self._source: Dict[object, int] = {}  # rid -> the part that drafted its last draft
        self.drafted_by = [0] * len(self.parts)  # steps each part drafted, over the proposer's life

    def describe(self) -> str:
        return " else ".join(p.describe() for p in self.parts)

    def feedback(self, state, drafted, accepted):
        i = self._source.get(state.rid)
        if i is not None:
            self.parts[i].feedback(state, drafted, accepted)

    def release(self, state):
        self._source.pop(state.rid, None)
        super().release(state)

    def propose(self, states, depth_limits):
        out = [Draft() for _ in states]
        for st in states:
            self._source.pop(st.rid, None)
        todo = [r for r in range(len(states)) if depth_limits[r] > 0]
        for i, part in enumerate(self.parts):
            if not todo:
                break
            drafts = part.propose([states[r] for r in todo], [depth_limits[r] for r in todo])
            left = []
            for r, d in zip(todo, drafts):
                if len(d):
                    out[r] = d
                    self._source[states[r].rid] = i
                    self.drafted_by[i] += 1
                else:
                    left.append(r)
            todo = left
        return out
