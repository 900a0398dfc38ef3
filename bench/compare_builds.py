"""Two builds of the package side by side in one run: the same spd-bench cases, alternating between the builds.

    python bench/compare_builds.py --old REV [--new WORKTREE] [--op verify_greedy rejection_sample]
                                   [--backend cpp] [--rounds 5] [--repeats 30] [--json out.json]
    python bench/compare_builds.py --old REV --forward [--tokens 1 5] ...   (the embedded model's forward instead)
    python bench/compare_builds.py --old REV --spd [--stages 2 4 8] [--max-tokens 32] ...   (SPD's PDM and stages)

Each build is laid out as setup.py installs it (``triton_kernels/``, ``nki_kernels/``, ``bench/`` inside
``spdkernels/``) in ``build/compare/<name>/site`` with its C++ extension built in place (``--old``: a git revision,
checked out with ``git worktree``; ``--new``: the working tree, default ``.``), then ``spd-bench`` runs for each
build in turn, ``--rounds`` times (old, new, old, new, ...), so that both see the same machine state. The table
gives, per case and backend, the median over rounds of each build's median time and % of copy bandwidth, and the
median over rounds of the per-round ratio new / old. Nothing is installed; the current Python (with torch) runs
everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def prepare(name: str, src: Path, work: Path) -> Path:
    """Build ``src``'s extension in place and lay the package out in ``work/<name>/site``; returns the site."""
    env = dict(os.environ, SPDKERNELS_REQUIRE_CPP="1")
    _run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=env, stdout=subprocess.DEVNULL)
    site = work / name / "site"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(src / "spdkernels", site / "spdkernels", ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("triton_kernels", "nki_kernels", "bench"):
        if (src / sub).exists():
            shutil.copytree(src / sub, site / "spdkernels" / sub, ignore=shutil.ignore_patterns("__pycache__"))
    return site


def forward_once(site: Path, args, out: Path) -> list:
    """``--forward``: one run of the packed_weights bench (a forward of the embedded model, fp32 and packed weights,
    ``--tokens`` query tokens after 256 cached ones; it fails unless both models' logits agree) as spd-bench rows."""
    cmd = [sys.executable, "-m", "spdkernels.bench.packed_weights", "--repeats", str(args.repeats), "--json",
           str(out), "--tokens", *[str(t) for t in args.tokens]]
    _run(cmd, cwd=site, env=dict(os.environ, PYTHONPATH=str(site)), stdout=subprocess.DEVNULL)
    return forward_rows(json.loads(out.read_text()))


def forward_rows(out: dict) -> list:
    return [dict(op="forward", case=f"embedded model, {r['tokens']} tokens", backend=w, median_ms=r[f"{w}_ms"],
                 frac_copy_bw=0.0, check="ok") for r in out["rows"] for w in ("fp32", "packed")]


def spd_once(site: Path, args, out: Path) -> list:
    """``--spd``: one run of bench/spd.py (SPD on the embedded model with the shipped PDM, the demo's prompts, greedy,
    ``--max-tokens`` each; it exits non-zero, and this comparison with it, unless every output equals our
    autoregressive decoding) as spd-bench rows: the PDM forward and the mean stage forward per cycle at each n."""
    cmd = [sys.executable, "-m", "spdkernels.bench.spd", "--max-tokens", str(args.max_tokens), "--json", str(out),
           "--stages", *[str(n) for n in args.stages]]
    _run(cmd, cwd=site, env=dict(os.environ, PYTHONPATH=str(site)), stdout=subprocess.DEVNULL)
    return spd_rows(json.loads(out.read_text()))


def spd_rows(out: dict) -> list:
    return [dict(op="spd", case=f"n={r['n']} (acceptance {r['acceptance']:.3f})", backend=part,
                 median_ms=r[f"{part}_ms"], frac_copy_bw=0.0, check="ok")
            for r in out["rows"] for part in ("pdm", "stage")]


def bench_once(site: Path, args, out: Path) -> list:
    if args.forward:
        return forward_once(site, args, out)
    if args.spd:
        return spd_once(site, args, out)
    cmd = [sys.executable, "-m", "spdkernels.bench", "--repeats", str(args.repeats), "--json", str(out),
           "--no-progress"]
    for op in args.op:
        cmd += ["--op", op]
    for b in args.backend:
        cmd += ["--backend", b]
    if args.shapes:
        cmd += ["--shapes", args.shapes]
    env = dict(os.environ, PYTHONPATH=str(site))
    _run(cmd, cwd=site, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["rows"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="git revision of the old build")
    ap.add_argument("--new", default=".", help="directory of the new build (default: the working tree)")
    ap.add_argument("--op", nargs="+", default=["verify_greedy", "rejection_sample"])
    ap.add_argument("--backend", nargs="+", default=["cpp"])
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--forward", action="store_true", help="time the embedded model's forward (the packed_weights "
                    "bench, fp32 and packed weights) instead of spd-bench ops")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 5], help="with --forward: query tokens per forward")
    ap.add_argument("--spd", action="store_true", help="time SPD's PDM forward and stage forwards per cycle "
                    "(bench/spd.py) instead of spd-bench ops; a row's case names the acceptance, so builds whose "
                    "PDM drafts differ (another acceptance) show as rows of one build only")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8], help="with --spd: the values of n")
    ap.add_argument("--max-tokens", type=int, default=32, help="with --spd: new tokens per prompt")
    ap.add_argument("--reuse", action="store_true", help="summarise the rounds of the last run (no build, no bench)")
    args = ap.parse_args(argv)
    if args.forward and args.spd:
        ap.error("--forward and --spd: one at a time")
    if args.rounds < 1 or args.repeats < 1:
        ap.error("--rounds and --repeats must be at least 1")
    work = ROOT / "build" / "compare"
    work.mkdir(parents=True, exist_ok=True)
    old_src = work / "old" / "src"
    if args.reuse:
        rows_of = forward_rows if args.forward else spd_rows if args.spd else (lambda out: out["rows"])
        try:
            if args.spd:  # (the header names the rounds' token count)
                args.max_tokens = json.loads((work / "old" / "round0.json").read_text())["max_new_tokens"]
            runs = {name: [rows_of(json.loads((work / name / f"round{i}.json").read_text()))
                           for i in range(args.rounds)] for name in ("old", "new")}
            fields = {"op", "case", "backend", "median_ms", "frac_copy_bw", "check"}
            for r in (r for rounds in runs.values() for rows in rounds for r in rows):
                if not isinstance(r, dict) or not fields <= r.keys():  # rows of another kind of run
                    raise KeyError(f"a row without {sorted(fields)}: {r!r}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--reuse: no {args.rounds} complete rounds of this kind under {work} ({type(e).__name__}: {e})")
        return summarise(runs, args, args.old, args.new)
    if old_src.exists():
        _run(["git", "worktree", "remove", "--force", str(old_src)], cwd=ROOT)
    _run(["git", "worktree", "add", "--detach", str(old_src), args.old], cwd=ROOT, stdout=subprocess.DEVNULL)
    old_rev = subprocess.run(["git", "rev-parse", "--short", args.old], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
    new_src = Path(args.new).resolve()
    new_rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=new_src, capture_output=True,
                             text=True, check=True).stdout.strip()
    sites = {"old": prepare("old", old_src, work), "new": prepare("new", new_src, work)}
    runs = {"old": [], "new": []}
    for i in range(args.rounds):
        for name in ("old", "new"):
            runs[name].append(bench_once(sites[name], args, work / name / f"round{i}.json"))
    _run(["git", "worktree", "remove", "--force", str(old_src)], cwd=ROOT)
    return summarise(runs, args, old_rev, new_rev)


