"""bench/kernel_profile.py: each op call's time split by kernel (on a GPU the Triton kernels' device time, on a CPU
the profiler's operator self times)."""

import json

from conftest import DEVICE, backends_here

# the kernels one call launches on a GPU, once each
GPU_KERNELS = {"verify_greedy": ("_chunk_argmax_kernel", "_greedy_walk_kernel"),
               "rejection_sample": ("_row_stats_kernel", "_threshold_kernel", "_walk_kernel", "_tile_mass_kernel",
                                    "_draw_kernel")}


def test_kernel_profile_attributes_each_call_to_its_kernels(tmp_path):
    from spdkernels.bench.kernel_profile import main

    backend = "triton" if DEVICE == "cuda" else ("cpp" if "cpp" in backends_here() else "torch")
    out = tmp_path / "profile.json"
    assert main(["--device", DEVICE, "--op", "verify_greedy", "rejection_sample", "--shapes", "tiny", "--calls", "3",
                 "--backend", backend, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["backend"] == backend and res["calls"] == 3
    assert {c["op"] for c in res["cases"]} == {"verify_greedy", "rejection_sample"}
    for c in res["cases"]:
        assert c["total_us_per_call"] > 0
        launches = {k["kernel"]: k["launches_per_call"] for k in c["kernels"]}
        if DEVICE == "cuda":  # each of the op's kernels once per call (3 calls profiled: counts divided by 3)
            names = GPU_KERNELS[c["op"]]
            if "probs" in c["case"]:  # probability rows are used as given: no threshold search is launched
                assert "_threshold_kernel" not in launches, (c["case"], sorted(launches))
                names = tuple(n for n in names if n != "_threshold_kernel")
            for name in names:
                assert launches.get(name) == 1, (c["case"], sorted(launches))
        else:  # the op itself is one of the profiled operators, once per call
            assert launches.get(f"spdkernels::{c['op']}") == 1, (c["case"], sorted(launches))
