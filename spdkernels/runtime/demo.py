"""``spdkernels demo``: the package's main job. On the embedded model (or one given), a fixed suite of
prompts (code, editing a given text, summarising a given text, open chat) decoded greedily, 128 new tokens
each: autoregressively, with each proposer, and with Hugging Face ``transformers`` (greedy, and with
``prompt_lookup_num_tokens``) on the same weights and the same input ids. Every output is checked
token for token against our autoregressive one; a divergence is accepted only at a near-tie (top-2 logit
gap of the autoregressive run below ``TIE_GAP`` at the first differing position)."""
from __future__ import annotations

import json
import math
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .engine import Engine, Request, SamplingParams
from .files import save_figure_atomic, write_text_atomic
from .linear import weight_formats
from .model import LlamaModel, prefill_logits
from .proposers import EarlyExitProposer, FallbackProposer, NGramProposer, Proposer
from .speculation import AdaptiveSpeculation

# A divergence between two greedy runs is a near-tie when the top-2 logit gap of the reference run at the
# first differing position is below this (fp32 logits of magnitude ~40 carry rounding noise ~1e-5 relative
# between a 1-token and a (k+1)-token forward pass, i.e. a few 1e-4 absolute).
TIE_GAP = 2e-3

_ARTICLE = (
    "The city council voted on Tuesday to expand the bike lane network by forty kilometres over the next "
    "three years. Supporters said the plan would cut traffic and make streets safer for children, while "
    "some shop owners worried that removing parking spaces would hurt their business. The council promised "
    "to study the effect on local shops after the first year and to adjust the plan if sales fall. The "
    "project will cost twelve million euros, most of it paid by a national climate fund.")
_NOTES = (
    "Meeting notes: The team agreed to release version 2.0 of the app on March 3. Anna will finish the "
    "login page by February 20. Ben will fix the crash on older phones and write tests for the payment "
    "screen. The design review is moved to Friday because the designer is sick. The budget for cloud "
    "servers stays the same until the end of the quarter.")
_CODE = '''def average(numbers):
    total = 0
    count = 0
    for n in numbers:
        total = total + n
        count = count + 1
    if count == 0:
        return 0
    return total / count
'''
_JS = '''function countWords(text) {
  const words = text.split(" ");
  let counts = {};
  for (const word of words) {
    if (counts[word] === undefined) {
      counts[word] = 0;
    }
    counts[word] += 1;
  }
  return counts;
}
'''

SUITE: List[Tuple[str, str]] = [
    ("code: type hints", "Add type hints and a docstring to this Python function. Return only the code.\n\n"
     f"```python\n{_CODE}```"),
    ("code: translate", f"Translate this JavaScript function to Python.\n\n```javascript\n{_JS}```"),
    ("edit: spelling", "Fix the spelling mistakes in this text and return the corrected text only:\n\n"
     "The citty council voted on Tuesdday to expand the bike lane netwrk by forty kilometres over the next "
     "three yeers. Supporters said the plan would cut trafic and make streets safer for childern, while "
     "some shop owners woried that removing parking spaces would hurt their busness."),
    ("edit: formal tone", f"Rewrite these notes as a short formal email to the team.\n\n{_NOTES}"),
    ("summary: article", f"Summarise this article in three sentences.\n\n{_ARTICLE}"),
    ("summary: notes", f"List the action items in these notes as bullet points.\n\n{_NOTES}"),
    ("chat: habits", "What are three good habits for staying healthy?"),
    ("chat: hash table", "Explain what a hash table is to a beginner programmer."),
]


