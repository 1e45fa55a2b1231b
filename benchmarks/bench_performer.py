"""Throughput and peak memory of scbert-tl's network against performer-pytorch, side by side.

Both networks are built at the same configuration and fed the same random cells. Every measurement
(one implementation x one configuration x forward or training step) runs in its own fresh Python
process, so peak memory is that measurement's own and one run cannot warm the allocator for the
other. Ours and the reference alternate, so a change of machine load hits both.

Examples
--------
CPU, both configurations::

    python benchmarks/bench_performer.py --device cpu --config all --out results-cpu.json

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
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

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
            conf.update({k: COMPACT[k] for k in ("dim", "depth", "heads", "dim_head", "ff_mult") if k in COMPACT})
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
            local_attn_heads=0,
            rotary_position_emb=False,
            attn_out_bias=True,
        )
        net.pos_emb.emb.weight.requires_grad_(conf["gene_emb_trainable"])
    return net.to(device)


def worker(args: argparse.Namespace) -> dict:
    """Measure one (implementation, configuration, mode); returns a JSON-able dict."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
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
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
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
        "cells_per_s": cells / best,
        "peak_bytes": int(peak),
        "threads": torch.get_num_threads(),
    }


# driver ------------------------------------------------------------------------------------------------------------


def _machine(device: str) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": int(os.environ.get("BENCH_THREADS") or torch.get_num_threads()),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    for line in cpuinfo:
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            # oneDNN's gain over MKL depends on the vector instructions: record whether AVX-512 is there
            info["avx512"] = " avx512f" in line
            break
    try:
        from importlib.metadata import version

        import performer_pytorch  # noqa: F401

        info["performer_pytorch"] = version("performer-pytorch")
    except Exception:  # noqa: BLE001
        info["performer_pytorch"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    from scbert_tl.model._favor import onednn_available

    info["onednn"] = onednn_available()
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
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.tf32:
        cmd.append("--tf32")
    if args.compile and impl == "ours":
        cmd.append("--compile")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "config": config, "mode": mode, "error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0:
        return {"impl": impl, "config": config, "mode": mode, "error": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_mem(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--mode", choices=["forward", "train", "both"], default="both")
    p.add_argument("--batch-size", type=int, default=None, help="cells per step (default depends on device/config)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps; the best is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1, help="alternate ours/reference this many times; keep the best")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--ref-precision", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for float32 CUDA matmuls (both implementations)")
    p.add_argument("--compile", action="store_true", help="torch.compile our network for the forward benchmark")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for model FLOP utilisation")
    p.add_argument("--timeout", type=float, default=None, help="seconds one measurement may take")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["ours", "reference"], default="ours", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.precision == "auto":
        args.precision = "bfloat16" if args.device == "cuda" else "float32"

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)
    machine = _machine(args.device)
    peak, peak_note = _peak_flops(args, machine) if args.device == "cuda" else (None, "")
    print(
        f"device: {machine.get('gpu', machine['cpu'])} | cpu: {machine['cpu']} x{machine['cpu_count']} | AVX-512 {machine.get('avx512')}"
    )
    print(
        f"torch {machine['torch']} | threads {machine['threads']} | oneDNN {machine['onednn']} | "
        f"performer-pytorch {machine['performer_pytorch']} | load {os.getloadavg()[0]:.2f}"
    )
    configs = list(CONFIGS) if args.config == "all" else [args.config]
    modes = ["forward", "train"] if args.mode == "both" else [args.mode]
    impls = ["ours"] if args.skip_reference else ["ours", "reference"]
    from scbert_tl.model import ScBERTConfig

    rows, results = [], []
    load_before = os.getloadavg()
    for config in configs:
        batch_default, repeats_default = DEFAULTS[args.device][config]
        batch = args.batch_size or batch_default
        repeats = args.repeats or repeats_default
        conf = _config(config)
        flops = ScBERTConfig(**conf).flops_per_cell()
        for mode in modes:
            best: dict[str, dict] = {}
            for _ in range(args.rounds):
                for impl in impls:
                    r = _run_worker(args, impl, config, mode, batch, repeats)
                    results.append(r)
                    if "error" in r:
                        print(f"  {impl} {config} {mode} failed:\n{r['error']}", file=sys.stderr)
                        continue
                    if impl not in best or r["best_s"] < best[impl]["best_s"]:
                        best[impl] = r
            ours, ref = best.get("ours"), best.get("reference")
            row = {"config": config, "mode": mode, "batch_size": batch}
            for name, r in (("ours", ours), ("reference", ref)):
                row[f"{name}_cells_per_s"] = r["cells_per_s"] if r else None
                row[f"{name}_peak_bytes"] = r["peak_bytes"] if r else None
                row[f"{name}_precision"] = r["precision"] if r else None
            if ours and ref:
                row["throughput_ratio"] = ours["cells_per_s"] / ref["cells_per_s"]
                row["memory_ratio"] = ours["peak_bytes"] / max(ref["peak_bytes"], 1)
            if peak and ours:
                factor = 1 if mode == "forward" else 3
                row["ours_mfu"] = factor * flops * ours["cells_per_s"] / peak
                if ref:
                    row["reference_mfu"] = factor * flops * ref["cells_per_s"] / peak
            rows.append(row)
    load_after = os.getloadavg()

    print(f"\n{'config':8} {'mode':8} {'batch':>5} {'ours cells/s':>13} {'ref cells/s':>12} {'ratio':>6} ", end="")
    print(f"{'ours peak':>11} {'ref peak':>11} {'mem ratio':>9}" + (" ours MFU  ref MFU" if peak else ""))
    for r in rows:
        oc, rc = r["ours_cells_per_s"], r["reference_cells_per_s"]
        print(
            f"{r['config']:8} {r['mode']:8} {r['batch_size']:>5} {oc or float('nan'):>13.3f} "
            f"{rc or float('nan'):>12.3f} {r.get('throughput_ratio', float('nan')):>5.2f}x "
            f"{_fmt_mem(r['ours_peak_bytes']):>11} {_fmt_mem(r['reference_peak_bytes']):>11} "
            f"{r.get('memory_ratio', float('nan')):>8.2f}x",
            end="",
        )
        if peak:
            print(f" {100 * r.get('ours_mfu', float('nan')):7.1f}% {100 * r.get('reference_mfu', float('nan')):7.1f}%")
        else:
            print()
    if peak:
        print(f"MFU: encoder matmul FLOPs (ScBERTConfig.flops_per_cell; training = 3x) / {peak_note}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if args.out:
        payload = {
            "machine": machine,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "peak_flops": peak,
            "peak_note": peak_note,
            "load_before": load_before,
            "load_after": load_after,
            "summary": rows,
            "runs": results,
        }
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
