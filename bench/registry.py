"""Registry of benchmarked ops: each op module registers one :class:`OpBench`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

Case = Dict[str, Any]


@dataclass
class OpBench:
    name: str
    shape_sets: Dict[str, List[Case]]  # named sets of cases; "default" is required
    make_inputs: Callable[[Case, str], Any]  # (case, device) -> inputs
    run: Callable[[Any], Any]  # inputs -> outputs, through the public op (the registry picks the backend)
    bytes_moved: Callable[[Case], int]  # compulsory HBM/DRAM traffic of one call
    check: Callable[[Any, Any], str]  # (outputs, reference outputs) -> "" if equal, else what differs
    label: Callable[[Case], str]  # readable id of a case, e.g. "R16-k4-V32000-fp32-chain"
    baselines: Dict[str, Callable[[Any], Any]] = field(default_factory=dict)  # extra non-backend rows
    baseline_check: bool = True  # baselines give outputs comparable with `check`
    # (baseline name, device) -> whether that baseline runs there
    baseline_available: Callable[[str, str], bool] = lambda name, device: True
    # bytes that depend on the data (e.g. only the rows a walk visits): (case, reference outputs) -> bytes
    bytes_from_ref: Optional[Callable[[Case, Any], int]] = None
    # the op whose backends this bench times, when its name is not an op's (the adapters' rows)
    backend_op: Optional[str] = None
    # bytes a given backend actually moves, where its kernels read more than the op's compulsory traffic (e.g. the
    # Triton sampler reads every logit row, not only the rows a walk visits): (case, reference outputs, backend) ->
    # bytes, or None for the default count; so that a row's fraction of copy bandwidth means the same for every backend
    bytes_for_backend: Optional[Callable[[Case, Any, str], Optional[int]]] = None


OPS: Dict[str, OpBench] = {}


def register(bench: OpBench) -> OpBench:
    OPS[bench.name] = bench
    return bench


def load_all() -> Dict[str, OpBench]:
    from . import adapters, rejection_sample, tree_attention, verify_greedy  # noqa: F401  (each registers itself)

    return OPS
