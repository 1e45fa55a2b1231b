"""What a compact cell costs: the training step and the forward pass of the compact model, by preset.

The presets alternate in one process (round after round, the same cells), so their times are compared
under the same load; the median over rounds is reported with the range, and every preset relative to
the first. Presets: the first compact configuration (two layers, feed-forward x4, 44 random features
per head, the attention's features recomputed in the backward pass), the previous one (two layers,
feed-forward x2, 24 features, features kept from the forward pass: ``KEEP_FEATURES_BYTES``) and
today's (``model="compact"``).

    python benchmarks/bench_compact.py --out compact.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import describe, machine  # noqa: E402


def _variants(compact: dict, keep: int) -> dict[str, tuple[dict, int]]:
    def name(conf: dict) -> str:
        layers = f"{conf['depth']} layer" + ("s" if conf["depth"] > 1 else "")
        return f"{layers}, ff x{conf['ff_mult']}, {conf['n_features']} features"

    first, previous = dict(compact, depth=2, ff_mult=4, n_features=44), dict(compact, depth=2, ff_mult=2, n_features=24)
    return {
        f"first: {name(first)}, recomputed": (first, 0),
        f"previous: {name(previous)}, kept": (previous, keep),
        f"today: {name(compact)}, kept": (compact, keep),
    }


def main() -> None:
    """Run the comparison and print (and optionally write) the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["train", "forward", "both"], default="both")
    p.add_argument("--batch-size", type=int, default=32, help="cells per step (fine-tuning's default)")
    p.add_argument("--steps", type=int, default=4, help="steps per variant and round")
    p.add_argument("--rounds", type=int, default=8, help="rounds over all variants")
    p.add_argument("--threads", type=int, default=None, help="scbert.settings.n_threads (default: 'auto')")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()

    import scbert_tl

    if args.threads:
        scbert_tl.settings.n_threads = args.threads
    import torch

    from scbert_tl.model import ScBERTConfig, ScBERTNetwork
    from scbert_tl.model import _favor as favor
    from scbert_tl.tl._resolve import COMPACT, COMPACT_GENES
    from scbert_tl.train._runtime import cpu_runtime

    info = machine()
    print(describe(info), flush=True)
    variants = _variants(COMPACT, favor.KEEP_FEATURES_BYTES)
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.85, 0.06, 0.04, 0.025, 0.015, 0.01])  # sparse like real cells
    cells = args.batch_size
    tokens = torch.multinomial(probs, cells * COMPACT_GENES, replacement=True, generator=g).view(cells, -1)
    labels = torch.randint(0, 9, (cells,), generator=g)
    modes = ["train", "forward"] if args.mode == "both" else [args.mode]
    results: dict = {"machine": info, "batch_size": cells, "rounds": args.rounds, "steps": args.steps}
    with cpu_runtime("cpu") as threads:
        results["threads"] = threads
        nets = {}
        for name, (conf, keep) in variants.items():
            torch.manual_seed(0)
            net = ScBERTNetwork(ScBERTConfig(n_genes=COMPACT_GENES, n_classes=9, gene_emb_trainable=True, **conf))
            nets[name] = (net, torch.optim.AdamW(net.parameters(), lr=1e-3), keep)

        def step(name: str, mode: str) -> None:
            net, opt, keep = nets[name]
            favor.KEEP_FEATURES_BYTES = keep
            if mode == "forward":
                with torch.inference_mode():
                    net(tokens)
                return
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(tokens), labels).backward()
            opt.step()

        for mode in modes:
            names = list(variants)
            times: dict[str, list[float]] = {n: [] for n in names}
            for n in names:  # warm-up
                step(n, mode)
            load = [os.getloadavg()[0]]
            for _ in range(args.rounds):
                for n in names:
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step(n, mode)
                    times[n].append((time.perf_counter() - start) / args.steps / cells * 1e3)
            load.append(os.getloadavg()[0])
            first = statistics.median(times[names[0]])
            print(f"\n{mode}, batch {cells}, {threads} threads, load average {load[0]:.2f} -> {load[1]:.2f}")
            rows = []
            for n in names:
                med = statistics.median(times[n])
                label = n if mode == "train" else n.rsplit(",", 1)[0]  # the forward pass keeps nothing
                rows.append({"variant": label, "median_ms_per_cell": med, "min": min(times[n]), "max": max(times[n])})
                print(f"  {label:58s} {med:6.2f} ms/cell ({min(times[n]):.2f}-{max(times[n]):.2f})  x{med / first:.2f}")
            results[mode] = {"load": load, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
