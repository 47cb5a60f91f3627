"""`make bench`: training throughput of sparsity methods vs dense on real Multi-Fashion.

Trains `hps` for a fixed number of steps per method (best of `--repeats` interleaved runs,
to damp noise from other processes), reports samples/s and the ratio to dense (goal ≤ 1.10× cost,
i.e. ratio ≥ 0.91), and the share of step time spent producing batches.
Writes `bench/results.json` and `bench/results.md`.

`--balancers pcgrad,upgrad,...` (or `all`) times loss balancers instead: training step time
of each (dense method) relative to `linear`, for 2 tasks (Multi-Fashion, `model=hps`) and for
20 tasks (CIFAR-100-20's shapes on random images, `model=vgg16_mt model.width=0.25`), every
gradient balancer on both paths where it has both (`balancer.path=jacobian|gramian`). Each
run times its steps after a warm-up (median per run); the configurations take turns within
each repeat and every ratio is taken against the same repeat's `linear`, and the tables give
the median with its min–max over repeats. The machine's load average and the threads are in
the header. Written to `bench/balancers.{json,md}`. `--device cuda` and `--precision`
(Lightning's, e.g. `16-mixed`) time on a GPU. `--overrides` adds Hydra overrides to every run
(e.g. `dataset=synthetic` for a quick smoke).
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from mtlsparse.config import CONF_DIR, ConfigError, build, compose_config
from mtlsparse.errors import NonFiniteLossError
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


#: the balancer benchmarks: (title, overrides, random CIFAR-100 images instead of the data root,
#: default (timed steps, warm-up steps, repeats), which --steps / --warmup / --repeats override)
SETTINGS = {
    "2": ("2 tasks: Multi-Fashion, model=hps", ["dataset=multi_fashion", "model=hps"], False, (30, 5, 5)),
    "20": ("20 tasks: CIFAR-100-20 shapes on random images, model=vgg16_mt model.width=0.25",
           ["dataset=cifar100_20", "model=vgg16_mt", "model.width=0.25"], True, (8, 2, 3)),
}
#: runs stopped by a non-finite loss that are timed again (the datamodule's next batches)
RETRIES = 5
#: gradient balancers also timed in representation mode (gradients of z: a backward through the heads per task)
REPRESENTATION = ("upgrad", "mgda")


def write_random_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random uint8 images and labels in torchvision's `cifar-100-python` layout (the CIFAR-100-20 shapes)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    superclass = rng.permutation(100) // 5
    directory = root / "cifar-100-python"
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.permutation(np.arange(n) % 100)  # every fine label occurs (the loader derives the mapping)
        with open(directory / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": fine.tolist(),
                         "coarse_labels": superclass[fine].tolist()}, f)
    with open(directory / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f)


def balancer_variants(names: list[str], tasks: list[str]) -> list[dict]:
    """(balancer, mode, path) rows to time: gradient balancers on each path they have, the rest once."""
    rows = []
    for name in names:
        cfg = compose_config([f"balancer={name}"])
        if "path" not in cfg.balancer:
            rows.append({"balancer": name, "mode": None, "path": None})
            continue
        try:
            built = build(compose_config([f"balancer={name}", "balancer.path=gramian"]), "balancer", tasks=tasks)
            paths = ["jacobian", "gramian"]
        except ConfigError:  # a rule that needs the per-task Jacobian
            paths = ["jacobian"]
        else:
            if getattr(getattr(built, "spec", None), "gradient_free", False):  # rlw: no per-task gradients at all
                rows.append({"balancer": name, "mode": None, "path": None})
                continue
        modes = ["params", "representation"] if name in REPRESENTATION else ["params"]
        rows += [{"balancer": name, "mode": mode, "path": path} for mode in modes for path in paths]
    return rows


def row_overrides(row: dict) -> list[str]:
    extra = [f"balancer={row['balancer']}"]
    if row["path"] is not None:
        extra += [f"balancer.mode={row['mode']}", f"balancer.path={row['path']}"]
    return extra


def row_name(row: dict) -> str:
    if row["path"] is None:
        return row["balancer"]
    mode = "" if row["mode"] == "params" else f", {row['mode']}"
    return f"{row['balancer']} ({row['path']}{mode})"


def time_steps(cfg, datamodule, steps: int, warmup: int, device: str, precision: str) -> list[float]:
    """Seconds of each training step after `warmup` steps (forward, balancer, backward, optimizer step, hooks)."""
    import lightning as L
    import torch

    from mtlsparse.train import build_module

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_train_batch_start(self, *args) -> None:
            sync()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            sync()
            self.times.append(time.perf_counter() - self.start)

    L.seed_everything(cfg.seed, verbose=False)
    module = build_module(cfg, datamodule)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                        max_steps=warmup + steps, max_epochs=cfg.trainer.max_epochs, limit_val_batches=0,
                        num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    return timer.times[warmup:]


def measure_setting(rows: list[dict], base: list[str], args: argparse.Namespace, datamodule) -> list[dict]:
    """Median step time of each row per repeat (rows take turns, the order reversed every other repeat).

    `args.steps`, `args.warmup`, `args.repeats` are this setting's.
    """
    per_repeat: dict[str, list[float | None]] = {row_name(row): [] for row in rows}
    retries: dict[str, int] = {}
    failures: dict[str, str] = {}
    for repeat in range(args.repeats):
        order = rows if repeat % 2 == 0 else rows[::-1]
        for row in order:
            cfg = compose_config(base + row_overrides(row) + args.overrides)
            name, median = row_name(row), None
            for attempt in range(RETRIES + 1):
                try:
                    median = statistics.median(time_steps(cfg, datamodule, args.steps, args.warmup, args.device,
                                                          args.precision))
                    break
                except NonFiniteLossError as err:  # e.g. a batch without any image of a superclass: L_t = 0
                    retries[name] = retries.get(name, 0) + 1
                    failures[name] = str(err).split(":")[0]
                    print(f"  {name}: {str(err)[:160]}...; timing it again on the next batches", flush=True)
                except Exception as err:  # one balancer's failure is its row's, not the benchmark's
                    failures[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    print(f"  {name}: {failures[name]}", flush=True)
                    break
            per_repeat[name].append(median)
            shown = "failed" if median is None else f"{1e3 * median:.1f} ms/step"
            print(f"  repeat {repeat + 1}/{args.repeats} {name}: {shown}", flush=True)
    linear = per_repeat["linear"]
    results = []
    for row in rows:
        name = row_name(row)
        pairs = [(t, base_t) for t, base_t in zip(per_repeat[name], linear) if t is not None and base_t is not None]
        if not pairs:
            results.append({**row, "name": name, "failed": failures.get(name, "no run"),
                            "non_finite_retries": retries.get(name, 0)})
            continue
        seconds = [t for t, _ in pairs]
        ratios = [t / base_t for t, base_t in pairs]
        entry = {**row, "name": name, "ms_per_step": 1e3 * statistics.median(seconds),
                 "ms_min": 1e3 * min(seconds), "ms_max": 1e3 * max(seconds), "vs_linear": statistics.median(ratios),
                 "vs_linear_min": min(ratios), "vs_linear_max": max(ratios), "repeats_ms": [1e3 * t for t in seconds],
                 "non_finite_retries": retries.get(name, 0)}
        jacobian = per_repeat.get(row_name({**row, "path": "jacobian"}), []) if row["path"] == "gramian" else []
        speedups = [j / g for j, g in zip(jacobian, per_repeat[name]) if j is not None and g is not None]
        if speedups:
            entry.update(speedup=statistics.median(speedups), speedup_min=min(speedups), speedup_max=max(speedups))
        results.append(entry)
    return results


def setting_markdown(setting: dict) -> str:
    """One table: step time per balancer (and path) relative to `linear`, median and min–max over repeats."""
    load = ", ".join(f"{a:.2f}→{b:.2f}" for a, b in zip(setting.get("load_start", []), setting.get("load_end", [])))
    lines = [f"### {setting['title']}", "",
             f"Batch {setting['batch_size']}, {setting['steps']} timed steps after {setting['warmup']} warm-up steps "
             f"per run, {setting['repeats']} repeats (median per run; the table gives the median over repeats and "
             f"its min–max){f'; load average 1/5/15 min at start→end of this table: {load}' if load else ''}"
             f"{'; ' + setting['load_note'] if setting.get('load_note') else ''}.", "",
             "| balancer (path) | ms / step | min–max | step time vs linear | min–max | Jacobian / Gramian |",
             "|---|---|---|---|---|---|"]
    for r in setting["rows"]:
        if "failed" in r:
            lines.append(f"| {r['name']} | failed every time: {r['failed']} | | | | |")
            continue
        speedup = (f"{r['speedup']:.2f}× ({r['speedup_min']:.2f}–{r['speedup_max']:.2f})" if "speedup" in r
                   else "")
        lines.append(f"| {r['name']} | {r['ms_per_step']:.1f} | {r['ms_min']:.1f}–{r['ms_max']:.1f} | "
                     f"{r['vs_linear']:.2f}× | {r['vs_linear_min']:.2f}–{r['vs_linear_max']:.2f} | {speedup} |")
    retried = [f"{r['name']} ({r['non_finite_retries']})" for r in setting["rows"] if r.get("non_finite_retries")]
    if retried:
        lines += ["", "Runs stopped by a non-finite training loss and timed again on the next batches: "
                  f"{', '.join(retried)}."]
    return "\n".join(lines) + "\n"


def goals_markdown(results: dict) -> str:
    """Issue #18's goals against the measurements: ≤ 1.3× linear at 2 tasks, ≥ 3× over the Jacobian path at 20."""
    lines = []
    two, twenty = results["settings"].get("2"), results["settings"].get("20")
    if two:
        best: dict[str, float] = {}
        for r in two["rows"]:
            if r["path"] is not None and r["mode"] == "params" and "failed" not in r:
                best[r["balancer"]] = min(best.get(r["balancer"], float("inf")), r["vs_linear"])
        if best:
            met = sorted(b for b, v in best.items() if v <= 1.3)
            lines.append(f"- 2 tasks, gradient balancers at ≤ 1.3× linear (faster path, params mode): {len(met)} of "
                         f"{len(best)} ({', '.join(met) or 'none'}); their step time is {min(best.values()):.2f}–"
                         f"{max(best.values()):.2f}× linear.")
    if twenty:
        speedups = {r["balancer"]: r["speedup"] for r in twenty["rows"] if "speedup" in r and r["mode"] == "params"}
        if speedups:
            lines.append(f"- 20 tasks, Gramian path ≥ 3× faster than the Jacobian path (params mode): "
                         f"{sum(v >= 3 for v in speedups.values())} of {len(speedups)}; Jacobian / Gramian step time "
                         f"{min(speedups.values()):.2f}–{max(speedups.values()):.2f}×.")
    return "\n".join(["Issue #18's goals:", "", *lines, ""]) if lines else ""


