"""Cost-aware speculation length: the draft depth of every request, chosen per batch.

The best speculation length depends on the batch (Su, Giannoula and Pekhimenko, 2023): verifying k more
tokens is nearly free while the target forward is bound by reading the weights (small batches), and costs
in proportion once it is bound by compute (large batches), where long drafts that are mostly rejected slow
decoding down. :class:`AdaptiveSpeculation` measures both sides while the engine runs:

* **verification cost**: every step's target forward time against its query-token count ``T`` (the batch's
  roots plus draft nodes), fitted as ``a + b * T`` by exponentially weighted least squares; plus the
  proposer's time per draft level, ``c`` (zero for prompt lookup, one small forward for model drafters);
* **acceptance**: per request, the probability ``alpha`` that the next draft token is accepted given its
  parent was (each verified draft of depth d with a accepted tokens contributes a successes and, when
  a < d, one failure), exponentially weighted with a weak prior.

For a chain of depth k a request emits ``1 + alpha + ... + alpha^k`` tokens in expectation, so one more
level adds ``alpha^(k+1)``. Each step the controller adds draft levels greedily, always to the request
whose next level gains most, while the batch's expected tokens per second, ``sum E_r / (a + b T + c
max_depth)``, keeps rising. A request whose acceptance drops so low that no draft pays is probed with one
draft token every ``probe_every`` steps, so its estimate can recover.

The controller only sets depth limits: greedy outputs stay exactly those of the target model, and sampled
outputs keep the target's distribution. With deterministic drafts a seeded sampled request's coins are keyed
by its seed and each token's position (the engine's coupled verification), so its text is autoregressive
decoding's whatever depths the controller chooses. Drafts that carry their q (the PDM proposer's sampled
chains) are verified with coins keyed by the step: under the controller, whose depths follow measured timings
and the rest of the batch, such a seeded request is not reproducible token for token.
"""
from __future__ import annotations

import heapq
from typing import Dict, List, Sequence, Tuple


