"""spd-bench: time every available backend of each op over named shape sets.

For each (op, case): build inputs, run the torch reference once, check every backend's outputs equal
it, then time each backend (median of repeats; CPU: wall clock with the caches flushed between
repeats; GPU: CUDA events with the L2 flushed before each repeat, each repeat one CUDA-graph replay where the call
can be captured, else the call as launched). Each row reports bytes moved,
achieved GB/s, the fraction of this device's copy bandwidth (measured in the same run) and the speedup
over the baseline (the torch reference). Value checks (host syncs) are switched off while timing, as
in production.

``--backend nki`` also prints, for each case, the bytes the NKI kernel moves between HBM and SBUF and the
lower-bound time at the HBM bandwidth of one NeuronCore on trn1 and trn2: a model, not a measurement. The NKI
kernels are timed only on a Neuron device (on CPU they would run on the NumPy emulation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Dict, List

import torch

import spdkernels
from spdkernels.runtime.files import check_output_file, save_figure_atomic, write_text_atomic

from . import timing
from .registry import load_all


def parse_args(argv=None):
    ops = load_all()
    p = argparse.ArgumentParser(prog="spd-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--op", action="append", choices=sorted(ops), help="op(s) to run (default: all)")
    p.add_argument("--shapes", default="default", help="named shape set (see --list)")
    p.add_argument("--backend", action="append", choices=spdkernels.BACKENDS,
                   help="backend(s) to time (default: all available)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 30 on CPU, 100 on GPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-flush", action="store_true", help="CPU: keep caches warm between repeats")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of time against bytes here")
    p.add_argument("--list", action="store_true", help="list ops, shape sets and backends, then exit")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    # everything that can be refused is refused here, before any measurement (exit 2, one line)
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device: {args.device} needs a CUDA GPU, and torch sees none")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats: expected >= 1, got {args.repeats}")
    if args.warmup < 0:
        p.error(f"--warmup: expected >= 0, got {args.warmup}")
    for name in ("json", "plot"):
        if getattr(args, name) is not None:
            try:
                setattr(args, name, check_output_file(getattr(args, name), f"--{name}"))
            except ValueError as e:
                p.error(str(e))
    return args


def progress(total, disable):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=disable, file=sys.stderr, desc="spd-bench", leave=False)
    except ImportError:
        class Bar:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                if not disable:
                    print(f"\rspd-bench {self.n}/{total}", end="", file=sys.stderr, flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                if not disable:
                    print(file=sys.stderr)

        return Bar()


def fmt_table(rows: List[Dict], env: Dict) -> str:
    head = ["op", "case", "backend", "timed", "median ms", "p20-p80 ms", "GB/s", "% copy BW", "vs torch", "check"]
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append([r["op"], r["case"], r["backend"], "-", "-", "-", "-", "-", "-", r["error"][:40]])
            continue
        lines.append([r["op"], r["case"], r["backend"], r.get("timed", "-"), f"{r['median_ms']:.4f}",
                      f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}",
                      f"{r['gbps']:.1f}", f"{100 * r['frac_copy_bw']:.0f}%",
                      f"{r['speedup_vs_baseline']:.2f}x" if r.get("speedup_vs_baseline") else "-",
                      r["check"]])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = [f"# {env['device_name']} | copy bandwidth {env['copy_bw_gbps']:.1f} GB/s | torch "
           f"{env['versions']['torch']} | triton {env['versions']['triton']} | commit {env['git_commit']}"]
    for i, line in enumerate(lines):
        cells = [str(x).ljust(w) if j < 4 else str(x).rjust(w) for j, (x, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# HBM bandwidth available to one kernel (one NeuronCore): trn1 chip 820 GB/s shared by its 2 NeuronCore-v2;
# trn2 chip 2.9 TB/s shared by 8 NeuronCore-v3, i.e. 4 logical cores at the default LNC=2 (AWS Neuron docs)
NKI_HBM_GBPS = {"trn1": 820.0 / 2, "trn2": 2900.0 / 4}


def nki_model_rows(work) -> List[Dict]:
    """Bytes moved by each NKI kernel per case and the lower-bound time at NKI_HBM_GBPS (a model)."""
    import importlib

    rows = []
    for ob, c, _ in work:
        nki_bytes = getattr(importlib.import_module(ob.make_inputs.__module__), "nki_bytes", None)
        if nki_bytes is None:  # not an op with an NKI kernel
            continue
        nbytes, why = nki_bytes(c)
        row = {"op": ob.name, "case": ob.label(c), "params": c, "backend": "nki (model)", "bytes": nbytes}
        if why:
            row["error"] = why
        else:
            for t, bw in NKI_HBM_GBPS.items():
                row[f"{t}_lower_bound_us"] = nbytes / (bw * 1e9) * 1e6
        rows.append(row)
    return rows


def fmt_nki_model(rows: List[Dict]) -> str:
    head = ["op", "case", "bytes (MB)", "trn1 lower bound (us)", "trn2 lower bound (us)"]
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append([r["op"], r["case"], "-", "-", r["error"]])
        else:
            lines.append([r["op"], r["case"], f"{r['bytes'] / 1e6:.3f}", f"{r['trn1_lower_bound_us']:.2f}",
                          f"{r['trn2_lower_bound_us']:.2f}"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = [f"# NKI kernels: bytes moved between HBM and SBUF, and bytes / HBM bandwidth of one NeuronCore "
           f"(trn1 {NKI_HBM_GBPS['trn1']:.0f} GB/s, trn2 {NKI_HBM_GBPS['trn2']:.0f} GB/s at LNC=2). "
           "A MODEL, NOT A MEASUREMENT: no kernel was timed on a Neuron device here."]
    for i, line in enumerate(lines):
        out.append("  ".join(str(x).ljust(w) if j < 2 else str(x).rjust(w)
                             for j, (x, w) in enumerate(zip(line, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot(rows: List[Dict], env: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(1, len(ops), figsize=(6.5 * len(ops), 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        ok = [r for r in rows if r["op"] == op and "error" not in r]
        for b in sorted({r["backend"] for r in ok}):
            pts = sorted((r["bytes"] / 1e6, r["median_ms"]) for r in ok if r["backend"] == b)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=b)
        xs = sorted({r["bytes"] / 1e6 for r in ok})
        if xs:
            bw = env["copy_bw_gbps"]
            ax.plot(xs, [x * 1e6 / (bw * 1e9) * 1e3 for x in xs], "k--", lw=1, label=f"copy BW ({bw:.0f} GB/s)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes moved per call (MB)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{op} on {env['device_name'][:40]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    ops = load_all()
    device = args.device
    on_gpu = device.startswith("cuda")
    if args.list:
        for name, ob in sorted(ops.items()):
            sets = ", ".join(f"{k} ({len(v)})" for k, v in ob.shape_sets.items())
            here = spdkernels.available_backends(device, op=ob.backend_op or name)
            print(f"{name}: shape sets {sets}; backends here: {here}")
        return 0
    names = args.op or sorted(ops)
    repeats = args.repeats if args.repeats is not None else (100 if on_gpu else 30)
    spdkernels.set_validation(False)  # production setting: no host-sync checks in the timed path

    env = timing.environment(device)
    env["copy_bw_gbps"] = timing.copy_bandwidth(device)
    env["cpu_cache_flush"] = (not on_gpu) and (not args.no_flush)
    timer = timing.GpuTimer() if on_gpu else timing.CpuTimer(flush=not args.no_flush)

    work = []
    want_nki = bool(args.backend) and "nki" in args.backend
    for name in names:
        ob = ops[name]
        if args.shapes not in ob.shape_sets:
            print(f"spd-bench: op {name} has no shape set {args.shapes!r} (has {sorted(ob.shape_sets)})",
                  file=sys.stderr)
            return 2
        backends = [b for b in spdkernels.available_backends(device, op=ob.backend_op or name)
                    if not args.backend or b in args.backend]
        if device == "cpu":  # nki on cpu is the NumPy emulation of the kernels: a test harness, never timed
            backends = [b for b in backends if b != "nki"]
        if not backends and not want_nki:
            print(f"spd-bench: no requested backend can run {name} on {device}", file=sys.stderr)
            return 2
        for c in ob.shape_sets[args.shapes]:
            work.append((ob, c, backends))
    model = nki_model_rows(work) if want_nki else []
    if want_nki and not any(b for _, _, b in work):  # only the model was asked for (no Neuron device here)
        print(fmt_nki_model(model))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            env = timing.environment(device)
            write_text_atomic(args.json, json.dumps({"environment": env, "shape_set": args.shapes, "rows": [],
                                             "nki_model": model}, indent=1))
            print(f"# wrote {args.json}")
        return 0

    rows: List[Dict] = []
    failed = False
    def baselines(ob):
        return [(k, f) for k, f in ob.baselines.items() if ob.baseline_available(k, device)]

    bar = progress(sum(len(b) + len(baselines(ob)) for ob, _, b in work), args.no_progress)
    for ob, c, backends in work:
        inputs = ob.make_inputs(c, device)
        with spdkernels.use_backend("torch"):
            ref = ob.run(inputs)
        base_ms = None
        timed = [(b, None) for b in backends] + baselines(ob)
        results = []
        for b, fn in timed:
            bar.set_postfix_str(f"{ob.name} {ob.label(c)} {b}")
            nbytes = ob.bytes_from_ref(c, ref) if ob.bytes_from_ref else ob.bytes_moved(c)
            own = ob.bytes_for_backend(c, ref, b) if (ob.bytes_for_backend and fn is None) else None
            nbytes = own if own is not None else nbytes  # what this backend's kernels read, where that is more
            row = {"op": ob.name, "case": ob.label(c), "params": c, "backend": b, "bytes": nbytes}
            try:
                # the backend is chosen once around the check and the repeats, not inside the timed call
                if fn is None:
                    ctx = spdkernels.use_backend(b)
                    call = lambda ob=ob, inputs=inputs: ob.run(inputs)
                else:
                    ctx = contextlib.nullcontext()
                    call = lambda fn=fn, inputs=inputs: fn(inputs)
                with ctx:
                    diff = ob.check(call(), ref) if (fn is None or ob.baseline_check) else ""
                    if on_gpu:
                        t = timer(call, args.warmup, repeats, graph=True)  # every backend and baseline alike
                    else:
                        t = timer(call, args.warmup, repeats)
                row["check"] = "ok" if not diff else f"MISMATCH: {diff}"
                if diff:
                    failed = True
                row.update(median_ms=t["median"], p20_ms=t["p20"], p80_ms=t["p80"], repeats=t["n"],
                           cuda_graph=t.get("cuda_graph", False),
                           timed="graph" if t.get("cuda_graph") else ("launch" if on_gpu else "wall"))
                row["gbps"] = row["bytes"] / (t["median"] * 1e-3) / 1e9
                row["frac_copy_bw"] = row["gbps"] / env["copy_bw_gbps"]
                if b == "torch":
                    base_ms = t["median"]
            except Exception as e:  # report and continue; a failed backend fails the run
                row["error"] = f"{type(e).__name__}: {e}"
                failed = True
            results.append(row)
            bar.update(1)
        for row in results:
            if base_ms and "median_ms" in row:
                row["baseline"] = "torch"
                row["speedup_vs_baseline"] = base_ms / row["median_ms"]
        rows.extend(results)
    bar.close()

    print(fmt_table(rows, env))
    if model:
        print(fmt_nki_model(model))
    if on_gpu:
        print(f"# GPU: median of {repeats} repeats timed with CUDA events, L2 flushed before each; 'graph' rows"
              f" replay a CUDA graph of the call, 'launch' rows launch it from Python; validation off; '% copy BW' ="
              f" achieved GB/s / copy GB/s (read+write) measured above")
    else:
        print(f"# CPU: median of {repeats} wall-clock repeats, caches {'flushed' if env['cpu_cache_flush'] else 'warm'}"
              f" between repeats; validation off; '% copy BW' = achieved GB/s / copy GB/s (read+write) measured above")
    if args.json is not None:
        write_text_atomic(args.json, json.dumps({"environment": env, "shape_set": args.shapes, "rows": rows,
                                                 "nki_model": model}, indent=1))
        print(f"# wrote {args.json}")
    if args.plot is not None:
        try:
            plot(rows, env, args.plot)
            print(f"# wrote {args.plot}")
        except ImportError as e:
            print(f"# no plot: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
