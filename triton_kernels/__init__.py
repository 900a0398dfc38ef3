"""Triton kernels (CUDA/ROCm GPUs; CPU tensors under TRITON_INTERPRET=1), installed as
``spdkernels.triton_kernels``. Each module is named after its op and imported lazily by the op's
registration, so importing spdkernels never imports triton."""