def balancer_markdown(results: dict) -> str:
    """Header (machine, threads, load) and one table per setting."""
    load = ", ".join(f"{a:.2f}→{b:.2f}" for a, b in zip(results["load_start"], results["load_end"]))
    header = (f"Training step time by balancer ({results['device']}, precision {results['precision']}, "
              f"{results['threads']} torch threads, OMP_NUM_THREADS={results['omp_num_threads']}, "
              f"{results['cpus']} CPUs; load average 1/5/15 min at start→end: {load}; "
              f"extra overrides: {' '.join(results['overrides']) or 'none'}).")
    return "\n".join([header, "", *(setting_markdown(s) for s in results["settings"].values()),
                      goals_markdown(results)])


#: configurations of the memory probe (`--memory`): linear, and the two paths of upgrad and mgda
MEMORY_ROWS = [{"balancer": "linear", "mode": None, "path": None}] + [
    {"balancer": name, "mode": "params", "path": path} for name in ("upgrad", "mgda")
    for path in ("jacobian", "gramian")]


def _memory_probe(overrides: list[str], device: str, queue) -> None:
    """In a fresh process: peak memory of training steps (forward, balancer, backward) above model and batch."""
    try:
        queue.put(_probe_steps(overrides, device))
    except Exception as err:  # reported in the table rather than leaving the parent waiting
        queue.put({"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})


def _probe_steps(overrides: list[str], device: str) -> dict:
    import resource

    import torch

    from mtlsparse.gradients import trainable_shared
    from mtlsparse.train import build_module

    torch.set_num_threads(1)
    cfg = compose_config(overrides)
    datamodule = build(cfg, "dataset")
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, datamodule).to(device).train()
    x, y = next(iter(datamodule.train_dataloader()))
    x, y = x.to(device), {t: v.to(device) for t, v in y.items()}
    shared = trainable_shared(list(module.model.shared_parameters()), "probe")
    extra = []
    for _ in range(3):  # CUDA: the least of three steps (the first builds solvers); CPU: the process's peak RSS
        module.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            module.training_step((x, y), 0).backward()
        peak = (torch.cuda.max_memory_allocated() if device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        extra.append(peak - base)
    params = sum(p.numel() for p in shared)
    return {"step_extra_mib": min(extra) / 2**20, "shared_params": params,
            "jacobian_mib": len(datamodule.tasks) * params * shared[0].element_size() / 2**20}


def main_memory(args: argparse.Namespace) -> None:
    """`--balancers ... --memory`: peak memory of a step per path (one fresh process per configuration)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = {"device": args.device, "settings": {}}
    how = "peak allocated CUDA memory" if args.device == "cuda" else "peak RSS of a fresh process over 3 steps"
    lines = [f"Peak memory of a training step (forward, balancer, backward) above the model and its batch "
             f"({args.device}; {how}), and the size J would have (m × shared parameters).", ""]
    with tempfile.TemporaryDirectory() as scratch:
        for key in args.settings.split(","):
            title, overrides, random_cifar, _ = SETTINGS[key]
            root = args.data_root
            if random_cifar:
                root = str(Path(scratch) / "cifar")
                write_random_cifar100(Path(root), n_train=512, n_test=128)
            base = [*bench_overrides(1, root), *overrides]
            rows = []
            for row in MEMORY_ROWS:
                queue = context.Queue()
                process = context.Process(target=_memory_probe,
                                          args=(base + row_overrides(row) + args.overrides, args.device, queue))
                process.start()
                measured = queue.get()
                process.join()
                rows.append({**row, "name": row_name(row), **measured})
                print(f"  {title}: {row_name(row)}: {measured}", flush=True)
            results["settings"][key] = {"title": title, "rows": rows}
            sized = [r for r in rows if "jacobian_mib" in r]
            lines += [f"### {title}", "", f"J would be {sized[0]['jacobian_mib']:.1f} MiB "
                      f"({sized[0]['shared_params']} shared parameters)." if sized else "", "",
                      "| balancer (path) | step memory, MiB |", "|---|---|",
                      *(f"| {r['name']} | {r['step_extra_mib']:.0f} |" if "error" not in r
                        else f"| {r['name']} | failed: {r['error']} |" for r in rows), ""]
    out = Path(args.out)
    write_json(out / "balancers_memory.json", results)
    atomic_write_text(out / "balancers_memory.md", "\n".join(lines))
    print("\n".join(lines))


def main_balancers(args: argparse.Namespace) -> None:
    """`--balancers`: time the balancers (dense method) relative to `linear`, per setting."""
    import torch

    torch.set_num_threads(args.threads)
    names = (sorted(p.stem for p in Path(CONF_DIR, "balancer").glob("*.yaml")) if args.balancers == "all"
             else args.balancers.split(","))
    names = ["linear"] + [b for b in names if b != "linear"]
    results = {"device": args.device, "precision": args.precision, "threads": torch.get_num_threads(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "cpus": os.cpu_count(),
               "overrides": args.overrides, "load_start": list(os.getloadavg()), "settings": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for key in args.settings.split(","):
            title, overrides, random_cifar, (steps, warmup, repeats) = SETTINGS[key]
            setting_args = argparse.Namespace(**{**vars(args), "steps": args.steps or steps,
                                                 "warmup": warmup if args.warmup is None else args.warmup,
                                                 "repeats": args.repeats or repeats})
            root = args.data_root
            if random_cifar:
                root = str(Path(scratch) / "cifar")
                write_random_cifar100(Path(root), n_test=256, n_train=128 * (
                    setting_args.steps + setting_args.warmup + 4) * 10 // 9 + 128)
            base = [*bench_overrides(setting_args.steps, root), *overrides]
            cfg = compose_config(base + args.overrides)
            datamodule = build(cfg, "dataset")
            datamodule.prepare_data()
            datamodule.setup("fit")
            rows = balancer_variants(names, list(datamodule.tasks))
            print(f"{title}: {len(rows)} configurations", flush=True)
            load_start = list(os.getloadavg())
            measured = measure_setting(rows, base, setting_args, datamodule)
            results["settings"][key] = {"title": title, "batch_size": cfg.dataset.batch_size,
                                        "num_tasks": len(datamodule.tasks), "steps": setting_args.steps,
                                        "warmup": setting_args.warmup, "repeats": setting_args.repeats,
                                        "load_start": load_start, "load_end": list(os.getloadavg()),
                                        "rows": measured}
    results["load_end"] = list(os.getloadavg())
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
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per run (methods: 300; balancers: 30 at 2 tasks, 8 at 20 tasks)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (methods: 3; balancers: 5 / 3)")
    parser.add_argument("--methods", default="dense,l1,group_lasso,group_lasso_plain")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--out", default="bench")
    parser.add_argument("--balancers", default=None,
                        help="comma-separated balancers (or 'all') to time against linear, instead of the methods")
    parser.add_argument("--settings", default="2,20",
                        help="balancer benchmarks to run: 2 (Multi-Fashion, hps), 20 (CIFAR-100-20 shapes, VGG-16/4)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps at the start of each balancer run (5 at 2 tasks, 2 at 20 tasks)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the balancer benchmark")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="balancer benchmark device")
    parser.add_argument("--precision", default="32-true",
                        help="Lightning precision of the balancer benchmark (32-true, 16-mixed, bf16-mixed, ...)")
    parser.add_argument("--memory", action="store_true",
                        help="instead of timing: peak step memory of linear, upgrad and mgda on each path "
                             "(bench/balancers_memory.{json,md})")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    if args.memory:
        main_memory(args)
        return
    if args.balancers:
        main_balancers(args)
        return
    args.steps = 300 if args.steps is None else args.steps
    args.repeats = 3 if args.repeats is None else args.repeats
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
