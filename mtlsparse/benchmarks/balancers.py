"""`make bench`: training throughput of sparsity methods vs dense on real Multi-Fashion.

Trains `hps` for a fixed number of steps per method (best of `--repeats` interleaved runs,
to damp noise from other processes), reports samples/s and the ratio to dense (goal ≤ 1.10× cost,
i.e. ratio ≥ 0.91), and the share of step time spent producing batches.
Writes `bench/results.json` and `bench/results.md`.

`--balancers pcgrad,upgrad,...` (or `all`) times loss balancers instead: training step time
of each (dense method) relative to `linear`, written to `bench/balancers.{json,md}`.
`--overrides` adds Hydra overrides to every run (e.g. `dataset=synthetic` for a quick smoke).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from mtlsparse.config import CONF_DIR, build, compose_config
from mtlsparse.io import atomic_write_text, write_json
from mtlsparse.train import run

# λ values that do sparsify within the benchmark's steps, so the prox work is representative
METHOD_OVERRIDES = {"dense": ["method=dense"], "l1": ["method=l1", "lam=0.3"],
                    "group_lasso": ["method=group_lasso", "lam=1e-3"],
                    "group_lasso_plain": ["method=group_lasso", "method.prox=plain", "lam=0.3"]}


def bench_overrides(steps: int, data_root: str) -> list[str]:
    """Fixed-step training, no validation/test work beyond one batch."""
    return ["trainer=cpu", "trainer.max_epochs=1000", f"trainer.max_steps={steps}", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", f"data_root={data_root}"]


def data_seconds_per_batch(overrides: list[str], batches: int) -> float:
    """Time to produce one training batch (indexing + normalisation), no model."""
    dm = build(compose_config(overrides), "dataset")
    dm.prepare_data()
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return (time.perf_counter() - start) / batches


def measure_once(method: str, steps: int, data_root: str) -> dict[str, float]:
    """Training throughput and final sparsity of one short run."""
    with tempfile.TemporaryDirectory() as run_dir:
        metrics = run(compose_config(bench_overrides(steps, data_root) + METHOD_OVERRIDES[method]), run_dir)
    return {"samples_per_s": metrics["time/train_samples_per_s"], "sparsity_group": metrics["sparsity/group"],
            "sparsity_param": metrics["sparsity/param"]}


def measure(methods: list[str], steps: int, repeats: int, data_root: str) -> dict[str, dict[str, float]]:
    """Best-of-`repeats` throughput per method; methods take turns within each repeat so
    drifting machine load and warm-up affect them alike."""
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for method in methods:
            result = measure_once(method, steps, data_root)
            if result["samples_per_s"] > best.get(method, {}).get("samples_per_s", 0):
                best[method] = result
    return best


def measure_balancers(balancers: list[str], steps: int, repeats: int, overrides: list[str]) -> dict[str, float]:
    """Best-of-`repeats` samples/s per balancer, balancers taking turns within each repeat (as `measure`)."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        for balancer in balancers:
            with tempfile.TemporaryDirectory() as run_dir:
                metrics = run(compose_config(overrides + [f"balancer={balancer}"]), run_dir)
            best[balancer] = max(best.get(balancer, 0.0), metrics["time/train_samples_per_s"])
    return best


def balancer_markdown(results: dict) -> str:
    """Table of step time per balancer relative to `linear`."""
    base = results["balancers"]["linear"]
    title = (f"Training step time by balancer, {results['steps']} steps of batch {results['batch_size']}, best of "
             f"{results['repeats']} (CPU, {results['threads']} threads; overrides: {' '.join(results['overrides'])}).")
    lines = [title, "", "| balancer | samples/s | ms / step | step time vs linear |", "|---|---|---|---|"]
    for name, samples_per_s in results["balancers"].items():
        lines.append(f"| {name} | {samples_per_s:.0f} | {1e3 * results['batch_size'] / samples_per_s:.1f} | "
                     f"{base / samples_per_s:.2f}× |")
    return "\n".join(lines) + "\n"


def main_balancers(args: argparse.Namespace) -> None:
    """`--balancers`: time the balancers (dense method) relative to `linear`."""
    import torch

    names = (sorted(p.stem for p in Path(CONF_DIR, "balancer").glob("*.yaml")) if args.balancers == "all"
             else args.balancers.split(","))
    balancers = ["linear"] + [b for b in names if b != "linear"]
    overrides = bench_overrides(args.steps, args.data_root) + args.overrides
    results = {"steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
               "overrides": args.overrides, "batch_size": compose_config(overrides).dataset.batch_size,
               "balancers": measure_balancers(balancers, args.steps, args.repeats, overrides)}
    out = Path(args.out)
    write_json(out / "balancers.json", results)
    table = balancer_markdown(results)
    atomic_write_text(out / "balancers.md", table)
    print(table)


def markdown(results: dict) -> str:
    lines = [f"Training throughput, `hps` on Multi-Fashion, {results['steps']} steps of batch "
             f"{results['batch_size']}, best of {results['repeats']} (CPU, {results['threads']} threads).", "",
             "| method | samples/s | cost vs dense | ≤ 1.10× | group sparsity % | param sparsity % |",
             "|---|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        cost = results["methods"]["dense"]["samples_per_s"] / r["samples_per_s"]
        lines.append(f"| {name} | {r['samples_per_s']:.0f} | {cost:.3f}× | {'yes' if cost <= 1.10 else 'NO'} | "
                     f"{r['sparsity_group']:.1f} | {r['sparsity_param']:.1f} |")
    lines += ["", f"Data loading: {results['data_ms_per_batch']:.2f} ms per batch = "
                  f"{100 * results['data_share']:.1f}% of a dense training step."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="dense,l1,group_lasso,group_lasso_plain")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--out", default="bench")
    parser.add_argument("--balancers", default=None,
                        help="comma-separated balancers (or 'all') to time against linear, instead of the methods")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    if args.balancers:
        main_balancers(args)
        return
    import torch

    methods = ["dense"] + [m for m in args.methods.split(",") if m != "dense"]
    results = {"steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
               "methods": measure(methods, args.steps, args.repeats, args.data_root)}
    cfg = compose_config(bench_overrides(args.steps, args.data_root))
    results["batch_size"] = cfg.dataset.batch_size
    data_s = data_seconds_per_batch(bench_overrides(args.steps, args.data_root), 100)
    step_s = cfg.dataset.batch_size / results["methods"]["dense"]["samples_per_s"]
    results.update(data_ms_per_batch=1e3 * data_s, data_share=data_s / step_s)
    out = Path(args.out)
    write_json(out / "results.json", results)
    table = markdown(results)
    atomic_write_text(out / "results.md", table)
    print(table)


if __name__ == "__main__":
    main()
