"""The speculative decoding engine: a batch of requests of different lengths decoded together.

One step, for every active request: the proposer drafts a token tree after the last committed token (the
root); one target forward pass runs ``[root, draft nodes...]`` with tree attention over the paged KV cache;
``verify_greedy`` (every request greedy) or ``rejection_sample`` (coupled verification of deterministic drafts:
every row sampled with position-keyed coins; rejection sampling of drafts that carry their q) picks the accepted
path and one more token; the cache keeps the root and the accepted nodes (moved next to the prefix) and rolls the rest
back. Autoregressive decoding is the same engine with no proposer: every step verifies just the root."""
from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import spdkernels
from spdkernels._validate import is_int, is_real

from .model import LlamaModel, build_batch, sync_device
from .proposers import Draft, Proposer
from .speculation import AdaptiveSpeculation

# The smallest non-zero temperature: below it, logits / T overflow fp32 (a NaN distribution); it is greedy already.
MIN_TEMPERATURE = 1e-6
# Coupled verification keys a token's coin by (seed, COUPLED_OFFSET + its position): offsets apart from those of
# rejection_sample's step-keyed coins (offset = the step), so no coin serves two decisions of one request.
COUPLED_OFFSET = 1 << 62


@dataclass
class SamplingParams:
    """``temperature`` 0 = greedy; ``top_k`` 0 and ``top_p`` 1 = off; ``seed`` keys the request's coins (with
    deterministic drafts, every proposer's but the PDM proposer's sampled chains, by each token's position: a seed
    gives the text autoregressive decoding gives with that seed, whatever the draft depths, the controller or the
    batch; see :meth:`Engine._verify_sampled`). ``None``, the default: every request draws a fresh seed when it
    is created, see :class:`Request`, and its :class:`Result` records it. ``stop``: strings that end the request
    (the text is cut before them); ``ignore_eos``: keep going past end-of-sequence tokens."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an integer >= 1, got {self.max_new_tokens!r}")
        if not (is_real(self.temperature) and 0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature: expected a finite number >= 0, got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / T would overflow fp32 into NaN probabilities
            raise ValueError(f"temperature: expected 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k: expected an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or not -2 ** 63 <= self.seed < 2 ** 63):
            raise ValueError(f"seed: expected a 64-bit integer or None (a fresh seed), got {self.seed!r}")
        if isinstance(self.stop, (str, bytes)) or not hasattr(self.stop, "__iter__"):
            raise ValueError(f"stop: expected a list of non-empty strings (not one string), got {self.stop!r}")
        self.stop = tuple(self.stop)  # (a set or a generator: read once, here)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop: expected non-empty strings, got {list(self.stop)!r}")


def check_engine_args(block_size, eos_token_ids) -> Optional[List[int]]:
    """The arguments every engine takes: ValueErrors naming a bad ``block_size`` (a power of two, the KV cache's
    page) or ``eos_token_ids``; returns the ids as a list (a generator is read once, here) or None."""
    if not is_int(block_size) or block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected a power of two, got {block_size!r}")
    if eos_token_ids is None:
        return None
    if isinstance(eos_token_ids, (str, bytes)) or not hasattr(eos_token_ids, "__iter__"):
        raise ValueError(f"eos_token_ids: expected a sequence of token ids or None, got {eos_token_ids!r}")
    eos_token_ids = list(eos_token_ids)
    if not all(is_int(t) for t in eos_token_ids):
        raise ValueError(f"eos_token_ids: expected token ids, got {eos_token_ids!r}")
    return eos_token_ids


def coupled_walk(draft: Draft):
    """Coupled verification of a deterministic draft, as a generator: it yields the node (-1 = the root) whose
    row's sample it needs next and is sent that sample (the target's token after the node). From the root, the
    child whose token is the sample is accepted and the walk goes on from it; the emitted tokens are the samples
    along the way, up to the first without such a child. Returns (emitted tokens, accepted node ids)."""
    child = {}
    for i, (p, t) in enumerate(zip(draft.parents, draft.tokens)):
        child.setdefault((p, t), i)  # (a repeated sibling token: the first is the one accepted)
    node, emitted, accepted = -1, [], []
    while True:
        tok = yield node
        emitted.append(tok)
        node = child.get((node, tok), -1)
        if node < 0:
            return emitted, accepted
        accepted.append(node)


def coupled_path(draft: Draft, samples: List[int]) -> Tuple[List[int], List[int]]:
    """:func:`coupled_walk` over known samples: ``samples[0]`` after the root, ``samples[1 + i]`` after node i."""
    walk = coupled_walk(draft)
    node = next(walk)
    try:
        while True:
            node = walk.send(samples[1 + node])
    except StopIteration as done:
        return done.value


def fresh_seed() -> int:
    """A seed for a request that did not choose one: 63 random bits from the OS (``secrets``), so unseeded
    requests never share coins and drawing one never touches torch's or Python's global generators."""
    return secrets.randbits(63)


def resolve_seed(req: Request) -> None:
    """Give ``req`` its own seed if its parameters leave it to chance (``seed=None``): its ``params`` becomes
    a copy with a fresh seed, so parameters shared by several requests are never changed and every request
    gets a different seed. Every engine, proposer and result then reads this one seed."""
    if isinstance(req.params, SamplingParams) and req.params.seed is None:
        req.params = dataclasses.replace(req.params, seed=fresh_seed())


@dataclass
class Request:
    """A prompt and its sampling parameters. An unseeded request (``params.seed`` None) draws its seed here,
    once, when it is created (or, if its parameters are replaced later, when an engine validates it)."""
    prompt_ids: List[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    rid: Optional[object] = None

    def __post_init__(self) -> None:
        resolve_seed(self)


@dataclass
class RequestMetrics:
    steps: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens emitted by verification (accepted + one per step), before truncation

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification step, the bonus/correction token included."""
        return self.emitted / self.steps if self.steps else 0.0