class AdaptiveSpeculation:
    """Per-batch draft depths from measured verification cost and per-request acceptance.

    Args:
        max_depth: upper bound of any request's draft depth (the proposer's own bound applies too).
        prior_acceptance: acceptance assumed before a request has been verified (weight ``prior_weight``
            observations).
        halflife: steps after which an observation counts half (cost fit and acceptance alike).
        probe_every: a request held at depth 0 drafts one token every this many steps.
        prior_token_cost: before two step sizes have been timed, the cost of one more query token as a
            fraction of a one-token forward.
    """

    def __init__(self, max_depth: int = 8, prior_acceptance: float = 0.6, prior_weight: float = 2.0,
                 halflife: float = 32.0, probe_every: int = 8, prior_token_cost: float = 0.05):
        if not isinstance(max_depth, int) or max_depth < 1:
            raise ValueError(f"max_depth: expected an integer >= 1, got {max_depth!r}")
        if not 0.0 < prior_acceptance < 1.0:
            raise ValueError(f"prior_acceptance: expected a value in (0, 1), got {prior_acceptance!r}")
        if not prior_weight > 0:
            raise ValueError(f"prior_weight: expected a positive value, got {prior_weight!r}")
        if not halflife > 0:
            raise ValueError(f"halflife: expected a positive number of steps, got {halflife!r}")
        if not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"probe_every: expected an integer >= 1, got {probe_every!r}")
        if not prior_token_cost >= 0:
            raise ValueError(f"prior_token_cost: expected a value >= 0, got {prior_token_cost!r}")
        self.max_depth = max_depth
        self.prior_acceptance, self.prior_weight = prior_acceptance, prior_weight
        self.decay = 0.5 ** (1.0 / halflife)
        self.probe_every = probe_every
        self.prior_token_cost = prior_token_cost
        # weighted sums of the verification fit: n, sum T, sum T^2, sum t, sum T t
        self._fit = [0.0] * 5
        self._sizes: set = set()
        self._draft = [0.0, 0.0]  # weighted sum of draft seconds, of draft levels
        self._acc: Dict[object, List[float]] = {}  # rid -> [successes, failures]
        self._idle: Dict[object, int] = {}  # rid -> steps spent at depth 0
        self.history: List[Tuple[int, int]] = []  # (requests, query tokens) of each planned step

    def describe(self) -> str:
        return f"adaptive k<={self.max_depth}"

    # -- estimates ---------------------------------------------------------------------------------------
    def acceptance(self, rid) -> float:
        s, f = self._acc.get(rid, (0.0, 0.0))
        return (s + self.prior_acceptance * self.prior_weight) / (s + f + self.prior_weight)

    def cost_model(self) -> Tuple[float, float, float]:
        """``(a, b, c)``: seconds per step = a + b * query tokens + c * draft levels (0, 0, 0 before any
        step was timed)."""
        n, sx, sxx, sy, sxy = self._fit
        if n <= 0:
            return 0.0, 0.0, 0.0
        c = self._draft[0] / self._draft[1] if self._draft[1] > 0 else 0.0
        var = sxx / n - (sx / n) ** 2
        if len(self._sizes) >= 2 and var > 1e-9:
            b = max(0.0, (sxy / n - sx / n * sy / n) / var)
            a = max(sy / n - b * sx / n, 1e-9)
        else:  # one step size seen: the prior slope b = prior_token_cost * a through its mean time
            a = (sy / n) / (1.0 + self.prior_token_cost * sx / n)
            b = self.prior_token_cost * a
        return a, b, c

    # -- planning ----------------------------------------------------------------------------------------
    def plan(self, rids: Sequence[object], caps: Sequence[int], tokens_per_level: float = 1.0) -> List[int]:
        """Draft depth limits for the requests of the next step (``caps``: the engine's own limits;
        ``tokens_per_level``: query tokens one more level adds, 1 for chains, up to the width for trees: the
        engine passes the share its recent drafts had, starting from its proposer's ``max_nodes / max_depth``)."""
        if not tokens_per_level >= 1.0:
            raise ValueError(f"tokens_per_level: expected >= 1, got {tokens_per_level!r}")
        caps = [max(0, min(c, self.max_depth)) for c in caps]
        k = [0] * len(rids)
        a, b, c = self.cost_model()
        if a <= 0:  # nothing timed yet: draft as deep as allowed, which also gives the fit two sizes
            k = list(caps)
        else:
            alpha = [self.acceptance(r) for r in rids]
            # max-heap of each request's next level gain alpha^(k+1) (ties: lowest index first)
            heap = [(-al, i) for i, al in enumerate(alpha) if caps[i] > 0]
            heapq.heapify(heap)
            E, T, depth = float(len(rids)), float(len(rids)), 0
            while heap:
                neg_g, i = heap[0]
                g = -neg_g
                if g <= 0.0:
                    break
                new_depth = max(depth, k[i] + 1)
                old_rate = E / (a + b * T + c * depth)
                new_rate = (E + g) / (a + b * (T + tokens_per_level) + c * new_depth)
                if new_rate <= old_rate:
                    break
                E, T, depth = E + g, T + tokens_per_level, new_depth
                k[i] += 1
                if k[i] < caps[i]:
                    heapq.heapreplace(heap, (neg_g * alpha[i], i))
                else:
                    heapq.heappop(heap)
        for i, r in enumerate(rids):  # probe requests that no draft pays for, now and then
            if k[i] == 0 and caps[i] > 0:
                idle = self._idle.get(r, 0) + 1
                if idle >= self.probe_every:
                    k[i], idle = 1, 0
                self._idle[r] = idle
            else:
                self._idle[r] = 0
        self.history.append((len(rids), len(rids) + sum(k)))
        return k

    # -- observations ------------------------------------------------------------------------------------
    def observe_step(self, query_tokens: int, verify_s: float, draft_levels: int, draft_s: float) -> None:
        """One step's target forward time for ``query_tokens`` tokens, and the proposer's time ``draft_s`` for
        the step whose plan allowed ``draft_levels`` levels (the deepest limit :meth:`plan` gave; the engine passes
        that, not the depth drafted, so a model drafter's forwards that ended in no token still count, and a
        proposer that mixes free lookups with model levels is charged its average cost per planned level, which
        is what the plan multiplies by)."""
        d = self.decay
        T = float(query_tokens)
        self._fit = [x * d for x in self._fit]
        for i, v in enumerate((1.0, T, T * T, verify_s, T * verify_s)):
            self._fit[i] += v
        self._sizes.add(query_tokens)
        if draft_levels > 0:
            self._draft = [self._draft[0] * d + draft_s, self._draft[1] * d + draft_levels]

    def observe_request(self, rid, depth: int, accepted: int) -> None:
        """A verified draft of ``depth`` levels of which ``accepted`` were accepted."""
        if depth <= 0:
            return
        s, f = self._acc.get(rid, (0.0, 0.0))
        d = self.decay
        self._acc[rid] = [s * d + accepted, f * d + (1.0 if accepted < depth else 0.0)]

    def release(self, rid) -> None:
        self._acc.pop(rid, None)
        self._idle.pop(rid, None)
