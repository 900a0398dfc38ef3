"""The spdkernels runtime: a Llama-family model over a paged KV cache, proposers, and the speculative
decoding engine that verifies drafts with the package's ops (``tree_attention``, ``verify_greedy``,
``rejection_sample``)."""
from .engine import Engine, Request, RequestMetrics, Result, RunMetrics, SamplingParams
from .kv_cache import CacheFullError, PagedKVCache
from .model import Batch, LlamaModel
from .proposers import (
    Draft,
    DraftModelProposer,
    EarlyExitProposer,
    FallbackProposer,
    ModelProposer,
    NGramProposer,
    Proposer,
    UnionProposer,
)
from .speculation import AdaptiveSpeculation
from .weights import Checkpoint, LlamaConfig, ModelLoadError, embedded_model_path, load_checkpoint

__all__ = [
    "AdaptiveSpeculation", "Batch", "CacheFullError", "Checkpoint", "Draft", "DraftModelProposer",
    "EarlyExitProposer", "Engine", "FallbackProposer", "LlamaConfig", "LlamaModel", "ModelLoadError", "ModelProposer",
    "NGramProposer",
    "PagedKVCache", "Proposer", "Request", "RequestMetrics", "Result", "RunMetrics", "SamplingParams", "UnionProposer",
    "embedded_model_path", "load_checkpoint",
]