def key_of(r: dict) -> tuple:
    return r["op"], r["case"], r["backend"]


def common_keys(runs: dict) -> list:
    """The rows (op, case, backend) present in every round of both builds, in the order of the new build's first
    round: only those are compared (a row of one build only, e.g. a renamed case, or one missing from a round)."""
    every = set.intersection(*[{key_of(r) for r in rows} for name in runs for rows in runs[name]])
    return [k for k in dict.fromkeys(key_of(r) for r in runs["new"][0]) if k in every]


def summarise(runs: dict, args, old_rev: str, new_rev: str) -> int:
    if not runs["old"] or not runs["new"] or len(runs["old"]) != len(runs["new"]):
        raise ValueError(f"runs: need the same number (>= 1) of rounds of each build, got "
                         f"{len(runs['old'])} old and {len(runs['new'])} new")
    table = []
    keys = common_keys(runs)
    for key in keys:
        per = {name: [next(r for r in rows if key_of(r) == key) for rows in runs[name]] for name in runs}
        row = dict(op=key[0], case=key[1], backend=key[2])
        for name in runs:
            row[f"{name}_ms"] = statistics.median(r["median_ms"] for r in per[name])
            row[f"{name}_copy_bw"] = statistics.median(r["frac_copy_bw"] for r in per[name])
            row[f"{name}_check"] = sorted({r["check"] for r in per[name]})
        pairs = zip(per["new"], per["old"])
        row["ratio_new_old"] = statistics.median(n["median_ms"] / o["median_ms"] for n, o in pairs)
        table.append(row)
    what = ("packed_weights (embedded model forward)" if args.forward else
            f"bench/spd.py --max-tokens {args.max_tokens} (per cycle)" if args.spd else "spd-bench")
    repeats = "" if args.spd else f" --repeats {args.repeats}"
    print(f"# old {old_rev} vs new {new_rev}: {args.rounds} alternating rounds of {what}{repeats}; medians over rounds")
    print(f"{'op':17} {'case':40} {'backend':14} {'old ms':>9} {'new ms':>9} {'new/old':>8} {'old %BW':>8} "
          f"{'new %BW':>8}  check")
    for r in table:
        ok = "ok" if r["old_check"] == r["new_check"] == ["ok"] else f"{r['old_check']} / {r['new_check']}"
        print(f"{r['op']:17} {r['case']:40} {r['backend']:14} {r['old_ms']:9.4f} {r['new_ms']:9.4f} "
              f"{r['ratio_new_old']:8.3f} {100 * r['old_copy_bw']:7.0f}% {100 * r['new_copy_bw']:7.0f}%  {ok}")
    if args.spd:  # the PDM per stage forward, the same run's stages as the control for the machine's state
        both = [case for case in dict.fromkeys(r["case"] for r in table)
                if {("spd", case, "pdm"), ("spd", case, "stage")} <= set(keys)]
        for case in both:
            def per_stage(rows, case=case):
                return (next(r for r in rows if r["case"] == case and r["backend"] == "pdm")["median_ms"]
                        / next(r for r in rows if r["case"] == case and r["backend"] == "stage")["median_ms"])
            old = [per_stage(rows) for rows in runs["old"]]
            new = [per_stage(rows) for rows in runs["new"]]
            ratios = [n / o for n, o in zip(new, old)]
            print(f"# {case}: PDM / stage forward {statistics.median(old):.3f} old, {statistics.median(new):.3f} new; "
                  f"new/old per round {', '.join(f'{x:.3f}' for x in ratios)} (median {statistics.median(ratios):.3f})")
    compared = set(keys)
    for name in ("old", "new"):  # (e.g. --spd rows whose acceptance differs)
        for key in dict.fromkeys(key_of(r) for rows in runs[name] for r in rows):
            if key in compared:
                continue
            compared.add(key)
            where = [f"{b} {sum(key in {key_of(r) for r in rows} for rows in runs[b])}/{len(runs[b])} rounds"
                     for b in ("old", "new")]
            print(f"# not compared: {' / '.join(key)} (in {', '.join(where)})")
    if not keys:
        print("# no row is present in every round of both builds: nothing compared", file=sys.stderr)
        return 1
    if args.json:  # written whole, then renamed (this driver does not import spdkernels: no runtime.files)
        out = Path(args.json)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(old=old_rev, new=new_rev, rounds=args.rounds, repeats=args.repeats,
                                       rows=table), indent=1) + "\n")
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
