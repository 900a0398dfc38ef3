"""Validation off must never mean memory corruption: malformed inputs (draft tokens outside the vocabulary,
``cu`` not starting at 0 / decreasing / past N, parents out of range, block-table entries outside the cache,
``kv_lens`` past the table or below the query length, a tree mask too narrow) give a ValueError naming the
argument on the ``torch``, ``cpp`` and ``nki`` (emulated) backends, and a defined result on ``triton`` (its kernels
clamp every index they follow: no host sync, so no error) (``verify_greedy`` only compares draft tokens, so one outside
the vocabulary is a defined result there: never accepted), from the always-on index checks (csrc/common.h
``check_draft_batch``, csrc/tree_attention.cpp ``check_layout``, ``_validate.check_draft_batch_indices``).

Each batch runs in a child process (``python -m spdkernels.testing.fuzz``), so a crash shows as a signal
instead of killing the test run; the planted variant shows that the harness reports one."""
import os
import subprocess
import sys

import pytest

from spdkernels.testing.fuzz import ADAPTER_OPS, ATTN_CORRUPTIONS, DRAFT_CORRUPTIONS

# the argument each corruption must be reported against
EXPECTED = {"token_ge_V": "draft_token_ids", "token_negative": "draft_token_ids", "token_huge": "draft_token_ids",
            "cu_not_monotone": "cu_num_draft", "cu_last_too_big": "cu_num_draft", "cu_first_negative": "cu_num_draft",
            "cu_huge": "cu_num_draft", "parent_out_of_range": "parents", "parent_below_minus_one": "parents",
            "parent_self_or_later": "parents", "block_id_ge_num_blocks": "block_table",
            "block_id_negative": "block_table", "kv_len_past_table": "block_table", "kv_len_negative": "kv_lens",
            "cu_q_not_monotone": "cu_q_lens", "cu_q_last_too_big": ("cu_q_lens", "kv_lens"),
            "kv_len_below_q_len": "kv_lens", "mask_too_narrow": "tree_mask"}


def _run(args, timeout=600, **env):
    # the child inherits the environment (make sanitize runs these children under its sanitizers too)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))


# nki: its launchers read the batch on the host anyway, and make the torch backend's index checks there
@pytest.mark.parametrize("backend", ["torch", "cpp", "nki"])
@pytest.mark.parametrize("op", ["verify_greedy", "rejection_sample", "tree_attention"])
def test_malformed_inputs_with_validation_off_give_value_errors(op, backend):
    if backend == "cpp":
        from spdkernels import _cpp

        if not _cpp.load():
            pytest.skip(f"C++ extension unavailable: {_cpp.load_error()}")
    count = 3 * len(ATTN_CORRUPTIONS if op == "tree_attention" else DRAFT_CORRUPTIONS)
    p = _run(["-m", "spdkernels.testing.fuzz", "--op", op, "--backend", backend, "--count", str(count),
              "--seed", "11"], **({"SPDKERNELS_NKI_EMULATE": "1"} if backend == "nki" else {}))
    lines = [x for x in p.stdout.splitlines() if x.startswith("case ")]
    assert p.returncode == 0, f"the child died (rc {p.returncode}) after: {lines[-1:]}\n{p.stderr[-2000:]}"
    assert len(lines) == count
    for line in lines:
        _, _, name, verdict = line.split(" ", 3)
        name = name.rstrip(":")
        if op == "verify_greedy" and name.startswith("token_"):  # only compared: never accepted, no error
            assert verdict == "ok", line
            continue
        want = EXPECTED[name]
        want = want if isinstance(want, tuple) else (want,)
        assert verdict.startswith("error: ValueError: ") and verdict.split(": ")[2] in want, line


@pytest.mark.parametrize("op", ["verify_greedy", "rejection_sample", "tree_attention"])
def test_triton_kernels_guard_their_indices_with_validation_off(op):
    """The Triton kernels clamp every index they follow (no host sync, so no error either): a malformed batch gives
    a defined result or a static ValueError, never a crash. Under the interpreter an unguarded read this far out of
    bounds (cu offsets of 2^30, block ids of 2^20) kills the child, as the planted variant below shows (and as the
    unguarded verify_greedy and rejection_sample kernels did at the 2^30 cu case)."""
    count = 2 * len(ATTN_CORRUPTIONS if op == "tree_attention" else DRAFT_CORRUPTIONS)
    p = _run(["-m", "spdkernels.testing.fuzz", "--op", op, "--backend", "triton", "--count", str(count),
              "--seed", "11"])
    lines = [x for x in p.stdout.splitlines() if x.startswith("case ")]
    assert p.returncode == 0, f"the child died (rc {p.returncode}) after: {lines[-1:]}\n{p.stderr[-2000:]}"
    assert len(lines) == count
    for line in lines:
        verdict = line.split(" ", 3)[3]
        assert verdict == "ok" or verdict.startswith("error: ValueError: "), line


def test_an_unguarded_triton_read_kills_the_interpreter_child():
    """The planted variant of the test above: a Triton kernel reading 2^30 elements past its tensor, under the
    interpreter, dies (so the test above would see an unguarded kernel)."""
    code = ("import os; os.environ['TRITON_INTERPRET'] = '1'\n"
            "import torch, triton, triton.language as tl\n"
            "@triton.jit\n"
            "def k(x, o, off):\n"
            "    tl.store(o, tl.load(x + off))\n"
            "print('case 0 planted: ', end='', flush=True)\n"
            "k[(1,)](torch.zeros(16), torch.zeros(1), 1 << 30)\n"
            "print('ok')\n")
    p = _run(["-c", code])
    assert p.returncode != 0 and "ok" not in p.stdout


def test_the_harness_reports_a_crash():
    """The planted variant: a child that dies by a signal is seen as a failure, not a pass."""
    p = _run(["-c", "import ctypes; print('case 0 planted: ', end='', flush=True); ctypes.string_at(0)"])
    assert p.returncode < 0 and p.stdout.startswith("case 0 planted")


@pytest.mark.parametrize("backend", ["cpp", "torch"], ids=["fused", "generic"])
@pytest.mark.parametrize("op", ADAPTER_OPS)
def test_adapters_with_malformed_integers_never_crash(op, backend):
    """The adapters' own integer arguments (sgl-kernel's tree links and flat indices, drafted tokens, vLLM's counts)
    with one entry poked to an edge value (2^62, -2^62, -2, 2^31, ...), validation off, through the fused C++ ops
    (cpp) and the generic path (torch): a ValueError naming an argument, or a result; never a crash or another
    error type."""
    if backend == "cpp":
        from spdkernels import _cpp

        if not _cpp.load():
            pytest.skip(f"C++ extension unavailable: {_cpp.load_error()}")
    count = 60
    p = _run(["-m", "spdkernels.testing.fuzz", "--op", op, "--backend", backend, "--count", str(count),
              "--seed", "5"])
    lines = [x for x in p.stdout.splitlines() if x.startswith("case ")]
    assert p.returncode == 0, f"the child died (rc {p.returncode}) after: {lines[-1:]}\n{p.stderr[-2000:]}"
    assert len(lines) == count
    errors = [x for x in lines if "error:" in x]
    assert errors, "no case was refused: the corruptions do not reach the checks"
    for line in errors:
        assert "error: ValueError: " in line, line
