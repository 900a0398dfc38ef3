"""Drop-in adapters: each serving stack's own API (names, layouts, dtypes, in-place outputs, accept rule)
in front of the spdkernels ops.

==========================  =====================================================================
``adapters.vllm``           vLLM V1 rejection sampler (``rejection_sample``, ``RejectionSampler``,
                            ``sample_recovered_tokens``, ...) and the ``vllm.general_plugins`` hook
``adapters.sglang``         sgl-kernel ``verify_tree_greedy`` / ``tree_speculative_sampling_target_only``
``adapters.flashinfer``     FlashInfer ``chain_speculative_sampling``
``adapters.transformers``   ``speculative_generate`` for ``model.generate(custom_generate=...)``
==========================  =====================================================================

None of the stacks is imported here or at the import of an adapter module: they are optional, and the
adapters work on plain torch tensors without them. Where a stack's semantics differ from the spdkernels
contract (docs/contract.md sections 2-3), the adapter reproduces the stack and its docstring says what differs;
``docs/adapters.md`` tabulates the differences.
"""

__all__ = ["flashinfer", "sglang", "transformers", "vllm"]