class RequestState:
    def __init__(self, req: Request, rid):
        self.rid = rid
        self.prompt = list(req.prompt_ids)
        self.params = req.params
        self.output: List[int] = []
        self.done = False
        self.finish_reason = ""
        self.text_cut: Optional[int] = None  # character index where a stop string begins
        self.metrics = RequestMetrics()

    @property
    def tokens(self) -> List[int]:
        """Prompt + output (a new list)."""
        return self.prompt + self.output

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]


@dataclass
class Result:
    rid: object
    prompt_ids: List[int]
    output_ids: List[int]
    text: Optional[str]
    finish_reason: str
    metrics: RequestMetrics
    seed: Optional[int] = None  # the seed the request's coins were keyed by (drawn when it was not given)


@dataclass
class RunMetrics(RequestMetrics):
    """The counters of :class:`RequestMetrics` summed over the requests (``steps`` = request-steps, so
    ``mean_accepted_length`` is per request and step), plus the run's wall-clock split."""
    engine_steps: int = 0  # one target forward each, over every active request
    new_tokens: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0  # target forward passes of the decode steps
    sampling_s: float = 0.0  # verify_greedy / rejection_sample
    bookkeeping_s: float = 0.0  # batch building, KV commit, stop checks

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> Dict[str, float]:
        return dict(dataclasses.asdict(self), tokens_per_s=self.tokens_per_s, acceptance_rate=self.acceptance_rate,
                    mean_accepted_length=self.mean_accepted_length)


