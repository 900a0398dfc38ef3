// pybind11 module spdkernels._C: the CPU backend. Every entry point releases the GIL.
#include <pybind11/pybind11.h>

#include "common.h"
#include "verify_greedy.h"

namespace spd {
void rejection_sample(std::uintptr_t, int, int64_t, int64_t, std::uintptr_t, int, std::uintptr_t, std::uintptr_t,
                      std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                      std::uintptr_t, int64_t, int64_t, int64_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                      std::uintptr_t, int, int, int);
std::pair<double, float> target_weights_row(std::uintptr_t, int, int64_t, float, int64_t, float, std::uintptr_t);
void skinny_linear_f32(std::uintptr_t, int64_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int64_t,
                       int64_t, int64_t, int);
void tree_attention(std::uintptr_t, int, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                    std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                    int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t, int64_t,
                    int64_t, int64_t, int64_t, int64_t, int);
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "spdkernels CPU backend (raw-pointer kernels; see spdkernels/_cpp.py for the calling side)";
#ifdef SPD_HAVE_OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
  m.def("isa_level", &spd::isa_level,
        "instruction-set level of the hand-dispatched kernels: 0 baseline x86-64, 1 AVX2 + FMA, 2 AVX-512");
  m.def("set_isa_cap", &spd::set_isa_cap, py::arg("level"),
        "cap the level isa_level() may return (the CPU's own limit still applies)");
  m.def("verify_greedy", &spd::verify_greedy, py::call_guard<py::gil_scoped_release>(),
        py::arg("logits"), py::arg("logit_code"), py::arg("row_stride"), py::arg("V"), py::arg("draft_ids"),
        py::arg("tok_code"), py::arg("cu_num_draft"), py::arg("parents"), py::arg("R"), py::arg("N"), py::arg("max_depth"),
        py::arg("out_tokens"), py::arg("num_emitted"), py::arg("accepted_path"), py::arg("num_threads"));
  m.def("rejection_sample", &spd::rejection_sample, py::call_guard<py::gil_scoped_release>());
  m.def("target_weights", &spd::target_weights_row, py::call_guard<py::gil_scoped_release>(), py::arg("logits"),
        py::arg("logit_code"), py::arg("V"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("out"), "one row's kept weights and (mass, threshold), as the sampler computes them (tests)");
  m.def("skinny_linear_f32", &spd::skinny_linear_f32, py::call_guard<py::gil_scoped_release>(), py::arg("x"),
        py::arg("ldx"), py::arg("w"), py::arg("bias"), py::arg("y"), py::arg("ldy"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("num_threads"));
  m.def("tree_attention", &spd::tree_attention, py::call_guard<py::gil_scoped_release>());
  // addresses of the C entry points, for spdkernels/_C_ops.so (csrc/torch_ops/dispatch.cpp), which calls the
  // kernels of this module rather than a second copy of them
  m.def("entry_points", [] {
    py::dict d;
    d["rejection_sample"] = reinterpret_cast<std::uintptr_t>(&spd::rejection_sample);
    d["verify_greedy"] = reinterpret_cast<std::uintptr_t>(&spd::verify_greedy);
    return d;
  });
}