def default_proposers(num_layers: int, pdm=None) -> List[Union[Proposer, Tuple[Proposer, AdaptiveSpeculation]]]:
    """The demo's speculative runs: a proposer, or a proposer with the cost-aware depth controller. With a
    trained PDM, the PDM as a draft-then-verify proposer too (chains, a tree, under the controller, and behind
    prompt lookup with its chains cut where it is unsure)."""
    out: List[Union[Proposer, Tuple[Proposer, AdaptiveSpeculation]]] = [
        NGramProposer(k=4, max_ngram=3, min_ngram=2),
        NGramProposer(k=8, max_ngram=3, min_ngram=2, adaptive=True),
        # with verification nearly free, single-token lookups (n=1) pay too: the controller decides how deep
        (NGramProposer(k=8, max_ngram=3, min_ngram=1), AdaptiveSpeculation(max_depth=8)),
        NGramProposer(k=6, max_ngram=3, min_ngram=1, branches=3, max_nodes=12),
        EarlyExitProposer(layers=max(1, num_layers // 4), k=3, draft_vocab=8192),
    ]
    if pdm is not None:
        from .spd.proposer import PDMProposer

        out += [PDMProposer(pdm, k=4), PDMProposer(pdm, k=4, branching=2, width=2, max_nodes=8),
                (PDMProposer(pdm, k=6), AdaptiveSpeculation(max_depth=6)),
                # prompt lookup where it matches, else the trained drafter, its chains ended where it is unsure
                # (generate --proposer pdm --lookup --adaptive --k 8 --min-confidence 0.3)
                FallbackProposer([NGramProposer(k=8, max_ngram=3, min_ngram=2, adaptive=True),
                                  PDMProposer(pdm, k=8, min_confidence=0.3)])]
    return out


def spd_engines(model: LlamaModel, pdm, tokenizer, stages: Sequence[int] = (2, 4, 8)) -> Dict[str, object]:
    """The demo's Speculative Pipeline Decoding runs (one process: the stages run one after another, so
    their wall clock is not the pipelined one; the equivalent speedup is what a pipeline of n workers
    would reach): the PDM alone, and the PDM where prompt lookup (n = 2..3, in-flight tokens included) finds
    nothing."""
    from .spd.schedule import SPDEngine

    out = {}
    for lookup in (False, True):
        for n in stages:
            if 2 <= n <= model.num_layers:
                name = f"ours spd n={n}{' + lookup' if lookup else ''} (one process)"
                out[name] = SPDEngine(model, pdm, n, tokenizer=tokenizer,
                                      lookup=NGramProposer(k=1, min_ngram=2, max_ngram=3) if lookup else None)
    return out


def first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_gap(model: LlamaModel, prompt: Sequence[int], out: Sequence[int], i: int) -> float:
    """Top-2 logit gap of the model's next-token logits after ``prompt + out[:i]`` (one fresh prefill)."""
    seq = list(prompt) + list(out[:i])
    top = prefill_logits(model, seq, [len(seq) - 1])[0].float().topk(2).values
    return float(top[0] - top[1])


# per-prompt fields that are times (a median over repeats); the others are the repeats' common value or mean
_TIME_FIELDS = ("wall_s", "tokens_per_s", "draft_s", "verify_s", "sampling_s", "bookkeeping_s", "prefill_s", "pdm_ms",
                "stage_ms", "slowest_stage_ms", "exit_verify_ms")


def merge_repeats(reps: Sequence[Dict]) -> Dict:
    """One prompt's metrics over its repeats: time fields their median, the others their common value (or the
    mean where a run's choices differ between repeats, e.g. under the cost-aware controller), and
    ``tokens_per_s_repeats`` every repeat's rate (the speedup is the median of per-repeat ratios)."""
    out = {}
    for k in reps[0]:
        vals = [r[k] for r in reps]
        if k in _TIME_FIELDS:
            out[k] = statistics.median(vals)
        elif all(v == vals[0] for v in vals):
            out[k] = vals[0]
        else:
            out[k] = sum(vals) / len(vals)
    out["tokens_per_s_repeats"] = [r["tokens_per_s"] for r in reps]
    return out


def _speedups(per: Sequence[Dict], base: Sequence[Dict]) -> List[float]:
    """Per prompt, the median over repeats of a run's rate over ``base``'s rate measured beside it."""
    return [statistics.median(a / b for a, b in zip(p["tokens_per_s_repeats"], q["tokens_per_s_repeats"]))
            for p, q in zip(per, base)]


def _geomean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


class DemoFailure(RuntimeError):
    pass


def run_demo(model: LlamaModel, tokenizer, proposers: Sequence[Union[Proposer, Tuple[Proposer, AdaptiveSpeculation]]],
             max_new_tokens: int = 128,
             hf_model=None, hf_lookup_tokens: int = 8, json_path: Optional[str] = None,
             plot_path: Optional[str] = None, log=print, progress: bool = True,
             extra_engines: Optional[Dict[str, object]] = None, repeats: int = 1) -> Dict:
    """Every run on every prompt of the suite, ``repeats`` times (interleaved: every run on prompt 0, again,
    ..., then prompt 1), every repeat's output checked against ours autoregressive (the near-tie rule; that
    run's own repeats exactly); per prompt, time fields are medians over the repeats and a run's speedup is the
    median of its per-repeat ratios to the autoregressive run measured beside it."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}]))
               for _, p in SUITE]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    runs: Dict[str, Dict] = {}

    # Runs are interleaved prompt by prompt (every run on prompt 0, then every run on prompt 1, ...), so
    # the per-prompt speedups compare runs measured side by side under the same load on a shared machine.
    engines: Dict[str, Engine] = {"ours autoregressive": Engine(model, None, tokenizer=tokenizer)}
    for p in proposers:
        p, spec = p if isinstance(p, tuple) else (p, None)
        name = f"ours {p.describe()}" + (f" + {spec.describe()}" if spec else "")
        engines[name] = Engine(model, p, tokenizer=tokenizer, speculation=spec)
    engines.update(extra_engines or {})
    hf_runs = [("transformers greedy", 0), (f"transformers prompt-lookup {hf_lookup_tokens}", hf_lookup_tokens)] \
        if hf_model is not None else []
    for name in list(engines) + [n for n, _ in hf_runs]:
        runs[name] = dict(outputs=[], per_prompt=[])
    pb = None
    if progress:
        from tqdm import tqdm

        pb = tqdm(total=len(prompts) * (len(engines) + len(hf_runs)) * max_new_tokens * repeats, leave=False,
                  unit="tok")

    def ours(name: str, ids: List[int]):
        eng = engines[name]
        done_before = pb.n if pb else 0
        if pb:
            pb.set_description(name)
            eng.on_step = lambda n, b0=done_before: (pb.update(b0 + n - pb.n))
        res, met = eng.generate([Request(ids, params)])
        one = dict(
            tokens=len(res[0].output_ids), wall_s=met.wall_s, tokens_per_s=met.tokens_per_s,
            acceptance_rate=met.acceptance_rate, mean_accepted_length=met.mean_accepted_length, draft_s=met.draft_s,
            verify_s=met.verify_s, sampling_s=met.sampling_s, bookkeeping_s=met.bookkeeping_s,
            prefill_s=met.prefill_s)
        if hasattr(met, "equivalent_speedup"):
            d = met.as_dict()
            one.update(
                n=met.n, cycles=met.cycles, tokens_per_cycle=met.tokens_per_cycle,
                equivalent_speedup=met.equivalent_speedup, pdm_ms=d["pdm_ms_per_cycle"],
                stage_ms=sum(d["stage_ms_per_cycle"]) / len(d["stage_ms_per_cycle"]),
                slowest_stage_ms=d["slowest_stage_ms_per_cycle"], exit_verify_ms=d["exit_verify_ms_per_cycle"],
                drafted=met.drafted, accepted=met.accepted, lookup_drafted=met.lookup_drafted,
                lookup_accepted=met.lookup_accepted)
        if pb:
            pb.update(done_before + max_new_tokens - pb.n)
        return res[0].output_ids, one

    def theirs(name: str, lookup: int, ids: List[int]):
        if pb:
            pb.set_description(name)
        x = torch.tensor([ids], device=hf_model.device)
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(x),
                  pad_token_id=tokenizer.stop_token_ids[0] if tokenizer.stop_token_ids else None,
                  eos_token_id=sorted(model.config.eos_token_ids) or None)
        if lookup:
            kw["prompt_lookup_num_tokens"] = lookup
        t = time.perf_counter()
        with torch.inference_mode():
            o = hf_model.generate(x, **kw)[0, len(ids):].tolist()  # .tolist() waits for the device
        dt = time.perf_counter() - t
        if pb:
            pb.update(max_new_tokens)
        return o, dict(tokens=len(o), wall_s=dt, tokens_per_s=len(o) / dt)

    log(f"demo: {len(prompts)} prompts, greedy, {max_new_tokens} new tokens each"
        + (f", {repeats} repeats" if repeats > 1 else "") + "; runs interleaved prompt by prompt")
    every: Dict[str, List[List[List[int]]]] = {name: [] for name in runs}  # run -> prompt -> repeat -> output
    for ids in prompts:
        got: Dict[str, List] = {name: [] for name in runs}
        for _ in range(repeats):
            for name in engines:
                got[name].append(ours(name, ids))
            for name, lookup in hf_runs:
                got[name].append(theirs(name, lookup, ids))
        for name, reps in got.items():
            every[name].append([o for o, _ in reps])
            runs[name]["outputs"].append(reps[0][0])
            runs[name]["per_prompt"].append(merge_repeats([m for _, m in reps]))
    if pb:
        pb.close()

    # correctness: every repeat of every run against our autoregressive outputs (whose own repeats must equal its
    # first run exactly: the same computation each time); a prompt counts as identical when all its repeats are
    ref = runs["ours autoregressive"]["outputs"]
    failures = []
    for name, r in runs.items():
        r["identical"], r["divergences"] = 0, []
        for i, outs in enumerate(every[name]):
            same = True
            for k, b in enumerate(outs):
                a = ref[i]
                j = first_divergence(a, b)
                if j is None:
                    continue
                same = False
                strict = name == "ours autoregressive"
                gap = None if strict else top2_gap(model, prompts[i], a, j) if j < min(len(a), len(b)) \
                    else float("inf")
                tie = not strict and gap < TIE_GAP
                r["divergences"].append(dict(prompt=i, repeat=k, position=j, top2_gap=gap, near_tie=tie))
                if not tie:
                    failures.append(f"{name}: prompt {i} ({SUITE[i][0]}){f' repeat {k}' if repeats > 1 else ''} "
                                    f"differs at token {j}" + ("" if strict else f" (top-2 gap {gap:.2e})"))
            r["identical"] += same
    base = runs["ours autoregressive"]["per_prompt"]
    table = []
    for name, r in runs.items():
        sp = _speedups(r["per_prompt"], base)
        row = dict(run=name, tokens_per_s=_geomean([p["tokens_per_s"] for p in r["per_prompt"]]),
                   speedup=_geomean(sp), identical=f"{r['identical']}/{len(prompts)}")
        per = r["per_prompt"]
        if "acceptance_rate" in per[0]:
            row["acceptance_rate"] = sum(p["acceptance_rate"] for p in per) / len(per)
            row["mean_accepted_length"] = sum(p["mean_accepted_length"] for p in per) / len(per)
        if "equivalent_speedup" in per[0]:
            # pooled over the suite: committed tokens per cycle over all prompts' cycles
            cyc = sum(p["cycles"] for p in per)
            row["n"] = per[0]["n"]
            row["tokens_per_cycle"] = sum(p["tokens"] - 1 for p in per) / cyc
            row["equivalent_speedup"] = row["n"] * row["tokens_per_cycle"]
            row["equivalent_speedup_geomean"] = _geomean([p["equivalent_speedup"] for p in per])
            for k in ("pdm_ms", "stage_ms", "slowest_stage_ms", "exit_verify_ms"):
                row[k] = sum(p[k] * p["cycles"] for p in per) / cyc
            for k in ("drafted", "accepted", "lookup_drafted", "lookup_accepted"):
                row[k] = sum(p[k] for p in per)
        r["speedups"] = sp
        table.append(row)

    summary = dict(suite=[n for n, _ in SUITE], tie_gap=TIE_GAP, repeats=repeats,
                   weights=weight_formats(model.matrices()),
                   table=table, failures=failures,
                   runs={k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in runs.items()},
                   outputs={k: [tokenizer.decode(o) for o in v["outputs"]] for k, v in runs.items()})
    spec = [t for t in table if t["run"].startswith("ours ") and t["run"] != "ours autoregressive"
            and "equivalent_speedup" not in t]
    best = max(spec, key=lambda t: t["speedup"]) if spec else None
    hf_pl = next((t for t in table if t["run"].startswith("transformers prompt-lookup")), None)
    summary["best"] = None if best is None else dict(
        run=best["run"], speedup_vs_ours_ar=best["speedup"],
        speedup_vs_transformers_prompt_lookup=(
            _geomean(_speedups(runs[best["run"]]["per_prompt"], runs[hf_pl["run"]]["per_prompt"])) if hf_pl else None))
    log(format_table(table, summary))
    if json_path:
        write_text_atomic(json_path, json.dumps(summary, indent=1))
        log(f"wrote {json_path}")
    if plot_path:
        plot(runs, plot_path)
        log(f"wrote {plot_path}")
    if failures:
        raise DemoFailure("outputs differ from autoregressive decoding beyond near-ties:\n  " + "\n  ".join(failures))
    return summary


def format_table(table: List[Dict], summary: Dict) -> str:
    lines = [f"{'run':44s} {'tok/s':>7s} {'speedup':>8s} {'accept':>7s} {'mean len':>8s} {'identical':>9s}"]
    for t in table:
        acc = f"{t['acceptance_rate']:.2f}" if "acceptance_rate" in t else "-"
        mal = f"{t['mean_accepted_length']:.2f}" if "mean_accepted_length" in t and "n" not in t else "-"
        lines.append(f"{t['run']:44s} {t['tokens_per_s']:7.1f} {t['speedup']:7.2f}x {acc:>7s} {mal:>8s} "
                     f"{t['identical']:>9s}")
    reps = summary.get("repeats", 1)
    lines.append("tok/s and speedup: geometric means over the suite; speedup vs ours autoregressive, per prompt, "
                 "measured side by side (runs interleaved prompt by prompt"
                 + (f"; per prompt the median over {reps} repeats of each run's tok/s and of its ratio" if reps > 1
                    else "") + "); accept = accepted / drafted tokens, the mean of the per-prompt rates; "
                 "mean len = tokens per verification step (bonus included); identical = outputs equal to ours "
                 "autoregressive token for token" + (" in every repeat" if reps > 1 else ""))
    spd = [t for t in table if "equivalent_speedup" in t]
    if spd:
        lines.append("")
        lines.append(f"{'Speculative Pipeline Decoding':44s} {'accept':>7s} {'tok/cycle':>9s} {'equiv.':>7s} "
                     f"{'PDM ms':>7s} {'stage ms':>8s} {'PDM<stage':>9s} {'lookup':>9s} {'PDM drafts':>10s} "
                     f"{'identical':>9s}")
        for t in spd:
            lk = f"{t['lookup_accepted']}/{t['lookup_drafted']}" if t["lookup_drafted"] else "-"
            pd = f"{t['accepted'] - t['lookup_accepted']}/{t['drafted'] - t['lookup_drafted']}"
            lines.append(f"{t['run']:44s} {t['acceptance_rate']:7.2f} {t['tokens_per_cycle']:9.2f} "
                         f"{t['equivalent_speedup']:6.2f}x {t['pdm_ms']:7.2f} {t['stage_ms']:8.2f} "
                         f"{'yes' if t['pdm_ms'] < t['stage_ms'] else 'NO':>9s} {lk:>9s} {pd:>10s} "
                         f"{t['identical']:>9s}")
        lines.append("SPD: accept = accepted / verified drafts, the mean of the per-prompt rates (pooled: the lookup "
                     "and PDM draft counts); tok/cycle = committed tokens per pipeline cycle, pooled over the suite; "
                     "equiv. = n x tok/cycle (the speedup a pipeline of n workers gets over "
                     "autoregressive decoding, whose token costs n cycles); PDM / stage ms = mean time of one PDM "
                     "forward and of one stage forward per cycle (the PDM must be the cheaper to hide behind a stage); "
                     "lookup / PDM drafts = accepted / verified drafts from each source, pooled (+ lookup: prompt "
                     "lookup drafts where the newest 2-3 tokens, in flight included, occur earlier in the text)")
    b = summary.get("best")
    if b:
        s = f"best proposer: {b['run']}: {b['speedup_vs_ours_ar']:.2f}x ours autoregressive"
        if b["speedup_vs_transformers_prompt_lookup"] is not None:
            s += f", {b['speedup_vs_transformers_prompt_lookup']:.2f}x transformers prompt-lookup"
        lines.append(s)
    for f in summary["failures"]:
        lines.append(f"FAIL {f}")
    return "\n".join(lines)


def plot(runs: Dict[str, Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    n = len(SUITE)
    fig, ax = plt.subplots(figsize=(12, 5))
    w = 0.8 / len(names)
    for k, name in enumerate(names):
        ys = [p["tokens_per_s"] for p in runs[name]["per_prompt"]]
        ax.bar([i + k * w for i in range(n)], ys, w, label=name)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(n)])
    ax.set_xticklabels([s for s, _ in SUITE], rotation=20, ha="right")
    ax.set_ylabel("tokens/s (greedy, 128 new tokens)")
    ax.set_title("spdkernels demo: speculative vs autoregressive decoding")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)
