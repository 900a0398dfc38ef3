"""Speculative Pipeline Decoding on one process (:class:`SPDEngine`).

The target's layers are cut into ``n`` stages (:meth:`LlamaModel.stages`), each with its own paged KV
cache (its own per-request lengths). One **cycle**: the PDM drafts the token after the newest one in
flight from the rows of the tokens at every depth (pre-cycle anchor states), every stage advances the
token at its depth by one stage (stages batched over requests), and the token leaving the last stage gives
the target's distribution that verifies the token drafted right after it (``verify_greedy``, or
``rejection_sample`` with the stored draft distribution q and coins keyed by the request's seed and the
verified token's position). Accept: the token is committed and the new draft enters at depth 0. Reject:
the correction is committed, every younger token in flight is dropped, each stage truncates its cache to
the committed prefix (stage ``s`` drops the K/V of the ``n - 1 - s`` younger tokens it had processed), and
the pipeline restarts from the correction. Autoregressive decoding costs ``n`` cycles per token; SPD
commits up to one per cycle, so ``equivalent speedup = n * tokens per cycle``.

On one process the stages run one after another, so the wall clock is that of a ``n``-stage forward per
cycle; the pipelined wall clock needs one worker per stage (the distributed runtime). The per-cycle
timings (PDM, every stage, verify) are measured here so that the cost model can be checked."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import spdkernels
from spdkernels.reference.rejection_sample import philox_uniform

from ..._validate import is_int
from ..engine import (
    Request,
    RequestMetrics,
    RequestState,
    Result,
    RunMetrics,
    append_tokens,
    check_engine_args,
    check_unique_rids,
    collect_results,
    validate_requests,
)
from ..model import Batch, LlamaModel, build_batch, sync_device
from .pdm import PDMError, PipelineDraftModule, check_model_fits, check_stages

STREAM_DRAFT = 2  # Philox stream of the draft coins (0 and 1 are the verification coins)


@dataclass
class SPDRequestMetrics(RequestMetrics):
    """``steps`` = verifications (one committed token each), ``drafted`` = drafts verified,
    ``accepted`` = drafts accepted; plus the request's cycles, and of the drafts verified those that came from the
    lookup (``lookup_drafted``) and how many of them were accepted (``lookup_accepted``)."""
    cycles: int = 0
    lookup_drafted: int = 0
    lookup_accepted: int = 0

    @property
    def tokens_per_cycle(self) -> float:
        return self.steps / self.cycles if self.cycles else 0.0


@dataclass
class SPDRunMetrics(RunMetrics):
    """Section 6 metrics of a run: ``cycles`` (engine cycles), ``request_cycles`` and ``verifications``
    summed over requests, acceptance = accepted / drafted (drafts verified), tokens per cycle,
    equivalent speedup ``n * tokens per cycle``, and the per-cycle time split."""
    n: int = 0
    cycles: int = 0
    request_cycles: int = 0
    pdm_s: float = 0.0  # PDM forwards (all cycles)
    stage_s: List[float] = field(default_factory=list)  # per stage, all cycles
    slowest_stage_s: float = 0.0  # sum over cycles of the slowest stage of that cycle
    exit_verify_s: float = 0.0  # final norm + LM head of the exiting token + verification op
    slack_s: float = 0.0  # sum over cycles of (slowest stage - PDM): > 0 means drafting hides behind a stage
    lookup_drafted: int = 0  # drafts verified that came from the lookup (SPDEngine(lookup=...))
    lookup_accepted: int = 0

    @property
    def tokens_per_cycle(self) -> float:
        return self.steps / self.request_cycles if self.request_cycles else 0.0

    @property
    def equivalent_speedup(self) -> float:
        return self.n * self.tokens_per_cycle

    def as_dict(self) -> Dict[str, float]:
        d = super().as_dict()
        c = max(self.cycles, 1)
        d.update(tokens_per_cycle=self.tokens_per_cycle, equivalent_speedup=self.equivalent_speedup,
                 pdm_ms_per_cycle=1e3 * self.pdm_s / c,
                 stage_ms_per_cycle=[1e3 * s / c for s in self.stage_s],
                 slowest_stage_ms_per_cycle=1e3 * self.slowest_stage_s / c,
                 exit_verify_ms_per_cycle=1e3 * self.exit_verify_s / c,
                 slack_ms_per_cycle=1e3 * self.slack_s / c)
        return d


def draw_draft(pdm: PipelineDraftModule, logits: torch.Tensor, temperature: float, seed: int, pos: int
               ) -> Tuple[int, Optional[torch.Tensor]]:
    """A draft token for position ``pos`` from the PDM's draft-vocabulary logits: the argmax at temperature
    0, else a sample from ``q = softmax(logits / T)`` by inverse CDF with a Philox coin keyed by (seed,
    position, stream 2), returned with q (kept for verification)."""
    if temperature == 0:
        return int(pdm.vocab_ids[int(logits.argmax())]), None
    q = torch.softmax(logits.float() / temperature, dim=-1)
    u = philox_uniform(seed, pos, 0, STREAM_DRAFT)
    c = torch.cumsum(q, 0)
    total = float(c[-1])
    if not (math.isfinite(total) and total > 0):  # (a NaN q would make sampled verification lossy, not fail)
        raise PDMError(f"pdm: the draft distribution for position {pos} is not finite (NaN or infinite logits)")
    thr = torch.tensor([u * total], dtype=c.dtype, device=c.device)
    i = min(int(torch.searchsorted(c, thr, right=True)[0]), q.shape[0] - 1)
    while q[i] <= 0:  # never a zero-probability draft
        i -= 1
    return int(pdm.vocab_ids[i]), q


class _Entry:
    """A token in flight: its position, id, current hidden state and the anchor states it has reached."""
    __slots__ = ("pos", "token", "h", "anchors", "depth")

    def __init__(self, pos: int, token: int, h: torch.Tensor, m: int):
        self.pos, self.token, self.h, self.depth = pos, token, h, 0
        self.anchors = h.new_full((m + 1, h.shape[-1]), float("nan"))
        self.anchors[0] = h


class _SPDState(RequestState):
    def __init__(self, req: Request, rid):
        super().__init__(req, rid)
        self.metrics = SPDRequestMetrics()
        self.pipeline: List[_Entry] = []  # oldest first
        self.pending: Optional[torch.Tensor] = None  # anchors of the token that left the pipe last cycle
        self.spec_len = 0  # rows in the PDM cache: a contiguous prefix of completed tokens
        self.last_done: Optional[torch.Tensor] = None  # anchors of the newest of them (a shift PDM's rows)
        self.done_rows: List[torch.Tensor] = []  # debug: the anchors of every one of them
        self.q: Dict[int, Optional[torch.Tensor]] = {}  # position -> draft-vocabulary q of the draft there
        self.looked_up: set = set()  # positions whose draft came from the lookup


class SPDEngine:
    """``SPDEngine(model, pdm, n).generate(requests)`` with the :class:`~spdkernels.runtime.Engine`'s
    request, sampling-parameter, result and metrics types. ``debug=True`` asserts the cache invariants of
    the contract after every cycle; ``scrub_cache=True`` poisons every KV entry past a cache's length."""

    def __init__(self, model: LlamaModel, pdm: PipelineDraftModule, n: int, tokenizer=None,
                 eos_token_ids: Optional[Sequence[int]] = None, block_size: int = 16, debug: bool = False,
                 scrub_cache: bool = False, validate_ops: bool = False, lookup=None):
        if not isinstance(pdm, PipelineDraftModule):
            raise ValueError(f"pdm: expected a PipelineDraftModule (spdkernels.runtime.spd.load_pdm), got "
                             f"{type(pdm).__name__}")
        check_model_fits(pdm, model)
        if not is_int(n):
            raise ValueError(f"stages: expected an integer number of stages, got {n!r}")
        eos_token_ids = check_engine_args(block_size, eos_token_ids)
        if lookup is not None and not callable(getattr(lookup, "lookup", None)):
            raise ValueError(f"lookup: expected an NGramProposer (anything with lookup(ctx, k)), got "
                             f"{type(lookup).__name__}")
        self.f = check_stages(pdm.cfg, model.num_layers, n)
        # lookup: an NGramProposer (or anything with its lookup(ctx, k)); when it finds the newest tokens (in flight
        # included) earlier in the text, its next token is the draft (a point mass), else the PDM's
        self.lookup = lookup
        self.model, self.pdm, self.n = model, pdm, n
        self.stages = model.stages(n)
        self.tokenizer = tokenizer
        self.eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.block_size, self.debug, self.scrub, self.validate_ops = block_size, debug, scrub_cache, validate_ops
        anchors = pdm.cfg.anchors
        # anchor taps each stage produces: model layer index (b - 1) -> anchor index
        self.stage_taps = [{b - 1: k for k, b in enumerate(anchors) if s < b <= e} for s, e in self.stages]
        self.m = pdm.cfg.m
        self.on_step = None  # called after each cycle with the tokens generated so far by all the run's requests
        self._run: List[_SPDState] = []
        self.caches: List = []
        self.pdm_cache = None

    def describe(self) -> str:
        s = f"spd n={self.n} L_s={self.pdm.num_layers}"
        lk = self.lookup
        return s + (f" + lookup n={lk.min_ngram}..{lk.max_ngram}" if lk is not None else "")

    def _states(self, requests: Sequence[Request]) -> List[_SPDState]:
        """Validated requests (a prompt of at least n tokens, unique ids) as pipeline states, which become the
        run's (those ``on_step`` counts)."""
        validate_requests(self.model.config, requests)
        for i, r in enumerate(requests):
            if len(r.prompt_ids) < self.n:
                raise ValueError(f"prompt_ids: request {i} has {len(r.prompt_ids)} tokens, SPD with n={self.n} "
                                 f"stages needs a prompt of at least n tokens")
        states = [_SPDState(r, r.rid if r.rid is not None else i) for i, r in enumerate(requests)]
        check_unique_rids(requests, [s.rid for s in states])
        self._run = states
        return states

    # -- public ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: Sequence[Request]) -> Tuple[List[Result], SPDRunMetrics]:
        m = SPDRunMetrics(n=self.n, stage_s=[0.0] * self.n)
        requests = list(requests)  # (a generator would be used up by the checks)
        if not requests:
            return [], m
        states = self._states(requests)
        bs = self.block_size
        blocks = sum(-(-(len(r.prompt_ids) + r.params.max_new_tokens + self.n + 2) // bs) + 1 for r in requests)
        self.caches = [self.model.new_cache(blocks, bs, layers=se, scrub=self.scrub) for se in self.stages]
        self.pdm_cache = self.pdm.new_cache(blocks, bs, scrub=self.scrub)
        old = spdkernels.validation_enabled()
        spdkernels.set_validation(self.validate_ops)
        t0 = time.perf_counter()
        try:
            for s in states:
                for c in self.caches + [self.pdm_cache]:
                    c.add(s.rid)
            self._prefill(states, m)
            sync_device(self.model.device)
            m.prefill_s = time.perf_counter() - t0
            active = [s for s in states if not s.done]
            for s in states:
                if s.done:  # finished by its first token: its cache entries are not needed
                    for c in self.caches + [self.pdm_cache]:
                        c.release(s.rid)
            while active:
                self._cycle(active, m)
                for s in active:
                    if s.done:
                        for c in self.caches + [self.pdm_cache]:
                            c.release(s.rid)
                active = [s for s in active if not s.done]
        finally:
            spdkernels.set_validation(old)
        sync_device(self.model.device)
        m.wall_s = time.perf_counter() - t0
        results = collect_results(states, self.tokenizer, m)
        m.request_cycles = sum(s.metrics.cycles for s in states)
        m.lookup_drafted = sum(s.metrics.lookup_drafted for s in states)
        m.lookup_accepted = sum(s.metrics.lookup_accepted for s in states)
        return results, m

    # -- pieces --------------------------------------------------------------------------------------------
    def _batch(self, cache, rids, positions: Sequence[Sequence[int]], tokens=None) -> Batch:
        """A causal batch: request ``rids[i]`` runs its tokens at ``positions[i]`` (consecutive), with K/V
        written at those positions of ``cache`` (every position before them is attended to)."""
        return build_batch(cache, rids, [ps[0] for ps in positions], positions, tokens, device=self.model.device)

    def _sample_first(self, states: List[_SPDState], logits: torch.Tensor) -> List[int]:
        """The token after the prompt, from the target itself (no draft to verify)."""
        R = len(states)
        empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
        cu = torch.zeros(R + 1, dtype=torch.int32, device=logits.device)
        if all(s.params.temperature == 0 for s in states):
            out, _, _ = spdkernels.verify_greedy(logits, empty, cu, max_depth=0)
        else:
            out, _, _ = spdkernels.rejection_sample(logits, empty, cu, max_depth=0, **self._sampling_args(
                states, [len(s.prompt) for s in states], logits.device))
        return out[:, 0].tolist()

    def _target_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.model.logits(h)
        return logits if logits.dtype in (torch.float32, torch.bfloat16, torch.float16) else logits.float()

    @staticmethod
    def _sampling_args(states, positions, dev) -> Dict:
        return dict(temperature=torch.tensor([s.params.temperature for s in states], dtype=torch.float32, device=dev),
                    top_k=torch.tensor([s.params.top_k for s in states], dtype=torch.int32, device=dev),
                    top_p=torch.tensor([s.params.top_p for s in states], dtype=torch.float32, device=dev),
                    seed=torch.tensor([s.params.seed for s in states], dtype=torch.int64, device=dev),
                    offset=torch.tensor(list(positions), dtype=torch.int64, device=dev))

    def _prefill(self, states: List[_SPDState], m: SPDRunMetrics) -> None:
        """Every prompt token through every stage (each stage's cache), the anchors of every prompt
        position into the PDM cache as completed rows, and the first token from the target."""
        model, pdm = self.model, self.pdm
        rids = [s.rid for s in states]
        positions = [list(range(len(s.prompt))) for s in states]
        toks = [t for s in states for t in s.prompt]
        h = None
        anchors = None
        for si, (start, end) in enumerate(self.stages):
            b = self._batch(self.caches[si], rids, positions, toks)
            if h is None:
                h = model.embed_tokens(b.token_ids)
                anchors = h.new_empty(h.shape[0], self.m + 1, h.shape[1])
                anchors[:, 0] = h
            h, tapped = model.forward_layers(h, b, self.caches[si], start, end, taps=self.stage_taps[si])
            for layer, k in self.stage_taps[si].items():
                anchors[:, k] = tapped[layer]
            for s in states:
                self.caches[si].set_length(s.rid, len(s.prompt))
        cu = b.cu_q_lens.tolist()
        last = torch.tensor([c - 1 for c in cu[1:]], device=h.device)
        first = self._sample_first(states, self._target_logits(h[last]))
        # the PDM: completed rows of every prompt position
        g = pdm.completed_rows(anchors, [len(s.prompt) for s in states])
        b = self._batch(self.pdm_cache, rids, positions)
        pdm.tower.forward_layers(g, b, self.pdm_cache)
        for j, (s, t) in enumerate(zip(states, first)):
            self.pdm_cache.set_length(s.rid, len(s.prompt))
            s.spec_len = len(s.prompt)
            s.last_done = anchors[cu[j + 1] - 1].clone()
            if self.debug:
                s.done_rows = list(anchors[cu[j]:cu[j + 1]].clone())
            append_tokens(s, [t], self.eos, self.tokenizer)
            if not s.done:
                e = model.embed_tokens(torch.tensor([t], device=h.device))[0]
                s.pipeline = [_Entry(len(s.prompt), t, e, self.m)]
        if self.debug:
            self._check([s for s in states if not s.done])

    def _pdm_forward(self, active: List[_SPDState]) -> torch.Tensor:
        """Rows ``[pending completed row?] + in-flight rows (oldest first)`` per request, contiguous from
        its PDM cache length; returns the draft logits of each request's last row ``[R, Vd]`` and keeps only
        the pending row in the cache."""
        pdm = self.pdm
        rows, types, positions, prev = [], [], [], []
        for s in active:
            p0 = s.spec_len
            ps = []
            last, last_t = s.last_done, self.m  # a row's previous token: the row before it (the shift term)
            if s.pending is not None:
                rows.append(s.pending)
                types.append(self.m)
                ps.append(p0)
                prev.append((last, last_t))
                last = s.pending
            for e in s.pipeline:
                rows.append(e.anchors)
                types.append(self.f[e.depth])
                ps.append(p0 + len(ps))
                prev.append((last, last_t))
                last, last_t = e.anchors, self.f[e.depth]
            if self.debug:
                assert [e.pos for e in s.pipeline] == ps[len(ps) - len(s.pipeline):], \
                    f"PDM rows of {s.rid!r} not contiguous from its cache length {p0}"
            positions.append(ps)
        g = pdm.rows_of(rows, types, prev)
        b = self._batch(self.pdm_cache, [s.rid for s in active], positions)
        h, _ = pdm.tower.forward_layers(g, b, self.pdm_cache)
        last = b.cu_q_lens[1:].long() - 1
        logits = pdm.draft_logits(h[last])
        if self.debug:
            self._check_draft(active, logits)
        for s in active:
            if s.pending is not None:
                s.spec_len += 1
                s.last_done = s.pending
                if self.debug:
                    s.done_rows.append(s.pending)
                s.pending = None
            self.pdm_cache.set_length(s.rid, s.spec_len)
        return logits

    def _stage_forwards(self, active: List[_SPDState], m: SPDRunMetrics) -> float:
        model = self.model
        slowest = 0.0
        for si in range(self.n - 1, -1, -1):  # last stage first: a token advances one stage per cycle
            start, end = self.stages[si]
            t0 = time.perf_counter()
            work = [(s, e) for s in active for e in s.pipeline if e.depth == si]
            if not work:
                continue
            b = self._batch(self.caches[si], [s.rid for s, _ in work], [[e.pos] for _, e in work])
            h, tapped = model.forward_layers(torch.stack([e.h for _, e in work]), b, self.caches[si], start, end,
                                             taps=self.stage_taps[si])
            for j, (s, e) in enumerate(work):
                e.h = h[j]
                for layer, k in self.stage_taps[si].items():
                    e.anchors[k] = tapped[layer][j]
                e.depth += 1
                self.caches[si].set_length(s.rid, e.pos + 1)
            sync_device(model.device)
            dt = time.perf_counter() - t0
            m.stage_s[si] += dt
            slowest = max(slowest, dt)
        return slowest

    def _verify(self, exits: List[Tuple[_SPDState, _Entry]]) -> List[Tuple[bool, int]]:
        """For each exiting token: (accepted?, committed token) for the draft right after it."""
        model = self.model
        dev = model.device
        logits = self._target_logits(torch.stack([e.h for _, e in exits]))
        R = len(exits)
        nxt = [s.pipeline[1] for s, _ in exits]  # the draft right after the exiting token
        rows = logits.repeat_interleave(2, dim=0)  # [root row, bonus row (unused)] per request
        draft = torch.tensor([x.token for x in nxt], dtype=torch.int64, device=dev)
        cu = torch.arange(R + 1, dtype=torch.int32, device=dev)
        states = [s for s, _ in exits]
        if all(s.params.temperature == 0 for s in states):
            out, num, _ = spdkernels.verify_greedy(rows, draft, cu, max_depth=1)
        else:
            probs = None
            if any(s.q.get(x.pos) is not None for s, x in zip(states, nxt)):
                probs = torch.zeros(R, logits.shape[-1], dtype=torch.float32, device=dev)
                for i, (s, x) in enumerate(zip(states, nxt)):
                    q = s.q.get(x.pos)
                    if q is None:
                        probs[i, x.token] = 1.0
                    else:
                        probs[i, self.pdm.vocab_ids] = q
            out, num, _ = spdkernels.rejection_sample(rows, draft, cu, draft_probs=probs, max_depth=1,
                                                      **self._sampling_args(states, [x.pos for x in nxt], dev))
        return [(n == 2, o[0]) for n, o in zip(num.tolist(), out.tolist())]

    def _draft(self, s: _SPDState, logits: torch.Tensor) -> Tuple[int, Optional[torch.Tensor]]:
        if self.lookup is not None:
            done = s.tokens
            ctx = done + [e.token for e in s.pipeline if e.pos >= len(done)]
            found = self.lookup.lookup(ctx, 1)
            if found:
                s.looked_up.add(s.pipeline[-1].pos + 1)
                return found[0][0], None  # a deterministic proposal: q is its point mass
        return draw_draft(self.pdm, logits, s.params.temperature, s.params.seed, s.pipeline[-1].pos + 1)

    def _cycle(self, active: List[_SPDState], m: SPDRunMetrics) -> None:
        model, n = self.model, self.n
        t0 = time.perf_counter()
        d_logits = self._pdm_forward(active)
        sync_device(model.device)
        t1 = time.perf_counter()
        slowest = self._stage_forwards(active, m)
        t2 = time.perf_counter()
        exits = [(s, s.pipeline[0]) for s in active if s.pipeline[0].depth == n]
        verdicts = self._verify(exits) if exits else []
        sync_device(model.device)
        t3 = time.perf_counter()
        rejected = set()
        for (s, e), (ok, tok) in zip(exits, verdicts):
            s.metrics.steps += 1
            s.metrics.drafted += 1
            s.metrics.emitted += 1
            s.pending = e.anchors
            s.pipeline.pop(0)
            pos = s.pipeline[0].pos  # the verified draft's: its q and origin are no longer needed
            looked_up = pos in s.looked_up
            s.looked_up.discard(pos)
            s.q.pop(pos, None)
            s.metrics.lookup_drafted += looked_up
            if ok:
                s.metrics.accepted += 1
                s.metrics.lookup_accepted += looked_up
            else:
                rejected.add(s.rid)
                keep = e.pos + 1  # every stage keeps the committed prefix, up to the exiting token
                for c in self.caches:
                    c.set_length(s.rid, keep)
                s.pipeline = [_Entry(keep, tok, model.embed_tokens(torch.tensor([tok], device=model.device))[0],
                                     self.m)]
                s.q = {p: q for p, q in s.q.items() if p < keep}
                s.looked_up = {p for p in s.looked_up if p < keep}
            append_tokens(s, [tok], self.eos, self.tokenizer)
        for i, s in enumerate(active):
            s.metrics.cycles += 1
            if s.done or s.rid in rejected:
                continue
            nxt = s.pipeline[-1].pos + 1
            if nxt - len(s.prompt) >= s.params.max_new_tokens or nxt >= model.config.max_position:
                continue  # nothing past the budget is worth drafting
            tok, q = self._draft(s, d_logits[i])
            s.q[nxt] = q
            s.pipeline.append(_Entry(nxt, tok, model.embed_tokens(torch.tensor([tok], device=model.device))[0],
                                     self.m))
        t4 = time.perf_counter()
        m.cycles += 1
        m.pdm_s += t1 - t0
        m.slowest_stage_s += slowest
        m.slack_s += slowest - (t1 - t0)
        m.exit_verify_s += t3 - t2
        m.verify_s += t2 - t1
        m.draft_s += t1 - t0
        m.bookkeeping_s += t4 - t3
        m.engine_steps += 1
        if self.debug:
            self._check([s for s in active if not s.done])
        if self.on_step is not None:
            self.on_step(sum(len(s.output) for s in self._run))

    def _check_draft(self, active: List[_SPDState], logits: torch.Tensor) -> None:
        """Debug: the draft logits from the PDM's cache equal the PDM run from scratch over the request's
        whole view (every completed row, the pending one, the tokens in flight at their depths)."""
        for i, s in enumerate(active):
            rows = list(s.done_rows) + ([s.pending] if s.pending is not None else []) + [e.anchors for e in s.pipeline]
            types = [self.m] * (len(rows) - len(s.pipeline)) + [self.f[e.depth] for e in s.pipeline]
            self.pdm.check_draft(s.rid, logits[i], rows, types)

    def _check(self, states: List[_SPDState]) -> None:
        """The invariants of contract section 6, after a cycle (debug mode)."""
        for s in states:
            pipe = s.pipeline
            assert pipe, f"{s.rid!r}: empty pipeline"
            P = len(s.prompt)
            committed = P + len(s.output)  # positions 0 .. committed - 1 are verified
            assert pipe[0].pos == committed - 1, f"{s.rid!r}: oldest in flight at {pipe[0].pos}, committed {committed}"
            assert [e.pos for e in pipe] == list(range(pipe[0].pos, pipe[0].pos + len(pipe))), "positions"
            depths = [e.depth for e in pipe]
            assert all(a == b + 1 for a, b in zip(depths, depths[1:])) and depths[0] < self.n, \
                f"{s.rid!r}: depths {depths} are not a staircase"
            for si, c in enumerate(self.caches):
                passed = [e.pos for e in pipe if e.depth > si]
                want = (max(passed) + 1) if passed else pipe[0].pos
                assert c.length(s.rid) == want, \
                    f"{s.rid!r}: stage {si} cache holds {c.length(s.rid)} positions, expected {want}"
            want_spec = pipe[0].pos - (1 if s.pending is not None else 0)
            assert s.spec_len == want_spec == self.pdm_cache.length(s.rid), \
                f"{s.rid!r}: PDM cache {self.pdm_cache.length(s.rid)} / {s.spec_len}, expected {want_spec}"
            for e in pipe:
                k = self.f[e.depth]
                assert not torch.isnan(e.anchors[:k + 1]).any(), f"{s.rid!r}: anchors missing at depth {e.depth}"
