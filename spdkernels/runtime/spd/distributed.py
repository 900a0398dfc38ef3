"""Speculative Pipeline Decoding across processes (contract section 6, "Distributed layout").

World = ``n + 1`` ranks. Rank 0 holds the embedding, the final norm, the LM head and the PDM, and runs the
control loop (the schedule of :class:`~.schedule.SPDEngine`, whose cycle it reuses: only the PDM call, the
stage forwards and the prefill are replaced by messages). Rank ``s + 1`` holds stage ``s`` (its layers and
its KV cache; stage 0 also the embedding, to embed the token the control names).

Every cycle:

* rank 0 sends each worker the fixed-size control tensor (GO / DISCARD / ..., cycle id, the token entering
  stage 0, the position at every stage, the crop length), posts its receives of the stages' outputs, runs
  the PDM forward while the stages compute, waits for the token leaving the last stage, verifies it
  (``verify_greedy`` / ``rejection_sample`` through ``SPDEngine._verify``) and commits; the other stages'
  anchors are taken at the start of the next cycle, after its control is out (the next PDM needs them);
* stage ``s`` waits for the control, pre-posts the receive of the activation stage ``s - 1`` computes this
  cycle (double-buffered: it is used next cycle), takes its input (the activation received last cycle, or
  the embedded token at stage 0), runs its layers, and ``isend``s the output activation to stage ``s + 1``
  and the anchor hidden states it owns (plus, at the last stage, the final hidden state) to rank 0.

There is no barrier and one blocking wait per cycle on each rank (the control on workers, the outputs on
rank 0; sends are waited one cycle later, when they have long completed). After a rejection the next
control is DISCARD: every stage cuts its cache to the committed prefix (stage ``s`` drops the ``n - 1 - s``
younger tokens it processed) and drops the activation in flight to it. The "broadcast" is a star of ``n``
point-to-point messages rather than a collective, so that a hung or dead worker never blocks the control
of the others (tree and ring collectives relay through peers).

Every message carries the cycle id and position, checked by the receiver. Every wait has a deadline
(``timeout_s`` plus four times the running mean cycle time; the prefill gets six times ``timeout_s``): a
worker that dies (its connection closes), hangs or sends a wrong cycle id ends the run on every live rank
with a clear error, rank 0 sends ABORT to the others, joins them and terminates those that do not leave.
Workers ignore SIGINT; Ctrl-C in rank 0 shuts every rank down the same way.

Launch: :class:`DistributedSPD` (rank 0 in the calling process) starts the ``n`` workers with
``torch.multiprocessing`` (forkserver, which imports torch once for all of them; spawn where there is no
forkserver), setting ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` for them, and hands each one
only its stage's tensors (shared memory). Under ``torchrun`` (those variables
already set) nothing is spawned: rank 0 runs the command, the other ranks call :func:`worker_from_env`,
load the checkpoint and keep only their stage. Backends: gloo (CPU) and NCCL (one GPU per rank: rank ``r`` on
GPU ``r``, or ``LOCAL_RANK`` under torchrun; NCCL refuses two ranks on one GPU, so fewer than ``n + 1`` visible
GPUs is refused up front).

Between any two ranks a send is always posted before a receive whose message depends on it: NCCL runs the
sends and receives of one pair of ranks in order on one stream, so a receive posted first would block the send
its peer is waiting for (a deadlock). The protocol is request / response: rank 0 sends a control (and, at the
prefill, the prompt) and only then posts the receives of the replies."""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import signal
import socket
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

import spdkernels
from spdkernels._validate import is_int

from ..engine import Request, append_tokens, collect_results
from ..model import LlamaModel
from ..weights import LlamaConfig, StateDict
from .pdm import PipelineDraftModule
from .schedule import SPDEngine, SPDRunMetrics, _Entry, _SPDState

# control opcodes
OP_GO, OP_DISCARD, OP_PREFILL, OP_END, OP_PING, OP_SHUTDOWN, OP_ABORT = 1, 2, 3, 4, 5, 6, 7
# control layout: op, cycle id, crop length, prompt length T, token entering stage 0, cache blocks,
# abort culprit rank, abort reason, then the position at every stage (-1: idle)
C_OP, C_CYCLE, C_CROP, C_T, C_TOKEN, C_BLOCKS, C_CULPRIT, C_REASON, C_POS = range(9)
# message tags (gloo matches on them; NCCL keeps each pair's order, which the protocol also respects)
TAG_CTRL, TAG_ACT, TAG_OUT, TAG_TOKENS, TAG_STATS = 1, 2, 3, 4, 5
HEADER = 4  # int64 header of every activation/output message: cycle id, position, rows, magic
MAGIC = 0x5350D
REASONS = {1: "timed out", 2: "closed its connection (it exited or crashed)", 3: "sent a wrong cycle id",
           4: "failed", 5: "interrupted (Ctrl-C)"}
STATS = ("ctrl_wait", "input_wait", "compute", "compute_cpu", "send", "send_wait")
MAX_TIMEOUT_S = 3600.0  # the largest --dist-timeout / timeout_s accepted
PREFILL_S_PER_TOKEN = 0.01  # the prefill's deadlines grow by this much per prompt token (on top of 6 x timeout_s)


class SPDDistributedError(RuntimeError):
    """The distributed pipeline stopped: a rank died, hung, or broke the protocol."""


@dataclass
class PipelineSpec:
    """What every rank needs to know (sent to the workers through the store as JSON: never unpickled)."""
    n: int
    config: LlamaConfig
    stages: List[Tuple[int, int]]
    stage_taps: List[Dict[int, int]]  # per stage: model layer -> anchor index it produces
    dtype: str = "float32"
    block_size: int = 16
    backend: str = "gloo"
    threads: int = 1
    timeout_s: float = 5.0
    model_source: Optional[str] = None  # torchrun workers load the checkpoint from here (None: embedded)
    packed: bool = True  # LlamaModel(packed=...): CPU fp32 stages keep compact exact weights
    fault: Optional[Dict] = None  # tests: {"rank", "kind": die|hang|cycle, "cycle", "seconds"}
    validate_ops: bool = False  # the ops' value checks (host syncs) in the workers' stages

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["stage_taps"] = [sorted(t.items()) for t in self.stage_taps]  # JSON keys would become strings
        return json.dumps(d)

    @classmethod
    def from_json(cls, text) -> PipelineSpec:
        d = json.loads(text)
        d["config"] = LlamaConfig(**d["config"])
        d["stages"] = [tuple(x) for x in d["stages"]]
        d["stage_taps"] = [{int(k): int(v) for k, v in t} for t in d["stage_taps"]]
        return cls(**d)

    def prefill_deadline(self, T: int) -> float:
        """Seconds any rank waits on a prefill message for a ``T``-token prompt: the prefill of every stage and
        rank 0's PDM prefill run one after another, so the grace grows with the prompt."""
        return 6 * self.timeout_s + PREFILL_S_PER_TOKEN * T

    def out_rows(self, s: int) -> int:
        """Hidden-state rows stage ``s`` sends rank 0 per token: its anchors, + the final state (last stage)."""
        return len(self.stage_taps[s]) + (1 if s == self.n - 1 else 0)


