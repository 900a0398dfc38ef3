"""bench/kernel_profile.py: each op call's time split by kernel (on a CPU: the profiler's operator self times)."""

import json

from conftest import DEVICE, backends_here


def test_kernel_profile_attributes_each_call_to_the_op(tmp_path):
    from spdkernels.bench.kernel_profile import main

    backend = "cpp" if "cpp" in backends_here() else "torch"
    out = tmp_path / "profile.json"
    assert main(["--device", DEVICE, "--op", "verify_greedy", "rejection_sample", "--shapes", "tiny", "--calls", "3",
                 "--backend", backend, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["backend"] == backend and res["calls"] == 3
    ops = {c["op"] for c in res["cases"]}
    assert ops == {"verify_greedy", "rejection_sample"}
    for c in res["cases"]:
        ks = c["kernels"]
        assert ks and c["total_us_per_call"] > 0
        assert abs(sum(k["us_per_call"] for k in ks) - c["total_us_per_call"]) < 1e-6 * c["total_us_per_call"] + 1e-9
        assert [k["us_per_call"] for k in ks] == sorted((k["us_per_call"] for k in ks), reverse=True)
        if DEVICE == "cpu":  # the op itself is one of the profiled operators, once per call
            op = next(k for k in ks if k["kernel"] == f"spdkernels::{c['op']}")
            assert op["launches_per_call"] == 1