class Engine:
    """``Engine(model, proposer=None).generate(requests)``. ``tokenizer`` (optional) decodes the outputs and
    applies stop strings; ``eos_token_ids`` default to the model config's. ``block_size``: KV page size.
    ``scrub_cache``: poison every KV entry past the committed length after each step (tests).
    ``speculation``: an :class:`AdaptiveSpeculation` that sets every request's draft depth per step from
    the measured verification cost and acceptance (None: the proposer's own depth).
    ``generate(requests, max_batch=N)`` keeps at most ``N`` requests in flight and admits the next one
    (prefill, then decoding with the others) as soon as one finishes: continuous batching, so a long
    request does not leave the batch nearly empty, and the KV cache holds ``N`` requests, not all."""

    def __init__(self, model: LlamaModel, proposer: Optional[Proposer] = None, tokenizer=None,
                 eos_token_ids: Optional[Sequence[int]] = None, block_size: int = 16, scrub_cache: bool = False,
                 validate_ops: bool = False, speculation: Optional[AdaptiveSpeculation] = None):
        if proposer is not None and not isinstance(proposer, Proposer):
            raise ValueError(f"proposer: expected a Proposer (spdkernels.runtime.proposers) or None, got "
                             f"{type(proposer).__name__}")
        if speculation is not None and not isinstance(speculation, AdaptiveSpeculation):
            raise ValueError(f"speculation: expected an AdaptiveSpeculation or None, got {type(speculation).__name__}")
        eos_token_ids = check_engine_args(block_size, eos_token_ids)
        self.model = model
        self.proposer = proposer
        self.speculation = speculation
        self.tokenizer = tokenizer
        self.eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.block_size = block_size
        self.scrub = scrub_cache
        self.validate_ops = validate_ops
        self.cache = None
        # called after each step with the number of tokens generated so far by all the run's requests
        self.on_step: Optional[Callable[[int], None]] = None
        self._run: List[RequestState] = []

    # -- public ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], max_batch: Optional[int] = None
                 ) -> Tuple[List[Result], RunMetrics]:
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                      or max_batch < 1):
            raise ValueError(f"max_batch: expected a positive int or None, got {max_batch!r}")
        if not requests:
            return [], RunMetrics()
        room = 1 + (self.proposer.max_nodes if self.proposer else 0)
        validate_requests(self.model.config, requests)
        bs = self.block_size
        need = sorted((-(-(len(r.prompt_ids) + r.params.max_new_tokens + room) // bs) + 1 for r in requests),
                      reverse=True)
        limit = len(requests) if max_batch is None else min(max_batch, len(requests))
        blocks = sum(need[:limit])  # room for the `limit` largest requests at once
        self.cache = cache = self.model.new_cache(blocks, bs, scrub=self.scrub)
        if self.proposer is not None:
            self.proposer.bind(self.model, cache)
        states = [RequestState(r, r.rid if r.rid is not None else i) for i, r in enumerate(requests)]
        check_unique_rids(requests, [s.rid for s in states])
        self._run = states
        # query tokens per draft level, for the speculation plan: the proposer's bound until drafts are seen
        self._tokens_per_level = self.proposer.max_nodes / self.proposer.max_depth if self.proposer else 1.0
        m = RunMetrics()
        old_validation = spdkernels.validation_enabled()
        spdkernels.set_validation(self.validate_ops)
        t_start = time.perf_counter()
        try:
            waiting = states[limit:][::-1]  # popped from the end: request order
            active = self._admit(states[:limit], m)
            while active or waiting:
                if active:
                    self._step(active, m)
                for s in active:
                    if s.done:
                        cache.release(s.rid)
                        if self.proposer is not None:
                            self.proposer.release(s)
                        if self.speculation is not None:
                            self.speculation.release(s.rid)
                active = [s for s in active if not s.done]
                if waiting and len(active) < limit:
                    active += self._admit([waiting.pop() for _ in range(min(limit - len(active), len(waiting)))], m)
        except BaseException:
            # an aborted run leaves nothing behind under its request ids, which a later run reuses (0, 1, ...)
            for s in states:
                if self.proposer is not None:
                    self.proposer.release(s)
                if self.speculation is not None:
                    self.speculation.release(s.rid)
            raise
        finally:
            spdkernels.set_validation(old_validation)
        self._sync()
        m.wall_s = time.perf_counter() - t_start
        return collect_results(states, self.tokenizer, m), m

    # -- internals ---------------------------------------------------------------------------------------
    def _admit(self, states: List[RequestState], m: RunMetrics) -> List[RequestState]:
        """Give ``states`` their cache entries and prefill them (timed into ``m.prefill_s``); returns those
        with tokens left to generate."""
        t0 = time.perf_counter()
        for st in states:
            self.cache.add(st.rid)
        self._prefill(states)
        self._sync()
        m.prefill_s += time.perf_counter() - t0
        return [s for s in states if not s.done]

    def _sync(self) -> None:
        """Wait for the device before reading a clock (CUDA work is asynchronous)."""
        sync_device(self.model.device)

    def _prefill(self, states: List[RequestState]) -> None:
        """Write the K/V of every prompt token but the last (the first step's root)."""
        cache = self.cache
        todo = [s for s in states if len(s.prompt) > 1]
        # chunks of whole prompts, so a big batch does not build one huge activation
        i = 0
        while i < len(todo):
            chunk, n = [], 0
            while i < len(todo) and (not chunk or n + len(todo[i].prompt) <= 2048):
                chunk.append(todo[i])
                n += len(todo[i].prompt) - 1
                i += 1
            toks, cu = [], [0]
            for s in chunk:
                toks += s.prompt[:-1]
                cu.append(cu[-1] + len(s.prompt) - 1)
            b = build_batch(cache, [s.rid for s in chunk], [0] * len(chunk),
                            [range(len(s.prompt) - 1) for s in chunk], toks)
            h0 = self.model.embed_tokens(b.token_ids)
            _, tapped = self.model.forward_layers(h0, b, cache, taps=self._tap_layers())
            anchors = self._anchors(h0, tapped)
            for j, s in enumerate(chunk):
                cache.set_length(s.rid, len(s.prompt) - 1)
                if anchors is not None:
                    self.proposer.observe(s, list(range(len(s.prompt) - 1)), anchors[cu[j]:cu[j + 1]])

    def _tap_layers(self) -> List[int]:
        """Model layer indices whose outputs the proposer wants (its ``taps`` are hidden-state indices:
        0 = the embedding, ``b`` = after ``b`` layers)."""
        taps = getattr(self.proposer, "taps", ()) if self.proposer is not None else ()
        return [b - 1 for b in taps if b > 0]

    def _anchors(self, h0: torch.Tensor, tapped: Dict[int, torch.Tensor]) -> Optional[torch.Tensor]:
        """``[T, len(taps), hidden]`` hidden states at the proposer's taps, or None when it wants none."""
        taps = getattr(self.proposer, "taps", ()) if self.proposer is not None else ()
        if not taps:
            return None
        return torch.stack([h0 if b == 0 else tapped[b - 1] for b in taps], dim=1)

    def _depth_limit(self, s: RequestState) -> int:
        left = s.params.max_new_tokens - len(s.output)
        ctx_left = self.model.config.max_position - len(s.prompt) - len(s.output)
        return max(0, min(left - 1, ctx_left - 1))

    def _step(self, active: List[RequestState], m: RunMetrics) -> None:
        cache, model = self.cache, self.model
        t0 = time.perf_counter()
        spec = self.speculation if self.proposer is not None else None
        if self.proposer is not None:
            limits = [min(self._depth_limit(s), self.proposer.max_depth) for s in active]  # (the plan's caps)
            if spec is not None:  # a tree's level adds several query tokens: as many as its recent drafts had
                limits = spec.plan([s.rid for s in active], limits, self._tokens_per_level)
            drafts = self.proposer.propose(active, limits)
        else:
            drafts = [Draft() for _ in active]
        self._sync()
        t1 = time.perf_counter()
        dev = model.device
        toks, starts, positions, cu, kv, cund, par, dtoks = [], [], [], [0], [], [0], [], []
        depths = []
        for s, d in zip(active, drafts):
            P = cache.length(s.rid)  # == len(s.tokens) - 1: the root is not in the cache yet
            ql = 1 + len(d)
            nd = [0]
            for p in d.parents:
                nd.append(1 + nd[p + 1])
            depths.append(max(nd))
            toks += [s.last_token] + d.tokens
            starts.append(P)
            positions.append([P + x for x in nd])
            cu.append(cu[-1] + ql)
            kv.append(P + ql)
            cund.append(cund[-1] + len(d))
            par += d.parents
            dtoks += d.tokens
        all_chains = all(d.is_chain() for d in drafts)
        batch = build_batch(cache, [s.rid for s in active], starts, positions, toks,
                            None if all_chains else [d.parents for d in drafts])
        cu_t, kv_t, block_table = batch.cu_q_lens, batch.kv_lens, batch.block_table
        cund_t = torch.tensor(cund, dtype=torch.int32, device=dev)
        par_t = None if all_chains else torch.tensor(par, dtype=torch.int32, device=dev)
        self._sync()
        t2 = time.perf_counter()
        h0 = model.embed_tokens(batch.token_ids)
        h, tapped = model.forward_layers(h0, batch, cache, taps=self._tap_layers())
        anchors = self._anchors(h0, tapped)
        logits = model.logits(h)
        if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            logits = logits.float()
        self._sync()
        t3 = time.perf_counter()
        if spec is not None:  # the draft time per planned level: the plan charges it per level it plans, and a
            # proposer may spend it without drafting (a model drafter whose chain was cut before its first token)
            spec.observe_step(len(toks), t3 - t2, max(limits, default=0), t1 - t0)
        draft_ids = torch.tensor(dtoks, dtype=torch.int64, device=dev)
        max_depth = max(depths)
        if sum(depths):  # (smoothed: one step's trees say little)
            seen = sum(len(d) for d in drafts) / sum(depths)
            self._tokens_per_level += 0.2 * (max(1.0, seen) - self._tokens_per_level)
        path_l = None
        if all(s.params.temperature == 0 for s in active):
            out, num, path = spdkernels.verify_greedy(logits, draft_ids, cund_t, par_t, max_depth=max_depth)
            out_l, num_l = out.tolist(), num.tolist()
        else:
            out_l, num_l, path_l = self._verify_sampled(active, drafts, logits, positions, cu, depths, max_depth)
            path = torch.tensor(path_l, dtype=torch.int32, device=dev).view(len(active), max_depth)
        self._sync()
        t4 = time.perf_counter()
        cache.commit([s.rid for s in active], block_table, kv_t, cu_t, path)
        if anchors is not None:  # the committed tokens (root + accepted path) for the proposer
            path_l = path.tolist() if path_l is None else path_l
            for j, (s, n) in enumerate(zip(active, num_l)):
                local = [0] + [1 + x for x in path_l[j][:n - 1]]
                P = kv[j] - (cu[j + 1] - cu[j])
                self.proposer.observe(s, list(range(P, P + len(local))),
                                      anchors[torch.tensor([cu[j] + x for x in local], device=anchors.device)])
        for s, d, o, n, dep in zip(active, drafts, out_l, num_l, depths):
            if spec is not None:
                spec.observe_request(s.rid, dep, n - 1)
            mt = s.metrics
            mt.steps += 1
            mt.drafted += len(d)
            mt.accepted += n - 1
            mt.emitted += n
            if self.proposer is not None:
                self.proposer.feedback(s, len(d), n - 1)
            self._append(s, o[:n])
        m.engine_steps += 1
        if self.on_step is not None:
            self.on_step(sum(len(s.output) for s in self._run))
        t5 = time.perf_counter()
        m.draft_s += t1 - t0
        m.verify_s += t3 - t2
        m.sampling_s += t4 - t3
        m.bookkeeping_s += (t2 - t1) + (t5 - t4)

    def _verify_sampled(self, active: List[RequestState], drafts: List[Draft], logits: torch.Tensor,
                        positions: List[List[int]], cu: List[int], depths: List[int], max_depth: int,
                        lazy: Optional[bool] = None):
        """Verification of a batch with sampled requests through ``rejection_sample``, chosen per request:

        * a draft that carries its q (drawn from a distribution: the PDM proposer's sampled chains) is verified by
          rejection sampling, its coins keyed by (seed, the request's step);
        * a deterministic draft (a point mass: every other proposer, greedy requests, empty drafts) is verified by
          coupling (:func:`coupled_walk`): the target's token after a node is its row sampled as a request without
          drafts, with a coin keyed by (seed, COUPLED_OFFSET + the position of that token), and a node is accepted
          iff it is its parent row's sample; the emitted tokens are the samples along the accepted path. Lossless:
          the token at each position is distributed as the target's filtered p, and a node is accepted with
          probability p(its token), as rejection sampling of a point mass gives (siblings: their p summed, as
          sequential rejection over point masses gives). Each emitted token is a function of (seed, position,
          prefix) only, so the request's text does not depend on the draft depths, the controller or the batch:
          it is the text of autoregressive decoding with that seed.

        ``lazy`` (default: on CPU): sample only the rows the walks reach, one call per level of the deepest walk
        (the rejection walk's work, with a host read per level); otherwise every row of every draft in the first
        call (one call and one host read; the spare rows are cheap on a GPU). Both give the same tokens.

        Returns per request the emitted tokens, their count and the accepted path (local node ids, -1 padded to
        ``max_depth``), as lists."""
        dev = logits.device
        lazy = dev.type == "cpu" if lazy is None else lazy
        carries_q = [d.probs is not None and len(d) > 0 for d in drafts]
        walks = {j: coupled_walk(d) for j, d in enumerate(drafts) if not carries_q[j]}
        wants = {j: [next(w)] if lazy else [-1, *range(len(drafts[j]))] for j, w in walks.items()}
        # the first call: the q-carrying drafts whole, and the coupled drafts' rows wanted
        rows, n_drafts, seeds, offsets, params = [], [], [], [], []
        toks, parents, probs, chains = [], [], [], True
        for j, (s, d) in enumerate(zip(active, drafts)):
            if carries_q[j]:
                rows += range(cu[j], cu[j + 1])
                n_drafts.append(len(d))
                seeds.append(s.params.seed)
                offsets.append(s.metrics.steps)
                params.append(s.params)
                toks += d.tokens
                parents += d.parents
                probs.append(d.probs)
                chains = chains and d.is_chain()
            else:
                for node in wants[j]:
                    rows.append(cu[j] + 1 + node)
                    n_drafts.append(0)
                    seeds.append(s.params.seed)
                    offsets.append(COUPLED_OFFSET + positions[j][1 + node] + 1)
                    params.append(s.params)
        q_depth = max((dep for q, dep in zip(carries_q, depths) if q), default=0)
        out, num, path = self._sample_rows(logits, rows, n_drafts, seeds, offsets, params, toks,
                                           None if chains else parents, probs, q_depth)
        results: Dict[int, Tuple[List[int], List[int]]] = {}
        r = 0  # the op's request
        samples: Dict[int, Dict[int, int]] = {j: {} for j in walks}
        for j in range(len(drafts)):
            if carries_q[j]:
                results[j] = (out[r][:num[r]], path[r][:num[r] - 1])
                r += 1
            else:
                for node in wants[j]:
                    samples[j][node] = out[r][0]
                    r += 1
        # the walks, level by level: each takes the samples it has and asks for the next (lazy: a call per level)
        node_of = {j: (next(w) if not lazy else wants[j][0]) for j, w in walks.items()}
        while walks:
            need = {}
            for j, w in list(walks.items()):
                try:
                    while node_of[j] in samples[j]:
                        node_of[j] = w.send(samples[j][node_of[j]])
                    need[j] = node_of[j]
                except StopIteration as done:
                    results[j] = done.value
                    del walks[j]
            if need:
                js = sorted(need)
                out, _, _ = self._sample_rows(
                    logits, [cu[j] + 1 + need[j] for j in js], [0] * len(js),
                    [active[j].params.seed for j in js],
                    [COUPLED_OFFSET + positions[j][1 + need[j]] + 1 for j in js],
                    [active[j].params for j in js], [], None, [], 0)
                for j, o in zip(js, out):
                    samples[j][need[j]] = o[0]
        out_l, num_l, path_l = [], [], []
        for j in range(len(drafts)):
            emitted, accepted = results[j]
            out_l.append(emitted)
            num_l.append(len(emitted))
            path_l.append(accepted + [-1] * (max_depth - len(accepted)))
        return out_l, num_l, path_l

    @staticmethod
    def _sample_rows(logits, rows, n_drafts, seeds, offsets, params, toks, parents, probs, max_depth):
        """One ``rejection_sample`` call over ``logits[rows]`` (every row when ``rows`` is all of them, in order)
        for requests of ``n_drafts`` drafts each; outputs read to the host, as lists."""
        dev = logits.device

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=dev)

        if rows != list(range(logits.shape[0])):
            logits = logits.index_select(0, tensor(rows, torch.int64))
        cund = [0]
        for n in n_drafts:
            cund.append(cund[-1] + n)
        out, num, path = spdkernels.rejection_sample(
            logits, tensor(toks, torch.int64), tensor(cund, torch.int32),
            parents=None if parents is None else tensor(parents, torch.int32),
            draft_probs=torch.cat(probs).to(device=dev, dtype=torch.float32) if probs else None,
            temperature=tensor([p.temperature for p in params], torch.float32),
            top_k=tensor([p.top_k for p in params], torch.int32),
            top_p=tensor([p.top_p for p in params], torch.float32),
            seed=tensor(seeds, torch.int64), offset=tensor(offsets, torch.int64), max_depth=max_depth)
        return out.tolist(), num.tolist(), path.tolist()

    def _append(self, s: RequestState, new: List[int]) -> None:
        append_tokens(s, new, self.eos, self.tokenizer)


def collect_results(states: Sequence[RequestState], tokenizer, m: RunMetrics) -> List[Result]:
    """The requests' results (text decoded and cut at a stop string), their counters summed into ``m``."""
    results = []
    for s in states:
        text = None
        if tokenizer is not None:
            text = tokenizer.decode(s.output)
            if s.text_cut is not None:
                text = text[:s.text_cut]
        results.append(Result(s.rid, s.prompt, s.output, text, s.finish_reason, s.metrics, s.params.seed))
        m.new_tokens += len(s.output)
        m.drafted += s.metrics.drafted
        m.accepted += s.metrics.accepted
        m.emitted += s.metrics.emitted
        m.steps += s.metrics.steps
    return results


def check_unique_rids(requests: Sequence[Request], rids: Sequence) -> None:
    """``ValueError`` naming ``rid`` when two requests share an id (a request without one is its list index)."""
    seen: Dict[object, int] = {}
    for i, rid in enumerate(rids):
        if rid in seen:
            a, b = (f"request {k} (rid={rid!r})" if requests[k].rid is not None
                    else f"request {k} (no rid: its index, {rid!r})" for k in (seen[rid], i))
            raise ValueError(f"rid: request ids must be unique: {a} and {b} share one "
                             "(a request without a rid takes its index in the list)")
        seen[rid] = i


def validate_requests(config, requests: Sequence[Request], extra: int = 0) -> None:
    """Sampling parameters, prompt ids and context room of every request (``ValueError`` naming the
    request). A request whose seed is still None gets a fresh one (:func:`resolve_seed`)."""
    for i, req in enumerate(requests):
        resolve_seed(req)
        req.params.validate()
        if not isinstance(req.prompt_ids, (list, tuple)):
            hint = " (a tensor or array: pass .tolist())" if hasattr(req.prompt_ids, "tolist") else ""
            raise ValueError(f"prompt_ids: request {i}: expected a list of token ids, got "
                             f"{type(req.prompt_ids).__name__}{hint}")
        if not req.prompt_ids:
            raise ValueError(f"prompt_ids: request {i} has an empty prompt")
        if not all(is_int(t) for t in req.prompt_ids):
            bad = next(t for t in req.prompt_ids if not is_int(t))
            raise ValueError(f"prompt_ids: request {i} holds {bad!r} ({type(bad).__name__}), expected integer ids")
        if any(not 0 <= t < config.vocab_size for t in req.prompt_ids):
            raise ValueError(f"prompt_ids: request {i} has token ids outside [0, {config.vocab_size})")
        if len(req.prompt_ids) + req.params.max_new_tokens + extra > config.max_position:
            raise ValueError(f"prompt_ids: request {i} needs {len(req.prompt_ids)} prompt + "
                             f"{req.params.max_new_tokens} new tokens, more than the model's context of "
                             f"{config.max_position}")


def append_tokens(s: RequestState, new: List[int], eos, tokenizer) -> None:
    """Commit tokens to a request, stopping at an end-of-sequence token, ``max_new_tokens`` or a stop
    string (the text is cut before it)."""
    p = s.params
    base = len(s.output)
    for t in new:
        s.output.append(t)
        if t in eos and not p.ignore_eos:
            s.done, s.finish_reason = True, "eos"
            break
        if len(s.output) >= p.max_new_tokens:
            s.done, s.finish_reason = True, "length"
            break
    if p.stop and tokenizer is not None and s.text_cut is None:
        text = tokenizer.decode(s.output)
        if any(stop in text for stop in p.stop):
            # Several tokens at once (an accepted draft run): end where one-token-at-a-time decoding would, at the
            # first token whose text completes a stop string (the text before this call held none), drop the
            # tokens after it, and cut the text where the earliest stop string it holds begins.
            for end in range(base + 1, len(s.output)):
                head = tokenizer.decode(s.output[:end])
                if any(stop in head for stop in p.stop):
                    text = head
                    del s.output[end:]
                    break
            s.text_cut = min(i for i in (text.find(stop) for stop in p.stop) if i >= 0)
            s.done, s.finish_reason = True, "stop"