def default_threads(n: int) -> int:
    """Threads per rank: the cores shared by the ``n + 1`` ranks (at least 1), so they never oversubscribe."""
    return max(1, (os.cpu_count() or 1) // (n + 1))


def _loopback_listener() -> Tuple[int, int]:
    """A listening socket on 127.0.0.1 only (the spawned pipeline is on one machine): (fd, port). The store
    server takes over the descriptor, so there is no window in which another process can take the port."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    port = s.getsockname()[1]
    return s.detach(), port


def check_timeout(timeout_s: float, name: str = "timeout_s") -> None:
    """A finite number of seconds in (0, MAX_TIMEOUT_S]."""
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and 0 < timeout_s <= MAX_TIMEOUT_S):
        raise ValueError(f"{name}: expected a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}, got {timeout_s}")


def check_nccl_devices(n: int) -> None:
    """NCCL needs one GPU per rank (a communicator refuses two ranks on one GPU): ``n + 1`` visible GPUs."""
    if not torch.cuda.is_available():
        raise ValueError(f"--dist-backend nccl: needs CUDA and {n + 1} GPUs (one per rank); CUDA is not available "
                         f"(torch {torch.__version__}); use --dist-backend gloo")
    have = torch.cuda.device_count()
    if have < n + 1:
        raise ValueError(f"--dist-backend nccl: --stages {n} needs {n + 1} GPUs (one per rank: NCCL refuses two ranks "
                         f"on one GPU), {have} visible")


def _local_rank(rank: int) -> int:
    """The GPU of ``rank``: ``LOCAL_RANK`` under torchrun, else the rank (one machine)."""
    return int(os.environ.get("LOCAL_RANK", rank)) if torchrun_rank() is not None else rank


# ---- communication ---------------------------------------------------------------------------------------
class _Link:
    """Point-to-point messages of one rank over a process group, with deadlines on every wait."""

    def __init__(self, spec: PipelineSpec, rank: int, store, device):
        self.rank, self.spec, self.device = rank, spec, device
        world = spec.n + 1
        timeout = datetime.timedelta(seconds=max(60.0, 12 * spec.timeout_s))
        if spec.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, world, timeout)
        elif spec.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            # NCCL's watchdog applies the group's timeout to every posted operation, an idle worker's posted
            # receive of the control included (it would kill the workers between two generate calls): the waits
            # poll their own deadlines (wait, below), so the watchdog gets the idle wait's year
            opts._timeout = datetime.timedelta(days=365)
            self.pg = dist.ProcessGroupNCCL(store, rank, world, opts)
        else:
            raise ValueError(f"backend: expected 'gloo' or 'nccl', got {spec.backend!r}")
        self.store = store

    def isend(self, t: torch.Tensor, dst: int, tag: int):
        try:
            return self.pg.send([t], dst, tag)
        except RuntimeError as e:  # the peer's connection is already gone
            raise _PeerError(dst, 2, f"sending: {_brief(str(e))}") from None

    def irecv(self, t: torch.Tensor, src: int, tag: int):
        try:
            return self.pg.recv([t], src, tag)
        except RuntimeError as e:
            raise _PeerError(src, 2, f"receiving: {_brief(str(e))}") from None

    def wait(self, work, timeout: float, peer: int, what: str) -> None:
        """Wait for ``work`` at most ``timeout`` seconds; raises :class:`_PeerError` naming the peer."""
        try:
            if self.spec.backend == "gloo":
                work.wait(datetime.timedelta(seconds=timeout))
            else:  # NCCL's wait does not block the host: poll
                end = time.monotonic() + timeout
                while not work.is_completed():
                    if time.monotonic() > end:
                        raise RuntimeError("Timed out waiting")
                    time.sleep(0.0001)
                exc = work.exception()  # a completed work may have failed (the peer or the communicator)
                if exc is not None:
                    raise _PeerError(peer, 4, f"{what}: {type(exc).__name__}: {_brief(str(exc))}"
                                     if str(exc) else f"{what}: {type(exc).__name__}")
        except RuntimeError as e:
            msg = str(e)
            reason = 1 if "Timed out" in msg or "timed out" in msg else 2
            raise _PeerError(peer, reason, f"{what}: {_brief(msg)}") from None


class _PeerError(Exception):
    def __init__(self, peer: int, reason: int, detail: str):
        super().__init__(detail)
        self.peer, self.reason, self.detail = peer, reason, detail


def _pack(header: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
    h = torch.tensor(list(header), dtype=torch.int64, device=rows.device).view(torch.uint8)
    return torch.cat([h, rows.contiguous().view(-1).view(torch.uint8)])


def _buffer(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.empty(HEADER * 8 + numel * torch.empty(0, dtype=dtype).element_size(), dtype=torch.uint8,
                       device=device)


def _unpack(buf: torch.Tensor, dtype: torch.dtype) -> Tuple[List[int], torch.Tensor]:
    header = buf[:HEADER * 8].view(torch.int64).tolist()
    return header, buf[HEADER * 8:].view(dtype)


_SOURCE_TAG = re.compile(r"\[[^\]\s]*\.(?:cc|cpp|h|hpp):\d+\]\s*")


def _brief(msg: str, limit: int = 200) -> str:
    """A communication library's error as one short clause: its first line, without the source-file tags gloo puts
    first (``[.../gloo/transport/tcp/pair.cc:537]``), up to its first sentence's end, at most ``limit`` characters
    cut at a word."""
    first = _SOURCE_TAG.sub("", (msg.splitlines() or [""])[0]).strip()
    end = first.find(". ")
    if end > 0:
        first = first[:end]
    if len(first) > limit:
        first = first[:limit].rsplit(" ", 1)[0] + " ..."
    return first


def _stage_name(rank: int) -> str:
    return "rank 0 (control)" if rank == 0 else f"rank {rank} (stage {rank - 1})"


# ---- workers ---------------------------------------------------------------------------------------------
class _StageWorker:
    """Rank ``s + 1``: stage ``s``'s layers and KV cache, driven by rank 0's control messages."""

    _batch = SPDEngine._batch  # the same batch construction as the single-process engine

    def __init__(self, spec: PipelineSpec, rank: int, weights: Dict[str, torch.Tensor], link: _Link, device):
        self.spec, self.rank, self.s, self.link = spec, rank, rank - 1, link
        s = self.s
        self.first, self.last = s == 0, s == spec.n - 1
        self.model = LlamaModel(spec.config, weights, dtype=spec.torch_dtype, device=device,
                                layers=spec.stages[s], head=False, packed=spec.packed)
        self.embed = (weights["model.embed_tokens.weight"].to(device, spec.torch_dtype).contiguous()
                      if self.first else None)
        self.taps = spec.stage_taps[s]
        self.tap_order = sorted(self.taps, key=self.taps.get)  # model layers, by anchor index
        self.H = spec.config.hidden_size
        self.cache = None
        self.cycle = 0  # the next control's expected cycle id
        self.act = None  # (work, buffer) of the activation in flight from stage s - 1
        self.sends: List = []  # (work, tensor, peer) of the last cycle's sends
        self.stats: List[List[float]] = []
        self.ema = 0.0
        self.t_last = None
        self.fired = False
        self.grace = 0.0  # after a prefill: its deadline, for the first control (rank 0's PDM prefill comes first)

    def _timeout(self) -> float:
        return max(self.spec.timeout_s + 4 * self.ema, self.grace)

    def _fault(self, kind: str) -> bool:
        """Tests: inject fault ``kind`` once, in the first cycle at or after the given control id where this
        stage computes."""
        f = self.spec.fault
        if f and f.get("rank") == self.rank and f.get("kind") == kind and self.cycle > f.get("cycle", 0) \
                and not self.fired:
            self.fired = True
            return True
        return False

    def run(self) -> None:
        spec, link = self.spec, self.link
        idle = True  # between requests: wait for the control without a deadline (rank 0 may be idle)
        ctrl = torch.empty(C_POS + spec.n, dtype=torch.int64, device=self.link.device)
        while True:
            t0 = time.perf_counter()
            w = link.irecv(ctrl, 0, TAG_CTRL)
            link.wait(w, 365 * 86400.0 if idle else self._timeout(), 0, "waiting for the control")
            c = ctrl.tolist()
            t1 = time.perf_counter()
            if c[C_CYCLE] != self.cycle and c[C_OP] != OP_ABORT:
                raise _PeerError(0, 3, f"control carries cycle {c[C_CYCLE]}, expected {self.cycle}")
            self.cycle = c[C_CYCLE] + 1
            for work, _, peer in self.sends:
                link.wait(work, self._timeout(), peer, "sending")
            self.sends = []
            t2 = time.perf_counter()
            op = c[C_OP]
            if op == OP_SHUTDOWN:
                return
            if op == OP_ABORT:
                raise _PeerError(0, 4, "ABORT")  # the reason is in the store
            if op == OP_PING:
                self._send(torch.tensor([c[C_CYCLE], -1, 0, MAGIC], dtype=torch.int64,
                                        device=link.device).view(torch.uint8), 0, TAG_OUT)
                continue
            if op == OP_END:
                self._drop_act()
                st = torch.tensor([[len(self.stats)] + [0.0] * (len(STATS) - 1)] + self.stats,
                                  dtype=torch.float64).to(link.device)
                w = link.isend(st, 0, TAG_STATS)
                link.wait(w, self._timeout(), 0, "sending the timings")
                self.stats, self.cache, idle = [], None, True
                continue
            if op == OP_PREFILL:
                idle = False
                self._prefill(c)
                continue
            # GO / DISCARD: one cycle
            self.grace = 0.0
            if self.t_last is not None:
                dt = t0 - self.t_last
                self.ema = dt if self.ema == 0 else 0.9 * self.ema + 0.1 * dt
            self.t_last = t0
            cycle = c[C_CYCLE]
            if op == OP_DISCARD:
                self._drop_act()
                self.cache.set_length(0, c[C_CROP])
            pos = c[C_POS + self.s]
            prev = self.act
            # pre-post the receive of what stage s - 1 computes this cycle (our input next cycle)
            self.act = None
            if not self.first and c[C_POS + self.s - 1] >= 0:
                buf = _buffer(self.H, spec.torch_dtype, link.device)
                self.act = (link.irecv(buf, self.rank - 1, TAG_ACT), buf)
            t3 = time.perf_counter()
            if pos < 0:
                if prev is not None:
                    raise _PeerError(0, 4, f"cycle {cycle}: an activation is in flight to an idle stage")
                self.stats.append([t1 - t0, 0.0, 0.0, 0.0, 0.0, t2 - t1])
                continue
            if self.first:
                h = torch.nn.functional.embedding(torch.tensor([c[C_TOKEN]], device=link.device), self.embed)
            else:
                if prev is None:
                    raise _PeerError(0, 4, f"cycle {cycle}: stage {self.s} has a token but no input in flight")
                link.wait(prev[0], self._timeout(), self.rank - 1, f"cycle {cycle}: waiting for the activation")
                header, payload = _unpack(prev[1], spec.torch_dtype)
                if header[0] != cycle - 1 or header[1] != pos or header[3] != MAGIC:
                    raise _PeerError(self.rank - 1, 3, f"cycle {cycle}: activation of cycle {header[0]} position "
                                     f"{header[1]}, expected cycle {cycle - 1} position {pos}")
                h = payload.view(1, self.H).clone()
            t4 = time.perf_counter()
            c4 = time.thread_time()
            if self._fault("cache"):  # tests: a stage cache that lost a position
                self.cache.set_length(0, self.cache.length(0) - 1)
            if self.cache.length(0) != pos:
                raise _PeerError(0, 4, f"cycle {cycle}: stage {self.s} cache holds {self.cache.length(0)} "
                                 f"positions, the token is at {pos}")
            b = self._batch(self.cache, [0], [[pos]])
            start, end = spec.stages[self.s]
            h, tapped = self.model.forward_layers(h, b, self.cache, start, end, taps=self.taps)
            self.cache.set_length(0, pos + 1)
            if self._fault("hang"):
                time.sleep(float(spec.fault.get("seconds", 3 * spec.timeout_s)))
            if self._fault("die"):
                os._exit(17)
            t5, c5 = time.perf_counter(), time.thread_time()
            tag_cycle = cycle + (7 if self._fault("cycle") else 0)  # a corrupted cycle id (tests)
            if not self.last:
                self._send(_pack([tag_cycle, pos, 1, MAGIC], h), self.rank + 1, TAG_ACT)
            rows = [tapped[i] for i in self.tap_order] + ([h] if self.last else [])
            if rows:
                self._send(_pack([tag_cycle, pos, len(rows), MAGIC], torch.cat(rows)), 0, TAG_OUT)
            t6 = time.perf_counter()
            self.stats.append([t1 - t0, t4 - t3, t5 - t4, c5 - c4, t6 - t5, t2 - t1])

    def _send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        self.sends.append((self.link.isend(t, dst, tag), t, dst))

    def _drop_act(self) -> None:
        """Consume the activation in flight to this stage (its token was dropped)."""
        if self.act is not None:
            self.link.wait(self.act[0], self._timeout(), self.rank - 1, "draining a dropped activation")
            self.act = None

    def _prefill(self, c: List[int]) -> None:
        """The prompt through this stage: its own KV shard, the output to the next stage, the anchors to
        rank 0 (the last stage also sends the final hidden state of the last prompt token)."""
        spec, link = self.spec, self.link
        T = c[C_T]
        deadline = self.grace = spec.prefill_deadline(T)
        self.cache = self.model.new_cache(c[C_BLOCKS], spec.block_size)
        self.cache.add(0)
        self.ema, self.t_last = 0.0, None
        if self.first:
            ids = torch.empty(T, dtype=torch.int64, device=link.device)
            link.wait(link.irecv(ids, 0, TAG_TOKENS), deadline, 0, "prefill: waiting for the prompt")
            h = torch.nn.functional.embedding(ids, self.embed)
        else:
            buf = _buffer(T * self.H, spec.torch_dtype, link.device)
            link.wait(link.irecv(buf, self.rank - 1, TAG_ACT), deadline, self.rank - 1,
                      "prefill: waiting for the activations")
            header, payload = _unpack(buf, spec.torch_dtype)
            if header[0] != c[C_CYCLE] or header[3] != MAGIC:
                raise _PeerError(self.rank - 1, 3, f"prefill activations of cycle {header[0]}, expected {c[C_CYCLE]}")
            h = payload.view(T, self.H).clone()
        b = self._batch(self.cache, [0], [list(range(T))])
        start, end = spec.stages[self.s]
        h, tapped = self.model.forward_layers(h, b, self.cache, start, end, taps=self.taps)
        self.cache.set_length(0, T)
        if not self.last:
            self._send(_pack([c[C_CYCLE], T, T, MAGIC], h), self.rank + 1, TAG_ACT)
        rows = [tapped[i] for i in self.tap_order] + ([h[-1:]] if self.last else [])
        if rows:
            self._send(_pack([c[C_CYCLE], T, len(rows), MAGIC], torch.cat(rows)), 0, TAG_OUT)


def _device_for(spec: PipelineSpec, rank: int):
    """NCCL: one GPU per rank (``LOCAL_RANK`` under torchrun, else the rank); gloo: the CPU."""
    if spec.backend == "nccl":
        check_nccl_devices(spec.n)
        d = torch.device("cuda", _local_rank(rank))
        torch.cuda.set_device(d)
        return d
    return torch.device("cpu")


def _stage_weights(spec: PipelineSpec, state_dict: Dict[str, torch.Tensor], s: int) -> Dict[str, torch.Tensor]:
    a, b = spec.stages[s]
    keep = [k for k in state_dict if k.startswith("model.layers.") and a <= int(k.split(".")[2]) < b]
    if s == 0:
        keep.append("model.embed_tokens.weight")
    if isinstance(state_dict, StateDict):  # with a GGUF file's blocks (a worker that loads the checkpoint itself;
        return state_dict.subset(keep)      # a spawned one is sent a plain dict: StateDict.__reduce__)
    return {k: state_dict[k] for k in keep}


def _exited(pid: Optional[int], grace_s: float = 0.1) -> bool:
    """Whether process ``pid`` (rank 0, on this machine) has exited: gone from /proc, or a zombie there, within
    ``grace_s`` (a killed process's connections close just before it turns zombie). False where that cannot be told
    (no pid: under torchrun; no /proc)."""
    if pid is None:
        return False
    end = time.monotonic() + grace_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        except (OSError, IndexError):
            return False
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)


def _worker_main(rank: int, world: int, addr: str, port: int, weights: Optional[Dict[str, torch.Tensor]],
                 agent_store: bool = False, rank0_pid: Optional[int] = None) -> None:
    """Entry point of a worker rank (spawned, or under torchrun with ``weights=None``). ``rank0_pid``: rank 0's
    process (spawned workers), whose store is not called once it has exited (each call would print a C++ stack
    trace of the broken connection)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: rank 0 shuts us down
    # SIGTERM keeps its default action (the process dies at once): a Python handler would only run once the
    # C++ wait it is blocked in returns, i.e. not before its deadline
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR=addr, MASTER_PORT=str(port))
    store = None
    code = 1
    try:
        store = dist.PrefixStore("spd", dist.TCPStore(addr, port, world, False, timeout=datetime.timedelta(
            seconds=120)))
        spec = PipelineSpec.from_json(store.get("spec").decode())
        torch.set_num_threads(spec.threads)
        spdkernels.set_validation(spec.validate_ops)  # (as every engine runs: off unless asked for)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        device = _device_for(spec, rank)
        if weights is None:  # torchrun: load the checkpoint (unless the CLI did), keep this stage's tensors
            from ..weights import load_checkpoint

            ck = _PRELOADED.pop(spec.model_source, None) or load_checkpoint(
                spec.model_source, dtype=spec.torch_dtype, keep_blocks=spec.packed and device.type == "cpu")
            weights = _stage_weights(spec, ck.state_dict, rank - 1)
            del ck
        store.set(f"ready/{rank}", "1")
        link = _Link(spec, rank, store, device)
        with torch.inference_mode():
            _StageWorker(spec, rank, weights, link, device).run()
        code = 0
    except _PeerError as e:
        msg = f"{_stage_name(e.peer)} {REASONS[e.reason]} ({e.detail})"
        reason = None
        if e.peer == 0 and e.reason == 2 and _exited(rank0_pid):  # rank 0 died: its store went with it
            store = None
        if store is not None and e.detail != "ABORT":  # our own finding (a timeout, say): rank 0 reads it at once
            _say(rank, msg, store, quiet=True)
        if store is not None:  # rank 0 stops the run by closing its connections: why is in the store
            try:
                store.wait(["abort"], datetime.timedelta(seconds=2))
                reason = store.get("abort").decode()
            except Exception:  # noqa: BLE001 - rank 0 itself is gone
                pass
        _say(rank, f"rank 0 aborted the pipeline: {reason}" if reason else msg, store)
    except SPDDistributedError as e:
        _say(rank, str(e), store)
    except Exception as e:  # noqa: BLE001 - any failure must end the process with a message
        _say(rank, f"{type(e).__name__}: {e}", store)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _say(rank: int, msg: str, store=None, quiet: bool = False) -> None:
    if not quiet:  # one write (print writes the line's end apart: two workers' lines would interleave)
        sys.stderr.write(f"spd {_stage_name(rank)}: error: {msg}\n")
        sys.stderr.flush()
    if store is not None:
        try:
            store.set(f"error/{rank}", msg)
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0
            pass


_PRELOADED: Dict = {}  # model source -> checkpoint the CLI loaded to check the prompts (torchrun workers)


def preload_checkpoint(source: Optional[str], ck) -> None:
    """Hand a torchrun worker the checkpoint already loaded (the CLI checks the prompts on every rank)."""
    _PRELOADED[source] = ck


def take_preloaded(source: Optional[str]):
    return _PRELOADED.pop(source, None)


def worker_from_env() -> int:
    """A worker rank under ``torchrun`` (``RANK`` >= 1, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _worker_main(rank, world, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None)
    return 0  # not reached: the worker exits the process


def torchrun_rank() -> Optional[int]:
    """This process's rank when launched by torchrun (or with the variables set by hand), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_PORT" in os.environ:
        return int(os.environ["RANK"])
    return None


# ---- rank 0 ----------------------------------------------------------------------------------------------
def _close_ref(ref) -> None:
    """atexit: close the pipeline if it still exists (a weak reference: the registration keeps nothing alive)."""
    eng = ref()
    if eng is not None:
        eng.close()


@dataclass
class DistSPDRunMetrics(SPDRunMetrics):
    """:class:`SPDRunMetrics` measured across processes, plus the per-cycle split of every rank: rank 0's
    cycle wall time, control sends, PDM, waits for the exiting token and for the other anchors, verify; per
    stage the compute (wall and CPU), the wait for its input and for the control; the p2p round trip."""
    ranks: int = 0
    threads: int = 0
    backend: str = ""
    cycle_wall_s: float = 0.0
    ctrl_s: float = 0.0
    wait_exit_s: float = 0.0
    wait_rest_s: float = 0.0
    stage_cpu_s: List[float] = field(default_factory=list)
    stage_input_wait_s: List[float] = field(default_factory=list)
    stage_ctrl_wait_s: List[float] = field(default_factory=list)
    slowest_stage_cpu_s: float = 0.0
    p2p_rtt_s: float = 0.0  # median round trip of a control to every worker and an empty reply back

    def as_dict(self) -> Dict[str, float]:
        d = super().as_dict()
        c = max(self.cycles, 1)
        d.update(cycle_ms=1e3 * self.cycle_wall_s / c, ctrl_ms_per_cycle=1e3 * self.ctrl_s / c,
                 wait_exit_ms_per_cycle=1e3 * self.wait_exit_s / c, wait_rest_ms_per_cycle=1e3 * self.wait_rest_s / c,
                 stage_cpu_ms_per_cycle=[1e3 * s / c for s in self.stage_cpu_s],
                 slowest_stage_cpu_ms_per_cycle=1e3 * self.slowest_stage_cpu_s / c,
                 stage_input_wait_ms_per_cycle=[1e3 * s / c for s in self.stage_input_wait_s],
                 p2p_rtt_ms=1e3 * self.p2p_rtt_s, decode_tokens_per_s=self.decode_tokens_per_s)
        return d

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens committed by cycles per second of cycles (the prefill's first token and time excluded)."""
        return self.steps / self.cycle_wall_s if self.cycle_wall_s else 0.0


class DistributedSPD(SPDEngine):
    """SPD with one process per stage. ``DistributedSPD(config, state_dict, pdm, n).generate(requests)``
    runs the requests one after another over the same workers (started at the first call or by
    :meth:`start`, stopped by :meth:`close` or the context manager). ``pdm`` may be built on any model with
    this checkpoint's head. Rank 0 keeps only the embedding, final norm, LM head and the PDM; each worker
    gets only its stage's tensors. ``threads`` per rank default to the cores over ``n + 1`` (at least 1).
    ``lookup``: as in :class:`SPDEngine` (prompt-lookup drafts where the newest tokens occur earlier, made on rank 0).
    ``timeout_s``: the grace of every wait beyond four running mean cycle times."""

    def __init__(self, config: LlamaConfig, state_dict: Dict[str, torch.Tensor], pdm: PipelineDraftModule, n: int,
                 tokenizer=None, eos_token_ids: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float32,
                 block_size: int = 16, backend: str = "gloo", threads: Optional[int] = None, timeout_s: float = 5.0,
                 debug: bool = False, model_source: Optional[str] = None, fault: Optional[Dict] = None, lookup=None,
                 packed: bool = True, validate_ops: bool = False):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
        if threads is not None and (not is_int(threads) or threads < 1):
            raise ValueError(f"threads: expected an integer >= 1 or None, got {threads!r}")
        check_timeout(timeout_s)
        if backend == "nccl":
            check_nccl_devices(n)  # before anything lands on a GPU
        self.rank0_device = torch.device("cuda", _local_rank(0)) if backend == "nccl" else torch.device("cpu")
        head = LlamaModel(config, state_dict, dtype=dtype, device=self.rank0_device, layers=(0, 0), head=True,
                          packed=packed)
        super().__init__(head, pdm, n, tokenizer=tokenizer, eos_token_ids=eos_token_ids, block_size=block_size,
                         debug=debug, lookup=lookup, validate_ops=validate_ops)  # (the lookup drafts on rank 0)
        self.state_dict = state_dict
        self.spec = PipelineSpec(n=n, config=config, stages=self.stages, stage_taps=self.stage_taps,
                                 dtype=str(dtype).replace("torch.", ""), block_size=block_size, backend=backend,
                                 threads=threads or default_threads(n), timeout_s=float(timeout_s),
                                 model_source=model_source, fault=fault, packed=packed,
                                 validate_ops=bool(validate_ops))
        self.link: Optional[_Link] = None
        self.procs: List = []
        self.store = None
        self.port: Optional[int] = None
        self.cycle_id = 0
        self.closed = False
        self._prefilling = 0  # the prompt length while the prefill runs (its waits get the prefill deadline)
        self._atexit = None
        self._reset_request()

    def describe(self) -> str:
        lk = self.lookup
        return (f"spd n={self.n} L_s={self.pdm.num_layers} distributed ({self.spec.backend}, {self.n + 1} ranks)"
                + (f" + lookup n={lk.min_ngram}..{lk.max_ngram}" if lk is not None else ""))

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> DistributedSPD:
        """Start the workers (spawned, or the other torchrun ranks) and connect to them. A failure (a worker
        that dies or does not start, a process group that cannot form) shuts every rank down and raises
        :class:`SPDDistributedError` with the reason."""
        if self.link is not None:
            return self
        if self.closed:
            raise SPDDistributedError("this pipeline was shut down; make a new DistributedSPD")
        env_rank = torchrun_rank()
        if env_rank is not None and (env_rank != 0 or int(os.environ["WORLD_SIZE"]) != self.n + 1):
            raise ValueError(f"WORLD_SIZE: --stages {self.n} needs {self.n + 1} ranks and this process as rank 0, "
                             f"got rank {env_rank} of {os.environ['WORLD_SIZE']}")
        with self._guard():
            self._start(env_rank is not None)
        return self

    @contextlib.contextmanager
    def _guard(self):
        """Any failure inside: every worker is told (ABORT), joined or terminated, and the failure raised as
        :class:`SPDDistributedError` naming the culprit (Ctrl-C: the same shutdown, then KeyboardInterrupt)."""
        try:
            yield
        except _PeerError as e:
            raise self._abort(e.peer, e.reason, e.detail) from None
        except KeyboardInterrupt:
            self._abort(0, 5, "Ctrl-C")
            raise
        except SPDDistributedError:
            if not self.closed:
                self._abort(0, 4, "stopped")
            raise
        except BaseException as e:
            raise self._abort(0, 4, f"{type(e).__name__}: {e}") from e

    def _start(self, torchrun: bool) -> None:
        spec, world = self.spec, self.n + 1
        timeout = datetime.timedelta(seconds=120)
        if torchrun:
            addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                base = dist.TCPStore(addr, port, world, False, timeout=timeout)
            else:
                base = dist.TCPStore(addr, port, world, True, timeout=timeout, wait_for_workers=False)
        else:  # one machine: the store listens on the loopback interface only
            fd, port = _loopback_listener()
            addr = "127.0.0.1"
            base = dist.TCPStore(addr, port, world, True, timeout=timeout, wait_for_workers=False,
                                 master_listen_fd=fd)
        self.port = port
        self.store = dist.PrefixStore("spd", base)
        self.store.set("spec", spec.to_json())
        if not torchrun:
            import torch.multiprocessing as mp

            # forkserver: the workers fork from a server that imported torch once (spawn re-imports it per
            # worker: seconds each); both give the workers a fresh process and shared-memory weights
            if "forkserver" in mp.get_all_start_methods():
                ctx = mp.get_context("forkserver")
                ctx.set_forkserver_preload(["torch", __name__])
            else:
                ctx = mp.get_context("spawn")
            for r in range(1, world):
                p = ctx.Process(target=_worker_main, args=(r, world, addr, port, _stage_weights(
                    spec, self.state_dict, r - 1), False, os.getpid()), daemon=True, name=f"spd-rank{r}")
                p.start()
                self.procs.append(p)
        # wait for every worker to load its stage (dead workers fail fast)
        end = time.monotonic() + 300
        ready = [f"ready/{r}" for r in range(1, world)]
        while not self.store.check(ready):
            dead = [r for r, p in enumerate(self.procs, 1) if not p.is_alive()]
            if dead:
                time.sleep(0.1)  # its message may be on its way to the store
                raise _PeerError(dead[0], 2, f"exited with code {self.procs[dead[0] - 1].exitcode} during start-up")
            if time.monotonic() > end:
                raise _PeerError(0, 1, "the workers did not load their stages within 300 s")
            time.sleep(0.02)
        # a script that never calls close() still shuts its workers down cleanly; a weak reference, so that
        # the registration does not keep the pipeline (and its store's port) alive
        self._atexit = functools.partial(_close_ref, weakref.ref(self))
        atexit.register(self._atexit)
        self.link = _Link(spec, 0, self.store, self.rank0_device)
        self.p2p_rtt_s = self._ping()

    def close(self) -> None:
        """Shut the workers down (a SHUTDOWN control to each, tolerating dead ones), join them, release the
        store (and its port). Idempotent."""
        if self.link is not None and not self.closed:
            grace = min(2.0, self.spec.timeout_s)
            pending = getattr(self, "_ctrl_sends", [])  # the last control's sends
            self._ctrl_sends = []
            t = self._ctrl(OP_SHUTDOWN)
            for r in range(1, self.n + 1):  # each worker on its own: a dead one does not stop the others'
                try:
                    pending.append((self.link.isend(t, r, TAG_CTRL), r))
                except _PeerError:
                    pass
            for w, r in pending:
                try:
                    self.link.wait(w, grace, r, "shutting down")
                except _PeerError:
                    pass  # that worker is gone (joined or terminated below)
        if any(p.is_alive() for p in self.procs):
            self._kill_workers(self.spec.timeout_s)
        self.closed = True
        self.link = None
        self.store = None
        self._unregister_atexit()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _kill_workers(self, grace: float) -> None:
        """Join the spawned workers; terminate (then kill) those still alive after ``grace`` seconds."""
        end = time.monotonic() + grace
        for p in self.procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)

    @property
    def exitcodes(self) -> List[Optional[int]]:
        return [p.exitcode for p in self.procs]

    def _worker_errors(self, what: str = "") -> str:
        """What the workers left in the store; those that only stopped on rank 0's abort (``what``) named together,
        not each with the whole message again."""
        errs, on_abort = [], []
        for r in range(1, self.n + 1):
            try:
                if self.store is not None and self.store.check([f"error/{r}"]):
                    msg = self.store.get(f"error/{r}").decode()
                    if what and msg == f"rank 0 aborted the pipeline: {what}":
                        on_abort.append(_stage_name(r))
                    else:
                        errs.append(f"{_stage_name(r)}: {msg}")
            except Exception:  # noqa: BLE001 - best effort
                pass
        if on_abort:
            errs.append(f"{', '.join(on_abort)} stopped on rank 0's abort")
        return "; ".join(errs)

    def _abort(self, culprit: int, reason: int, detail: str) -> SPDDistributedError:
        """Tell every live worker to stop, join them (terminate the ones that hang), build the error. The
        reason goes to the store first: a gloo timeout closes all of a rank's connections, which is what the
        workers see (their next wait fails at once), and they read why from the store."""
        who = _stage_name(culprit) if culprit > 0 else "rank 0"
        own = self._own_error(culprit) if reason in (1, 2) and culprit > 0 else None
        # the cycle: the one the detail names (what rank 0 was waiting for), else the last control rank 0 sent
        # (cycle_id counts the controls sent, pings and prefill included, and runs ahead of the cycle in flight)
        named = re.match(r"cycle (\d+)\b", detail)
        cycle = int(named.group(1)) if named else max(self.cycle_id - 1, 0)
        if own is not None:  # it left on an error of its own (its timeout, say): name it and say why
            what = f"{who} stopped at cycle {cycle}: {own}"
        else:
            what = f"{who} {REASONS.get(reason, 'failed')}{'' if named else f' at cycle {cycle}'} ({detail})"
        try:
            self.store.set("abort", what)
        except Exception:  # noqa: BLE001 - best effort
            pass
        if self.link is not None:
            for r in range(1, self.n + 1):
                try:
                    t = self._ctrl(OP_ABORT)
                    t[C_CULPRIT], t[C_REASON] = culprit, reason
                    self._poll(self.link.isend(t, r, TAG_CTRL), 0.5)
                except (_PeerError, RuntimeError):
                    pass
        if self.procs:
            self._kill_workers(min(2.0, self.spec.timeout_s))
        self.link, self.closed = None, True
        time.sleep(0.05)
        others = self._worker_errors(what)
        self._unregister_atexit()
        return SPDDistributedError(f"distributed SPD stopped: {what}" + (f"; workers: {others}" if others else ""))

    def _unregister_atexit(self) -> None:
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None

    def _own_error(self, rank: int, grace: float = 0.5) -> Optional[str]:
        """The message a worker whose connection closed left in the store (None: it died without one)."""
        if self.store is None:
            return None
        end = time.monotonic() + grace
        while True:
            try:
                if self.store.check([f"error/{rank}"]):
                    return self.store.get(f"error/{rank}").decode()
            except Exception:  # noqa: BLE001 - best effort
                return None
            if time.monotonic() > end:
                return None
            time.sleep(0.02)

    # -- messages ----------------------------------------------------------------------------------------------
    def _ctrl(self, op: int) -> torch.Tensor:
        t = torch.full((C_POS + self.n,), -1, dtype=torch.int64)
        t[C_OP], t[C_CYCLE], t[C_CROP], t[C_T], t[C_TOKEN], t[C_BLOCKS], t[C_CULPRIT], t[C_REASON] = \
            op, self.cycle_id, 0, 0, 0, 0, 0, 0
        return t.to(self.rank0_device)

    def _send_ctrl(self, t: torch.Tensor) -> None:
        self._wait_ctrl_sends()
        self._ctrl_sends = [(self.link.isend(t, r, TAG_CTRL), r) for r in range(1, self.n + 1)]
        self._ctrl_buf = t
        self.cycle_id += 1

    def _wait_ctrl_sends(self) -> None:
        for w, r in getattr(self, "_ctrl_sends", []):
            self.link.wait(w, self._timeout(), r, "sending the control")
        self._ctrl_sends = []

    def _timeout(self) -> float:
        if self._prefilling:
            return self.spec.prefill_deadline(self._prefilling)
        return self.spec.timeout_s + 4 * self._ema

    def _ping(self, rounds: int = 20) -> float:
        """Median round trip: a control to every worker, an empty reply from each."""
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            cyc = self.cycle_id
            self._send_ctrl(self._ctrl(OP_PING))  # the send first, then the receive of the reply (NCCL)
            bufs = [torch.empty(HEADER * 8, dtype=torch.uint8, device=self.rank0_device) for _ in range(self.n)]
            works = [self.link.irecv(b, r, TAG_OUT) for r, b in enumerate(bufs, 1)]
            for r, (w, b) in enumerate(zip(works, bufs), 1):
                self.link.wait(w, 6 * self.spec.timeout_s, r, "ping")
                if b.view(torch.int64)[0].item() != cyc:
                    raise _PeerError(r, 3, "ping reply of another cycle")
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def _post_outputs(self, positions: Sequence[int], T: int = 1) -> None:
        """Receives of this cycle's stage outputs (stages that hold a token and send rows)."""
        cyc = self.cycle_id - 1
        self._outs = {}
        for s in range(self.n):
            rows = self.spec.out_rows(s)
            if positions[s] < 0 or rows == 0:
                continue
            count = (len(self.stage_taps[s]) * T + (1 if s == self.n - 1 else 0)) * self.H
            buf = _buffer(count, self.model.dtype, self.rank0_device)
            self._outs[s] = (self.link.irecv(buf, s + 1, TAG_OUT), buf, cyc, positions[s])

    @staticmethod
    def _poll(work, timeout: float) -> None:
        """Wait without a gloo timeout (which would close every connection of this rank)."""
        end = time.monotonic() + timeout
        while not work.is_completed() and time.monotonic() < end:
            time.sleep(0.001)

    def _take_output(self, s: int, posted: Optional[Tuple] = None) -> torch.Tensor:
        w, buf, cyc, pos = self._outs.pop(s) if posted is None else posted
        self.link.wait(w, self._timeout(), s + 1, f"cycle {cyc}: waiting for stage {s}")
        header, payload = _unpack(buf, self.model.dtype)
        if header[0] != cyc or header[1] != pos or header[3] != MAGIC:
            raise _PeerError(s + 1, 3, f"cycle {cyc}: output of cycle {header[0]} position {header[1]}, expected "
                             f"cycle {cyc} position {pos}")
        return payload.view(-1, self.H).clone()

    # -- the schedule ------------------------------------------------------------------------------------------
    @property
    def H(self) -> int:
        return self.model.config.hidden_size

    def _reset_request(self) -> None:
        self._prev_pos = [-1] * self.n
        self._ema = 0.0
        self._rec: List[List[float]] = []
        self._cur: List[float] = []
        self._outs = {}
        self._deferred: List[Tuple] = []  # (stage, posted receive, entry): anchors not needed before the next PDM

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request]) -> Tuple[list, DistSPDRunMetrics]:
        """The requests one after another over the same workers; results and :class:`DistSPDRunMetrics`."""
        m = DistSPDRunMetrics(n=self.n, stage_s=[0.0] * self.n, stage_cpu_s=[0.0] * self.n,
                              stage_input_wait_s=[0.0] * self.n, stage_ctrl_wait_s=[0.0] * self.n,
                              ranks=self.n + 1, threads=self.spec.threads, backend=self.spec.backend)
        requests = list(requests)  # (a generator is read once, here)
        if not requests:
            return [], m
        states = self._states(requests)
        self.start()  # (its failures go through the same shutdown as the run's)
        m.p2p_rtt_s = self.p2p_rtt_s
        old_threads = torch.get_num_threads()
        torch.set_num_threads(self.spec.threads)  # rank 0 is one of the n + 1 ranks sharing the cores
        old_validation = spdkernels.validation_enabled()
        spdkernels.set_validation(self.validate_ops)  # (as SPDEngine: the ops' value checks off unless asked for)
        t0 = time.perf_counter()
        try:
            with self._guard():
                for st, r in zip(states, requests):
                    self._one(st, r, m)
        finally:
            torch.set_num_threads(old_threads)
            spdkernels.set_validation(old_validation)
        m.wall_s = time.perf_counter() - t0
        results = collect_results(states, self.tokenizer, m)
        m.request_cycles = sum(s.metrics.cycles for s in states)
        m.lookup_drafted = sum(s.metrics.lookup_drafted for s in states)
        m.lookup_accepted = sum(s.metrics.lookup_accepted for s in states)
        return results, m

    def _one(self, st: _SPDState, r: Request, m: DistSPDRunMetrics) -> None:
        bs = self.block_size
        blocks = -(-(len(r.prompt_ids) + r.params.max_new_tokens + self.n + 2) // bs) + 1
        self._reset_request()
        self.pdm_cache = self.pdm.new_cache(blocks, bs)
        self.pdm_cache.add(st.rid)
        t0 = time.perf_counter()
        self._dist_prefill(st, blocks)
        m.prefill_s += time.perf_counter() - t0
        scratch = SPDRunMetrics(n=self.n, stage_s=[0.0] * self.n)  # _cycle's own counters: ours come from _account
        while not st.done:
            t = time.perf_counter()
            self._cycle([st], scratch)
            dt = time.perf_counter() - t
            self._cur[0] = dt
            self._rec.append(self._cur)
            self._ema = dt if self._ema == 0 else 0.9 * self._ema + 0.1 * dt
        if self._rec:
            self._rec[-1][4] += self._drain()
        self.pdm_cache.release(st.rid)
        # the end of the request: workers drop what is in flight and send their per-cycle timings
        cycles = len(self._rec)
        self._send_ctrl(self._ctrl(OP_END))  # the send first, then the receives of the replies (NCCL)
        bufs = [torch.empty((cycles + 1) * len(STATS), dtype=torch.float64, device=self.rank0_device)
                for _ in range(self.n)]
        works = [self.link.irecv(b, s + 1, TAG_STATS) for s, b in enumerate(bufs)]
        for s, (w, b) in enumerate(zip(works, bufs)):
            self.link.wait(w, self._timeout(), s + 1, "waiting for the timings")
            if int(b[0]) != cycles:
                raise _PeerError(s + 1, 3, f"timings of {int(b[0])} cycles, expected {cycles}")
        self._account(m, [b.view(cycles + 1, len(STATS))[1:].cpu() for b in bufs])

    def _account(self, m: DistSPDRunMetrics, stats: List[torch.Tensor]) -> None:
        rec = torch.tensor(self._rec, dtype=torch.float64).view(-1, 6)
        # rank 0 per cycle: wall, control, PDM, wait for the exit, wait for the rest, verify
        m.cycles += rec.shape[0]
        m.engine_steps = m.cycles
        m.cycle_wall_s += float(rec[:, 0].sum())
        m.ctrl_s += float(rec[:, 1].sum())
        m.pdm_s += float(rec[:, 2].sum())
        m.draft_s += float(rec[:, 2].sum())
        m.wait_exit_s += float(rec[:, 3].sum())
        m.wait_rest_s += float(rec[:, 4].sum())
        m.exit_verify_s += float(rec[:, 5].sum())
        m.sampling_s += float(rec[:, 5].sum())
        comp = torch.stack([st[:, STATS.index("compute")] for st in stats], 1)  # [cycles, n]
        cpu = torch.stack([st[:, STATS.index("compute_cpu")] for st in stats], 1)
        for s, st in enumerate(stats):
            m.stage_s[s] += float(st[:, STATS.index("compute")].sum())
            m.stage_cpu_s[s] += float(st[:, STATS.index("compute_cpu")].sum())
            m.stage_input_wait_s[s] += float(st[:, STATS.index("input_wait")].sum())
            m.stage_ctrl_wait_s[s] += float(st[:, STATS.index("ctrl_wait")].sum())
        slow = comp.max(1).values
        m.slowest_stage_s += float(slow.sum())
        m.slowest_stage_cpu_s += float(cpu.max(1).values.sum())
        m.slack_s += float((slow - rec[:, 2]).sum())
        m.verify_s += float(rec[:, 3].sum() + rec[:, 4].sum())

    def _dist_prefill(self, st: _SPDState, blocks: int) -> None:
        """The prompt through the pipeline (each stage fills its own KV shard), the anchors of every prompt
        position into the PDM cache, the first token from the target (as ``SPDEngine._prefill``)."""
        model, pdm, T = self.model, self.pdm, len(st.prompt)
        ctrl = self._ctrl(OP_PREFILL)
        ctrl[C_T], ctrl[C_BLOCKS] = T, blocks
        ctrl[C_POS:] = T
        positions = [T] * self.n
        self._prefilling = T
        try:
            # every send to a stage before any receive from it (NCCL): the control, the prompt, then the outputs
            self._send_ctrl(ctrl)
            ids = torch.tensor(st.prompt, dtype=torch.int64, device=self.rank0_device)
            tok_work = self.link.isend(ids, 1, TAG_TOKENS)
            self._post_outputs(positions, T)
            h0 = model.embed_tokens(ids)
            anchors = h0.new_full((T, self.m + 1, self.H), float("nan"))
            anchors[:, 0] = h0
            self.link.wait(tok_work, self._timeout(), 1, "prefill: sending the prompt")
            last = None
            for s in range(self.n - 1, -1, -1):
                if s not in self._outs:
                    continue
                rows = self._take_output(s)
                k = len(self.stage_taps[s])
                for j, layer in enumerate(sorted(self.stage_taps[s], key=self.stage_taps[s].get)):
                    anchors[:, self.stage_taps[s][layer]] = rows[j * T:(j + 1) * T]
                if s == self.n - 1:
                    last = rows[k * T:]
        finally:
            self._prefilling = 0
        first = self._sample_first([st], self._target_logits(last))
        g = pdm.completed_rows(anchors, [T])
        b = self._batch(self.pdm_cache, [st.rid], [list(range(T))])
        pdm.tower.forward_layers(g, b, self.pdm_cache)
        self.pdm_cache.set_length(st.rid, T)
        st.spec_len = T
        st.last_done = anchors[T - 1].clone()
        if self.debug:
            st.done_rows = list(anchors.clone())
        append_tokens(st, first, self.eos, self.tokenizer)
        if not st.done:
            e = model.embed_tokens(torch.tensor(first, device=self.rank0_device))[0]
            st.pipeline = [_Entry(T, first[0], e, self.m)]
        self._prev_pos = [-1] * self.n  # the prefill's activations were consumed in the prefill

    def _pdm_forward(self, active: List[_SPDState]) -> torch.Tensor:
        """Send this cycle's control, post the receives of the stages' outputs, then run the PDM (which
        overlaps the stage forwards)."""
        st = active[0]
        t0 = time.perf_counter()
        positions = [-1] * self.n
        token = 0
        for e in st.pipeline:
            positions[e.depth] = e.pos
            if e.depth == 0:
                token = e.token
        stale = any(self._prev_pos[s - 1] >= 0 and positions[s] != self._prev_pos[s - 1] for s in range(1, self.n))
        ctrl = self._ctrl(OP_DISCARD if stale else OP_GO)
        ctrl[C_CROP] = st.pipeline[0].pos if stale else 0
        ctrl[C_TOKEN] = token
        ctrl[C_POS:] = torch.tensor(positions)
        self._send_ctrl(ctrl)
        self._post_outputs(positions)
        self._prev_pos = positions
        t1 = time.perf_counter()
        drained = self._drain()  # last cycle's anchors from the stages before the last (long arrived, usually)
        t2 = time.perf_counter()
        logits = super()._pdm_forward(active)
        t3 = time.perf_counter()
        self._cur = [0.0, t1 - t0, t3 - t2, 0.0, drained, 0.0]
        return logits

    def _drain(self) -> float:
        """Take the deferred outputs of the stages before the last into their tokens' anchors (a dropped
        token's too: every message is consumed). Returns the time it took."""
        t0 = time.perf_counter()
        for s, posted, e in self._deferred:
            rows = self._take_output(s, posted)
            for j, layer in enumerate(sorted(self.stage_taps[s], key=self.stage_taps[s].get)):
                e.anchors[self.stage_taps[s][layer]] = rows[j]
        self._deferred = []
        return time.perf_counter() - t0

    def _check(self, states) -> None:
        self._cur[4] += self._drain()  # debug: the invariants look at every anchor
        super()._check(states)

    def _stage_forwards(self, active: List[_SPDState], m) -> float:
        """Wait for the token leaving the last stage (its final state and anchors: it is verified now) and
        advance the tokens in flight; the other stages' anchors are taken at the next PDM forward."""
        st = active[0]
        t0 = time.perf_counter()
        for e in st.pipeline:
            s = e.depth
            if s in self._outs:
                if s == self.n - 1:
                    rows = self._take_output(s)
                    for j, layer in enumerate(sorted(self.stage_taps[s], key=self.stage_taps[s].get)):
                        e.anchors[self.stage_taps[s][layer]] = rows[j]
                    e.h = rows[-1]
                else:
                    self._deferred.append((s, self._outs.pop(s), e))
            e.depth += 1
        self._cur[3] = time.perf_counter() - t0
        return 0.0

    def _verify(self, exits):
        t0 = time.perf_counter()
        out = super()._verify(exits)
        self._cur[5] = time.perf_counter() - t0
        return out


# ---- the report -----------------------------------------------------------------------------------------
def cost_model(m: DistSPDRunMetrics, cores: Optional[int] = None) -> Dict[str, float]:
    """Section 6's cost model from the measured parts: cycle = slowest stage + communication + verify
    (+ rank 0's own bookkeeping), tokens per cycle from acceptance ``1 / (alpha + n (1 - alpha))``; and,
    when the ranks share fewer cores than they are, the bound ``(sum of stage CPU + PDM + verify) / cores``."""
    c = max(m.cycles, 1)
    n, a = m.n, m.acceptance_rate
    stage = m.slowest_stage_s / c
    stage_cpu = m.slowest_stage_cpu_s / c
    comm = m.p2p_rtt_s
    verify = m.exit_verify_s / c
    pdm = m.pdm_s / c
    model_cycle = max(stage_cpu + comm, m.ctrl_s / c + pdm) + verify
    tpc = 1.0 / (a + n * (1 - a)) if m.drafted else 0.0
    d = dict(cycle_ms=1e3 * m.cycle_wall_s / c, slowest_stage_ms=1e3 * stage, slowest_stage_cpu_ms=1e3 * stage_cpu,
             comm_ms=1e3 * comm, ctrl_ms=1e3 * m.ctrl_s / c, verify_ms=1e3 * verify, pdm_ms=1e3 * pdm,
             slack_ms=1e3 * (stage_cpu - pdm),
             model_cycle_ms=1e3 * model_cycle, tokens_per_cycle=m.tokens_per_cycle, model_tokens_per_cycle=tpc,
             model_tokens_per_s=tpc / model_cycle if model_cycle else 0.0,
             measured_tokens_per_s=m.decode_tokens_per_s)
    if cores:
        work = sum(m.stage_cpu_s) / c + pdm + verify
        d.update(cores=cores, cores_bound_cycle_ms=1e3 * max(model_cycle, work / cores),
                 cores_bound_tokens_per_s=tpc / max(model_cycle, work / cores) if model_cycle else 0.0)
    return d


def format_report(m: DistSPDRunMetrics, ar_tokens_per_s: Optional[float] = None, cores: Optional[int] = None) -> str:
    """Where the cycle goes on every rank, the slack, and the cost model next to the measurement."""
    c = max(m.cycles, 1)
    cm = cost_model(m, cores)
    ms = [f"{1e3 * x / c:.2f}" for x in m.stage_s]
    cpu = [f"{1e3 * x / c:.2f}" for x in m.stage_cpu_s]
    inw = [f"{1e3 * x / c:.2f}" for x in m.stage_input_wait_s]
    lines = [
        f"--- distributed SPD n={m.n}: {m.ranks} ranks ({m.backend}, {m.threads} thread(s) each), {m.cycles} cycles, "
        f"{m.steps} verifications, acceptance {m.acceptance_rate:.2f}, tokens/cycle {m.tokens_per_cycle:.2f}",
        f"    rank 0 per cycle: {cm['cycle_ms']:.2f} ms = control {1e3 * m.ctrl_s / c:.2f} + PDM {cm['pdm_ms']:.2f} + "
        f"wait exit {1e3 * m.wait_exit_s / c:.2f} + wait others (deferred) {1e3 * m.wait_rest_s / c:.2f} + verify "
        f"{cm['verify_ms']:.2f} + bookkeeping",
        f"    stages per cycle: compute wall [{', '.join(ms)}] ms, CPU [{', '.join(cpu)}] ms, input wait "
        f"[{', '.join(inw)}] ms; slowest {cm['slowest_stage_ms']:.2f} ms wall, {cm['slowest_stage_cpu_ms']:.2f} ms "
        f"CPU; slack (slowest stage CPU - PDM) {cm['slack_ms']:.2f} ms; p2p round trip {cm['comm_ms']:.2f} ms",
        f"    cost model: cycle = max(slowest stage {cm['slowest_stage_cpu_ms']:.2f} + comm {cm['comm_ms']:.2f}, "
        f"control + PDM {cm['ctrl_ms'] + cm['pdm_ms']:.2f}) + verify {cm['verify_ms']:.2f} = "
        f"{cm['model_cycle_ms']:.2f} ms (measured "
        f"{cm['cycle_ms']:.2f}); tokens/cycle from acceptance {cm['model_tokens_per_cycle']:.2f} (measured "
        f"{cm['tokens_per_cycle']:.2f}); {cm['model_tokens_per_s']:.1f} tok/s (measured "
        f"{cm['measured_tokens_per_s']:.1f})"]
    if cores:
        lines.append(f"    {m.ranks} ranks on {cores} cores: the cycle cannot be shorter than (all stages' CPU + PDM + "
                     f"verify) / cores = {cm['cores_bound_cycle_ms']:.2f} ms -> "
                     f"{cm['cores_bound_tokens_per_s']:.1f} tok/s")
    if ar_tokens_per_s:
        lines.append(f"    autoregressive {ar_tokens_per_s:.1f} tok/s: measured speedup "
                     f"{cm['measured_tokens_per_s'] / ar_tokens_per_s:.2f}x, cost model "
                     f"{cm['model_tokens_per_s'] / ar_tokens_per_s:.2f}x")
    return "\n".join(lines)
