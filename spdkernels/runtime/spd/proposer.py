"""The PDM as an ordinary proposer in the draft-then-verify engine (:class:`PDMProposer`).

Here every committed token has passed the whole target, so its PDM row is the completed one (``g_m`` from
all anchors, captured by the engine's prefill and verification passes through ``Proposer.taps``). The
root (the last emitted token, not yet run through the target) and each draft token enter as depth-0 rows
(``g_0``, the embedding alone): the layout the PDM is trained on in proposer mode. The PDM's own paged KV
cache holds the completed rows; a chain keeps its draft rows' K/V from level to level (one row per level),
and everything past the completed rows is rolled back after drafting.

Trees (``branching``/``width`` > 1) are expanded EAGLE-2 style: top-k children per node, the best nodes per
level by cumulative log-probability within the token budget; each level runs only its frontier nodes, each
over the cached completed rows and a private copy of its own path's K/V (so no node is run twice). Greedy
requests draft argmax chains or top-k trees (point-mass verification). Sampled requests draft chains sampled
from ``q = softmax(draft logits / T)`` with coins keyed by (seed, position) and hand q to verification; sampled
trees stay deterministic top-k expansions (point masses), which keeps sampling lossless."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..._validate import is_int
from ..model import Batch, build_batch
from ..proposers import Draft, Proposer, keep_best_children
from .pdm import PipelineDraftModule, check_model_fits
from .schedule import draw_draft

_SCRATCH = (object(), object())  # the cache ids of a tree level's two scratch sequences


class PDMProposer(Proposer):
    name = "pdm"

    def __init__(self, pdm: PipelineDraftModule, k: int = 4, branching: int = 1, width: int = 1,
                 max_nodes: Optional[int] = None, sample: bool = True, debug: bool = False,
                 min_confidence: float = 0.0):
        """``sample=False`` drafts argmax chains for sampled requests too (deterministic drafts, as a
        :class:`~spdkernels.runtime.proposers.UnionProposer` part needs). ``debug=True`` checks every draft
        distribution against the PDM run from scratch over the node's whole view (tests).
        ``min_confidence`` (chains): a chain ends before a level whose draft distribution's top probability
        is below it (the first level too: a request may draft nothing), so the verification pass only
        carries drafts likely to be accepted. The rule reads the distribution before its token is drawn,
        never the token, so sampled drafts stay distributed as their q and verification stays lossless."""
        for name, v in (("k", k), ("branching", branching), ("width", width)):
            if not is_int(v) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if max_nodes is not None and (not is_int(max_nodes) or max_nodes < 1):
            raise ValueError(f"max_nodes: expected an integer >= 1 or None (k * width), got {max_nodes!r}")
        if not (isinstance(min_confidence, (int, float)) and 0.0 <= min_confidence < 1.0):
            raise ValueError(f"min_confidence: expected a probability in [0, 1), got {min_confidence!r}")
        if min_confidence > 0 and (branching > 1 or width > 1):
            raise ValueError("min_confidence: chains only (branching = width = 1); trees keep their best nodes "
                             "by cumulative probability")
        super().__init__(max_nodes or k * width, k)
        self.pdm, self.k, self.branching, self.width, self.sample = pdm, k, branching, width, sample
        self.min_confidence = float(min_confidence)
        self.debug = debug
        self._done: Dict[object, List[torch.Tensor]] = {}  # debug: every completed row's anchors
        self.taps = tuple(pdm.cfg.anchors)
        self.m = pdm.cfg.m
        self._cache = None
        self._len: Dict[object, int] = {}
        self._pending: Dict[object, List[Tuple[int, torch.Tensor]]] = {}
        self._last: Dict[object, torch.Tensor] = {}  # anchors of the newest completed row (a shift PDM's rows)

    def describe(self) -> str:
        s = f"pdm L_s={self.pdm.num_layers} k={self.k}"
        s += f" p>={self.min_confidence:g}" if self.min_confidence > 0 else ""
        return s + (f" tree {self.branching}x{self.width}" if self.width > 1 or self.branching > 1 else "")

    def bind(self, target, cache):
        check_model_fits(self.pdm, target)
        # the target's block size (each request rounds up to whole blocks as it does there) and twice its blocks:
        # a request's PDM rows never outnumber its target tokens, and one tower layer's K/V is cheap (trees add
        # blocks for their tails when they need them)
        self._cache = self.pdm.new_cache(2 * cache.num_blocks, cache.block_size, scrub=cache.scrub)
        self._len, self._pending, self._last = {}, {}, {}
        self._emb = target.embed_tokens
        self._device = target.device

    def observe(self, state, positions, hidden):
        rid = state.rid
        if rid not in self._len:
            self._cache.add(rid)
            self._len[rid] = 0
            self._pending[rid] = []
        for p, h in zip(positions, hidden):
            self._pending[rid].append((p, h))

    def release(self, state):
        if state.rid in self._len:
            self._cache.release(state.rid)
            del self._len[state.rid]
            del self._pending[state.rid]
            self._last.pop(state.rid, None)
            self._done.pop(state.rid, None)

    # -- drafting -------------------------------------------------------------------------------------------
    def _rows(self, rows_h, rows_t, prev=None) -> torch.Tensor:
        """Tower input rows; ``prev``: each row's previous token ``(anchors, type)`` (a shift PDM)."""
        return self.pdm.rows_of(rows_h, rows_t, prev if prev is not None else [])

    def _forward(self, rids, rows_h, rows_t, positions, prev=None, g=None) -> torch.Tensor:
        """Run PDM rows ``[T, m + 1, H]`` of types ``rows_t`` at ``positions`` (per request, a causal chain
        written right after its cache length) and return the tower's output rows (``g``: the rows given)."""
        pdm, cache = self.pdm, self._cache
        b = build_batch(cache, rids, [self._len[rid] for rid in rids], positions, device=self._device)
        if g is None:
            g = self._rows(rows_h, rows_t, prev)
        h, _ = pdm.tower.forward_layers(g, b, cache)
        return h

    def _pending_rows(self, todo) -> Tuple[torch.Tensor, List[List[int]]]:
        """The tower input rows of the completed tokens observed since the last draft of each request of
        ``todo`` (each has some), stacked request by request, and their positions per request."""
        rows, pos = [], []
        for s in todo:
            ps = [p for p, _ in self._pending[s.rid]]
            assert ps[0] == self._len[s.rid] and ps == list(range(ps[0], ps[0] + len(ps))), "PDM rows not contiguous"
            rows += [h for _, h in self._pending[s.rid]]
            pos.append(ps)
        g = self.pdm.completed_rows(torch.stack(rows), [len(ps) for ps in pos], [self._last.get(s.rid) for s in todo])
        return g, pos

    def _mark_stored(self, todo, pos) -> None:
        """The pending rows of ``todo`` are in the PDM cache now (their K/V written)."""
        for s, ps in zip(todo, pos):
            self._len[s.rid] += len(ps)
            self._last[s.rid] = self._pending[s.rid][-1][1]
            if self.debug:
                self._done.setdefault(s.rid, []).extend(h for _, h in self._pending[s.rid])
            self._pending[s.rid] = []

    def _store_pending(self, states) -> None:
        """Append the completed rows observed since the last draft to each request's PDM cache (one tower
        forward of their own; chains run them in their first level's forward instead)."""
        todo = [s for s in states if self._pending.get(s.rid)]
        if not todo:
            return
        g, pos = self._pending_rows(todo)
        self._forward([s.rid for s in todo], None, None, pos, g=g)
        self._mark_stored(todo, pos)
        for s in todo:
            self._cache.set_length(s.rid, self._len[s.rid])

    def _root_rows(self, st) -> Tuple[torch.Tensor, int]:
        pos = len(st.tokens) - 1
        e = self._emb(torch.tensor([st.last_token], device=self._device))[0]
        row = e.new_full((self.m + 1, e.shape[-1]), float("nan"))
        row[0] = e
        return row, pos

    def _prev_of_root(self, st) -> Tuple[torch.Tensor, int]:
        """The root's previous token for the shift term: the newest completed row (type ``m``), or none."""
        last = self._last.get(st.rid)
        if last is None:
            return self.pdm.norm.new_zeros(self.m + 1, self.pdm.target_config.hidden_size), -1
        return last, self.m

    @torch.inference_mode()
    def propose(self, states, depth_limits):
        for s in states:  # a request the engine did not prefill through us (no taps): start its cache
            if s.rid not in self._len:
                self.observe(s, [], [])
        if self.width == 1 and self.branching == 1:
            return self._chains(states, depth_limits)
        self._store_pending(states)
        return self._trees(states, depth_limits)

    def _sample(self, st, logits: torch.Tensor, pos: int) -> Tuple[int, Optional[torch.Tensor]]:
        return draw_draft(self.pdm, logits, st.params.temperature if self.sample else 0.0, st.params.seed, pos)

    def _chains(self, states, depth_limits) -> List[Draft]:
        pdm = self.pdm
        R = len(states)
        drafts = [Draft() for _ in states]
        qs: List[List[torch.Tensor]] = [[] for _ in states]
        live = [r for r in range(R) if depth_limits[r] > 0]
        # the completed rows observed since the last draft run in the first level's forward, before the roots
        # (requests that draft nothing this step keep theirs pending)
        todo = [states[r] for r in live if self._pending.get(states[r].rid)]
        g_done, pos_done = self._pending_rows(todo) if todo else (None, [])
        done_of = {s.rid: (ps, self._pending[s.rid][-1][1]) for s, ps in zip(todo, pos_done)}
        cur: Dict[int, Tuple[torch.Tensor, int]] = {r: self._root_rows(states[r]) for r in live}
        path = {r: [cur[r][0]] for r in live}  # debug: the chain's rows so far
        # the shift term's previous token per chain: the newest completed row (pending ones included)
        prev = {r: (done_of[states[r].rid][1], self.m) if states[r].rid in done_of else self._prev_of_root(states[r])
                for r in live}
        written = {r: 0 for r in live}  # transient rows in the PDM cache past the completed ones
        level = 0
        while live and level < self.k:
            rids = [states[r].rid for r in live]
            for r in live:  # the transient rows of earlier levels stay cached: advance the write point
                self._len[states[r].rid] += written[r]
            if level == 0 and todo:
                g = self._rows([cur[r][0] for r in live], [0] * len(live), [prev[r] for r in live])
                pieces, positions, sel, off = [], [], [], 0  # off: rows of g_done placed so far
                for j, r in enumerate(live):
                    ps = done_of[rids[j]][0] if rids[j] in done_of else []
                    if ps:
                        pieces.append(g_done[off:off + len(ps)])
                        off += len(ps)
                    pieces.append(g[j:j + 1])
                    positions.append(ps + [cur[r][1]])
                    sel.append(off + j)  # the root's row: every earlier request's rows, then this one's pending
                h = self._forward(rids, None, None, positions, g=torch.cat(pieces))[sel]
                self._mark_stored(todo, pos_done)  # (their length is set with the roll back below)
            else:
                h = self._forward(rids, [cur[r][0] for r in live], [0] * len(live), [[cur[r][1]] for r in live],
                                  [prev[r] for r in live])
            for r in live:
                self._len[states[r].rid] -= written[r]
                written[r] += 1
            logits = pdm.draft_logits(h)
            if self.debug:
                for j, r in enumerate(live):
                    self._check_view(states[r], path[r], logits[j])
            sure = self._confident(logits, [states[r] for r in live], [cur[r][1] + 1 for r in live]) \
                if self.min_confidence > 0 else None
            nxt = []
            for j, r in enumerate(live):
                st = states[r]
                if sure is not None and not sure[j]:
                    continue  # the chain ends here: the next token is too unlikely to be accepted
                pos = cur[r][1] + 1
                tok, q = self._sample(st, logits[j], pos)
                drafts[r].tokens.append(tok)
                drafts[r].parents.append(len(drafts[r].tokens) - 2)
                if q is not None:
                    qs[r].append(q)
                if len(drafts[r]) < min(depth_limits[r], self.k):
                    e = self._emb(torch.tensor([tok], device=self._device))[0]
                    row = e.new_full((self.m + 1, e.shape[-1]), float("nan"))
                    row[0] = e
                    prev[r] = (cur[r][0], 0)
                    cur[r] = (row, pos)
                    path[r].append(row)
                    nxt.append(r)
            live = nxt
            level += 1
        for r, st in enumerate(states):
            if st.rid in self._len:
                self._cache.set_length(st.rid, self._len[st.rid])  # roll back the transient rows
            if qs[r]:
                drafts[r].probs = pdm.scatter(torch.stack(qs[r]), pdm.target_config.vocab_size)
        return drafts

    def _confident(self, logits: torch.Tensor, states, positions: List[int]) -> List[bool]:
        """Per row, whether the top probability of its draft distribution (at the request's temperature; the
        plain softmax for greedy requests) reaches ``min_confidence``. (``positions``, where each row's token
        would go, is not read: a rule that looked at the token drawn there would make sampling lossy.)"""
        temps = [st.params.temperature if self.sample and st.params.temperature > 0 else 1.0 for st in states]
        t = torch.tensor(temps, dtype=torch.float32, device=logits.device)[:, None]
        return (torch.softmax(logits.float() / t, dim=-1).amax(dim=-1) >= self.min_confidence).tolist()

    def _trees(self, states, depth_limits) -> List[Draft]:
        """EAGLE-2 style expansion; each level runs only its frontier nodes (the root at level 0). A frontier node
        is a sequence of its own for ``tree_attention``: the request's full prefix blocks, shared and read only,
        then a private tail of blocks holding the prefix's partial last block, the root and the node's
        ancestors (copied from its parent's tail: one small block copy, no forward) and the node itself, whose
        K/V its forward writes there. So every node attends to the completed rows and to its own path, and no
        row is run twice. Tails live in two scratch sequences of the PDM cache, one per level in turn: a level's
        tails are given back once the next level has copied them."""
        pdm, cache = self.pdm, self._cache
        bs, dev = cache.block_size, self._device
        R = len(states)
        drafts = [Draft() for _ in states]
        scores: List[List[float]] = [[] for _ in states]
        frontier: List[List[int]] = [[-1] for _ in states]
        roots = [self._root_rows(st) for st in states]
        embs: List[List[torch.Tensor]] = [[] for _ in states]
        # the tails of two levels' frontier nodes (at most `width` per request, each at most 1 + ceil(k / bs) blocks)
        room = 2 * self.width * (1 + -(-self.k // bs)) * sum(1 for x in depth_limits if x > 0)
        if cache.free_blocks < room:  # (by half the cache at least: the requests' own rows keep growing too)
            cache.grow(max(room - cache.free_blocks, cache.num_blocks // 2))
        scratch = list(_SCRATCH)  # ids no request can have (a user rid equal to a tuple name collided)
        for sc in scratch:
            cache.add(sc)
        tails: Dict[Tuple[int, int], List[int]] = {}  # (request, node) -> its tail blocks (node -1: the root)
        try:
            for level in range(self.k):
                active = [r for r in range(R) if frontier[r] and level < depth_limits[r]]
                if not active:
                    break
                cur = scratch[level % 2]  # empty: its tails of two levels ago were given back
                rows, prev, positions, slots, kv_lens, table, src, dst = [], [], [], [], [], [], [], []
                new_tails: Dict[Tuple[int, int], List[int]] = {}
                for r in active:
                    st, d = states[r], drafts[r]
                    full, part = divmod(self._len[st.rid], bs)
                    own = cache.blocks(st.rid)
                    root, rpos = roots[r]
                    depth = d.depths()
                    for f in frontier[r]:
                        dep = 0 if f < 0 else depth[f]
                        have = len(cache.blocks(cur))
                        cache.reserve(cur, (have + -(-(part + dep + 1) // bs)) * bs)
                        blocks = cache.blocks(cur)[have:]
                        from_ = own[full:full + 1] if f < 0 else tails[(r, d.parents[f])]  # the path so far
                        src += from_
                        dst += blocks[:len(from_)]
                        new_tails[(r, f)] = blocks
                        i = part + dep  # the node's place in its tail
                        slots.append(blocks[i // bs] * bs + i % bs)
                        table.append(own[:full] + blocks)
                        kv_lens.append(self._len[st.rid] + dep + 1)
                        positions.append(rpos + dep)
                        if f < 0:
                            rows.append(root)
                            prev.append(self._prev_of_root(st))
                        else:
                            p = d.parents[f]
                            rows.append(embs[r][f])
                            prev.append((root if p < 0 else embs[r][p], 0))
                if src:
                    si, di = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)
                    for c in (cache.k, cache.v):
                        c[:, di] = c[:, si]
                cache.set_length(scratch[(level + 1) % 2], 0)  # the parents' tails are copied: give them back
                tails = new_tails
                Q, cols = len(rows), max(len(t) for t in table)
                b = Batch(token_ids=torch.zeros(Q, dtype=torch.int64, device=dev),
                          positions=torch.tensor(positions, dtype=torch.int64, device=dev),
                          slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
                          cu_q_lens=torch.arange(Q + 1, dtype=torch.int32, device=dev),
                          kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
                          block_table=torch.tensor([t + [0] * (cols - len(t)) for t in table], dtype=torch.int32,
                                                   device=dev), max_q_len=1, max_kv_len=max(kv_lens))
                h, _ = pdm.tower.forward_layers(self._rows(rows, [0] * Q, prev), b, cache)
                d_logits = pdm.draft_logits(h)
                owners = [(r, f) for r in active for f in frontier[r]]
                if self.debug:
                    for j, (r, f) in enumerate(owners):
                        chain = []
                        while f >= 0:
                            chain.append(embs[r][f])
                            f = drafts[r].parents[f]
                        self._check_view(states[r], [roots[r][0]] + chain[::-1], d_logits[j])
                logp = torch.log_softmax(d_logits.float(), dim=-1)
                top = logp.topk(self.branching, dim=-1)
                for r, t in keep_best_children(drafts, scores, frontier, owners, top.values.tolist(),
                                               pdm.vocab_ids[top.indices].tolist(), self.width, self.max_nodes):
                    e = self._emb(torch.tensor([t], device=dev))[0]
                    row = e.new_full((self.m + 1, e.shape[-1]), float("nan"))
                    row[0] = e
                    embs[r].append(row)
        finally:
            for sc in scratch:
                cache.release(sc)
        return drafts

    def _check_view(self, st, path: List[torch.Tensor], logits: torch.Tensor) -> None:
        """Debug: ``logits`` (the draft distribution after ``path``: the root and the drafts down to a node)
        equal the PDM run from scratch over every completed row and ``path``."""
        done = self._done.get(st.rid, [])
        self.pdm.check_draft(st.rid, logits, list(done) + list(path), [self.m] * len(done) + [0] * len(path))
