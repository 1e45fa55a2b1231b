"""Throughput and peak memory of scbert-tl's network against performer-pytorch, side by side.

Both networks are built at the same configuration and fed the same random cells. Every measurement
(one implementation x one configuration x forward or training step) runs in its own fresh Python
process, so peak memory is that measurement's own and one run cannot warm the allocator for the
other. Ours and the reference alternate, so a change of machine load hits both.

Examples
--------
CPU, both configurations::

    python benchmarks/bench_performer.py --device cpu --config all --out results-cpu.json

The full configuration's forward pass, on a quiet machine and beside one competing busy process, each
throughput also as a fraction of the float32 GEMM roofline measured in the same run::

    python benchmarks/bench_performer.py --config full --mode forward --contention both --out full.json

CUDA (bf16 autocast for ours; model FLOP utilisation against an H100's dense bf16 peak)::

    python benchmarks/bench_performer.py --device cuda --config all --out results-cuda.json

The reference is ``performer_pytorch.PerformerLM(num_tokens=7, max_seq_len=n + 1, dim, depth, heads,
dim_head, local_attn_heads=0, rotary_position_emb=False, attn_out_bias=True)`` (the test extra pins
1.1.4); its position embedding is frozen like our gene embedding when the configuration's is.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import competing_process, describe, machine

#: Configurations: the published full scBERT, and the CPU-sized compact model (as ``model="compact"``).
CONFIGS = {
    "full": {"n_genes": 16906, "dim": 200, "depth": 6, "heads": 10, "dim_head": 64, "ff_mult": 4},
    "compact": {"n_genes": 2000, "dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "ff_mult": 4},
}
#: Dense bf16 tensor-core peaks (FLOP/s) by device-name substring; the vendor's spec-sheet figures without sparsity.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
#: Defaults per device: (batch size, repeats) for each configuration.
DEFAULTS = {
    "cpu": {"full": (1, 2), "compact": (8, 5)},
    "cuda": {"full": (8, 10), "compact": (256, 20)},
}


def _config(name: str) -> dict:
    conf = dict(CONFIGS[name])
    if name == "compact":  # follow the package's compact preset when it is there
        try:
            from scbert_tl.tl._resolve import COMPACT, COMPACT_GENES
        except ImportError:
            pass
        else:
            keys = ("dim", "depth", "heads", "dim_head", "ff_mult", "n_features")
            conf.update({k: COMPACT[k] for k in keys if k in COMPACT})
            conf["n_genes"] = COMPACT_GENES
    conf["gene_emb_trainable"] = name != "full"
    return conf


# worker: one measurement in this process ---------------------------------------------------------------------------


def _tokens(torch, cells: int, n_genes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # sparse like real cells: ~85% zeros, the rest spread over the bins
    probs = torch.tensor([0.85, 0.06, 0.04, 0.025, 0.015, 0.01])
    return torch.multinomial(probs, cells * n_genes, replacement=True, generator=g).view(cells, n_genes)


def _build(torch, impl: str, conf: dict, device):
    torch.manual_seed(0)
    if impl == "ours":
        from scbert_tl.model import ScBERTConfig, ScBERTNetwork

        net = ScBERTNetwork(ScBERTConfig(**conf, lm_head=True))
    else:
        import performer_pytorch

        net = performer_pytorch.PerformerLM(
            num_tokens=conf.get("n_bins", 5) + 2,
            max_seq_len=conf["n_genes"] + 1,
            dim=conf["dim"],
            depth=conf["depth"],
            heads=conf["heads"],
            dim_head=conf["dim_head"],
            ff_mult=conf["ff_mult"],
            nb_features=conf.get("n_features"),  # None: its default, dim_head x ln(dim_head), as ours
            local_attn_heads=0,
            rotary_position_emb=False,
            attn_out_bias=True,
        )
        net.pos_emb.emb.weight.requires_grad_(conf["gene_emb_trainable"])
    return net.to(device)


def worker(args: argparse.Namespace) -> dict:
    """Measure one (implementation, configuration, mode); returns a JSON-able dict.

    Each implementation runs with its own defaults: ours imports ``scbert_tl`` before torch and steps
    inside the package's CPU runtime (threads from ``settings.n_threads``, as every tool runs);
    the reference gets torch's defaults. ``--threads`` sets both.
    """
    if args.impl == "ours":
        import scbert_tl

        if args.threads:
            scbert_tl.settings.n_threads = args.threads
    import torch

    if args.impl == "ours":
        from scbert_tl.train._runtime import cpu_runtime

        with cpu_runtime(args.device, desc="benchmark"):
            return _measure(args, torch)
    if args.threads:
        torch.set_num_threads(args.threads)
    return _measure(args, torch)


def roofline(args: argparse.Namespace) -> dict:
    """Float32 GEMM throughput at the benchmark's thread count: MKL (``torch.matmul``) and oneDNN (packed weight).

    Square products of ``--gemm-size``, the best of those timed in about two seconds per path after two
    untimed ones; the roofline is the faster of the two paths (on AMD CPUs MKL takes its AVX2 path,
    oneDNN uses AVX-512).
    """
    import time

    import scbert_tl

    if args.threads:
        scbert_tl.settings.n_threads = args.threads
    import torch

    from scbert_tl.train._runtime import cpu_runtime

    n = args.gemm_size
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    packed = torch.ops.mkldnn._reorder_linear_weight(b, None) if torch.backends.mkldnn.is_available() else None
    paths = {"mkl": lambda: torch.matmul(a, b)}
    if packed is not None:
        paths["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    result = {"size": n}
    with cpu_runtime("cpu", desc="roofline") as threads:
        for name, fn in paths.items():
            for _ in range(2):
                fn()
            times: list[float] = []
            while len(times) < 5 or (sum(times) < 2.0 and len(times) < 200):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            result[f"{name}_flops"] = 2 * n**3 / min(times)
        result["threads"] = threads
    result["flops"] = max(v for k, v in result.items() if k.endswith("_flops"))
    return result


def _measure(args: argparse.Namespace, torch) -> dict:
    device = torch.device(args.device)
    conf = _config(args.config)
    cuda = device.type == "cuda"
    if cuda and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    net = _build(torch, args.impl, conf, device)
    cells = args.batch_size
    tokens = _tokens(torch, cells, conf["n_genes"], seed=1)
    if args.impl == "ours":
        tokens = tokens.to(torch.int8)
    else:
        tokens = torch.nn.functional.pad(tokens, (0, 1))  # the appended position, token 0
    tokens = tokens.to(device)
    targets = _tokens(torch, cells, conf["n_genes"] + 1, seed=2).to(device)

    def logits():
        return net.mlm_logits(tokens) if args.impl == "ours" else net(tokens)

    precision = args.precision if args.impl == "ours" else args.ref_precision
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    if args.mode == "forward":
        net.eval()
        if args.compile and args.impl == "ours":
            net.mlm_logits = torch.compile(net.mlm_logits)

        def step():
            with torch.inference_mode(), autocast():
                logits()

    else:
        net.train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

        def step():
            with autocast():
                out = logits()
                loss = torch.nn.functional.cross_entropy(out.float().reshape(-1, out.shape[-1]), targets.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    times, cpu_times = [], []
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base_mem
    else:  # ru_maxrss is in KiB on Linux
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024
    best = min(times)
    return {
        "impl": args.impl,
        "config": args.config,
        "mode": args.mode,
        "batch_size": cells,
        "precision": precision,
        "compile": bool(args.compile),
        "times_s": times,
        "warmup_s": warm_s,
        "best_s": best,
        "median_s": sorted(times)[len(times) // 2],
        # process CPU time (all threads): steadier than wall time on a shared machine
        "cpu_s_per_cell": min(cpu_times) / cells,
        "cells_per_s": cells / best,
        "peak_bytes": int(peak),
        "threads": torch.get_num_threads(),
    }


# driver ------------------------------------------------------------------------------------------------------------


def _machine(device: str) -> dict:
    info = machine()  # first: it imports scbert_tl before torch, as our workers do
    import torch

    info["threads"] = int(os.environ.get("BENCH_THREADS") or info.get("auto_threads") or torch.get_num_threads())
    try:
        from importlib.metadata import version

        import performer_pytorch  # noqa: F401

        info["performer_pytorch"] = version("performer-pytorch")
    except Exception:  # noqa: BLE001
        info["performer_pytorch"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _peak_flops(args: argparse.Namespace, machine: dict) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s (given)"
    name = machine.get("gpu", "")
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak, f"{peak / 1e12:g} TFLOP/s ({key} dense bf16 spec, no sparsity)"
    return None, "unknown (pass --peak-tflops)"


def _run_worker(args: argparse.Namespace, impl: str, config: str, mode: str, batch: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--config", config, "--mode", mode]
    cmd += ["--device", args.device, "--batch-size", str(batch), "--repeats", str(repeats)]
    cmd += ["--warmup", str(args.warmup), "--precision", args.precision, "--ref-precision", args.ref_precision]
    return _subprocess(args, cmd, {"impl": impl, "config": config, "mode": mode})


def _subprocess(args: argparse.Namespace, cmd: list[str], what: dict) -> dict:
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.tf32:
        cmd.append("--tf32")
    if args.compile:
        cmd.append("--compile")
    cmd += ["--gemm-size", str(args.gemm_size)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**what, "error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0:
        return {**what, "error": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_mem(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def _measure_all(args: argparse.Namespace, contention: str, peak: float | None) -> tuple[list[dict], list[dict], dict]:
    """Every (configuration, mode) for ours and the reference, and the CPU roofline, under one contention mode."""
    from scbert_tl.model import ScBERTConfig

    configs = list(CONFIGS) if args.config == "all" else [args.config]
    modes = ["forward", "train"] if args.mode == "both" else [args.mode]
    impls = ["ours"] if args.skip_reference else ["ours", "reference"]
    rows, results = [], []
    load_before = os.getloadavg()
    with competing_process(contention == "busy"):
        gemm = _roofline(args)  # before and after the measurements; the better one counts
        for config in configs:
            batch_default, repeats_default = DEFAULTS[args.device][config]
            batch = args.batch_size or batch_default
            repeats = args.repeats or repeats_default
            flops = ScBERTConfig(**_config(config)).flops_per_cell()
            for mode in modes:
                best: dict[str, dict] = {}
                for _ in range(args.rounds):
                    for impl in impls:
                        r = _run_worker(args, impl, config, mode, batch, repeats)
                        r["contention"] = contention
                        results.append(r)
                        if "error" in r:
                            print(f"  {impl} {config} {mode} failed:\n{r['error']}", file=sys.stderr)
                            continue
                        if impl not in best or r["best_s"] < best[impl]["best_s"]:
                            best[impl] = r
                ours, ref = best.get("ours"), best.get("reference")
                row = {"contention": contention, "config": config, "mode": mode, "batch_size": batch}
                for name, r in (("ours", ours), ("reference", ref)):
                    row[f"{name}_cells_per_s"] = r["cells_per_s"] if r else None
                    row[f"{name}_peak_bytes"] = r["peak_bytes"] if r else None
                    row[f"{name}_precision"] = r["precision"] if r else None
                    row[f"{name}_threads"] = r["threads"] if r else None
                    row[f"{name}_cpu_s_per_cell"] = r.get("cpu_s_per_cell") if r else None
                if ours and ref:
                    row["throughput_ratio"] = ours["cells_per_s"] / ref["cells_per_s"]
                    row["memory_ratio"] = ours["peak_bytes"] / max(ref["peak_bytes"], 1)
                factor = 1 if mode == "forward" else 3
                for name, r in (("ours", ours), ("reference", ref)):
                    if r and peak:
                        row[f"{name}_mfu"] = factor * flops * r["cells_per_s"] / peak
                rows.append(row)
        after = _roofline(args)
    if gemm and after and after["flops"] > gemm["flops"]:
        gemm = after
    if gemm:
        for row in rows:
            for name in ("ours", "reference"):
                if row.get(f"{name}_cells_per_s"):
                    factor = 1 if row["mode"] == "forward" else 3
                    flops = ScBERTConfig(**_config(row["config"])).flops_per_cell()
                    row[f"{name}_of_roofline"] = factor * flops * row[f"{name}_cells_per_s"] / gemm["flops"]
    return rows, results, {"gemm": gemm, "load_before": load_before, "load_after": os.getloadavg()}


def _roofline(args: argparse.Namespace) -> dict | None:
    if args.device != "cpu":
        return None
    gemm = _subprocess(args, [sys.executable, __file__, "--roofline"], {"roofline": True})
    if "error" in gemm:
        print(f"  roofline failed:\n{gemm['error']}", file=sys.stderr)
        return None
    return gemm


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--mode", choices=["forward", "train", "both"], default="both")
    p.add_argument(
        "--contention",
        choices=["quiet", "busy", "both"],
        default="quiet",
        help="busy: one competing CPU-bound process runs beside every measurement (default: quiet)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="cells per step (default depends on device/config)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps; the best is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1, help="alternate ours/reference this many times; keep the best")
    p.add_argument(
        "--threads", type=int, default=None, help="threads of both (default: each its own; ours settings.n_threads)"
    )
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--ref-precision", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for float32 CUDA matmuls (both implementations)")
    p.add_argument("--compile", action="store_true", help="torch.compile our network for the forward benchmark")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for model FLOP utilisation")
    p.add_argument("--gemm-size", type=int, default=2048, help="side of the square float32 GEMM of the CPU roofline")
    p.add_argument("--timeout", type=float, default=None, help="seconds one measurement may take")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--roofline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["ours", "reference"], default="ours", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.precision == "auto":
        args.precision = "bfloat16" if args.device == "cuda" else "float32"

    if args.worker or args.roofline:
        print(json.dumps(worker(args) if args.worker else roofline(args)))
        return 0

    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)
    info = _machine(args.device)
    peak, peak_note = _peak_flops(args, info) if args.device == "cuda" else (None, "")
    print(f"device: {info.get('gpu', 'cpu')} | {describe(info)}")
    print(
        f"threads {info['threads']} | oneDNN {info.get('onednn')} | OpenMP passive waiting (ours) "
        f"{info.get('omp_passive')} | performer-pytorch {info['performer_pytorch']}"
    )
    contentions = ["quiet", "busy"] if args.contention == "both" else [args.contention]
    rows, results, runs = [], [], {}
    for contention in contentions:
        r, res, run = _measure_all(args, contention, peak)
        rows += r
        results += res
        runs[contention] = run
        _print_table(r, run, peak, peak_note, contention)
    if args.out:
        payload = {
            "machine": info,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "peak_flops": peak,
            "peak_note": peak_note,
            "runs": runs,
            "summary": rows,
            "results": results,
        }
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    return 0


def _print_table(rows: list[dict], run: dict, peak: float | None, peak_note: str, contention: str) -> None:
    gemm = run["gemm"]
    print(f"\n[{contention}] load average before {run['load_before'][0]:.2f}, after {run['load_after'][0]:.2f}", end="")
    if gemm:
        print(
            f"; float32 GEMM roofline ({gemm['size']}^3, {gemm['threads']} threads): "
            + ", ".join(f"{k[:-6]} {v / 1e9:.0f}" for k, v in gemm.items() if k.endswith("_flops"))
            + " GFLOP/s",
            end="",
        )
    print()
    frac = "roofline" if gemm else ("MFU" if peak else None)
    head = f"{'config':8} {'mode':8} {'batch':>5} {'ours cells/s':>13} {'ref cells/s':>12} {'ratio':>6} "
    head += f"{'ours peak':>11} {'ref peak':>11} {'mem ratio':>9}"
    print(head + (f" {'ours ' + frac:>14} {'ref ' + frac:>13}" if frac else ""))
    key = "of_roofline" if gemm else "mfu"
    for r in rows:
        oc, rc = r["ours_cells_per_s"], r["reference_cells_per_s"]
        line = (
            f"{r['config']:8} {r['mode']:8} {r['batch_size']:>5} {oc or float('nan'):>13.3f} "
            f"{rc or float('nan'):>12.3f} {r.get('throughput_ratio', float('nan')):>5.2f}x "
            f"{_fmt_mem(r['ours_peak_bytes']):>11} {_fmt_mem(r['reference_peak_bytes']):>11} "
            f"{r.get('memory_ratio', float('nan')):>8.2f}x"
        )
        if frac:
            line += f" {100 * r.get('ours_' + key, float('nan')):13.1f}% {100 * r.get('reference_' + key, float('nan')):12.1f}%"
        print(line)
    print(
        f"threads: ours {rows[0]['ours_threads'] if rows else '-'}, reference {rows[0]['reference_threads'] if rows else '-'}"
    )
    for r in rows:  # process CPU time (all threads): steadier than wall time on a shared machine
        ours, ref = r.get("ours_cpu_s_per_cell"), r.get("reference_cpu_s_per_cell")
        if ours:
            line = f"CPU time per cell, {r['config']} {r['mode']}: ours {1e3 * ours:.1f} ms"
            print(line + (f", reference {1e3 * ref:.1f} ms" if ref else ""))
    if frac == "roofline":
        print(
            "of roofline: encoder matmul FLOPs (ScBERTConfig.flops_per_cell; training = 3x) x cells/s / the GEMM roofline"
        )
    elif frac:
        print(f"MFU: encoder matmul FLOPs (ScBERTConfig.flops_per_cell; training = 3x) / {peak_note}")


if __name__ == "__main__":
    sys.exit(main())
