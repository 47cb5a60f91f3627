"""Can the code changes since a README table was measured have moved its numbers?

    python tools/table_drift.py OUT_DIR [TABLE ...]     # default: every table below

For each README results table, the commit it was measured on and a tiny version of each of its
commands (real Multi-Fashion, a few steps, seed 0, 1 thread). Each command runs twice, in the same
Python environment: once on a `git worktree` of the table's commit and once on this checkout.
A command whose test and sparsity metrics come out bit-identical on both trees follows the same
code path on both, so the code changed since then cannot have moved that row; any difference
means the row has to be re-measured. Environment changes (torch, torchvision, ...) are not what
this checks: both runs share one environment. Writes OUT_DIR/drift.json and prints a table.
Runs are kept under OUT_DIR/<commit>/<table>/<case> and reused by a later call for the same commit;
the worktrees stay registered in this repository (`git worktree remove OUT_DIR/tree-<commit>`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["trainer.limit_train_batches=6", "trainer.limit_val_batches=2", "trainer.limit_test_batches=4",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "trainer.max_epochs=2"]
# table: (commit it was measured on, {case: overrides or (commit, overrides) for a row added later});
# each case shrinks its command's schedule to the tiny budget
Case = list[str] | tuple[str, list[str]]
TABLES: dict[str, tuple[str, dict[str, Case]]] = {
    "default_and_group_lasso": ("fc8e917", {
        "default": [],
        "group_lasso_refit": ["method=group_lasso", "lam=2.75e-3", "method.finetune_epochs=1",
                              "trainer.max_epochs=3"],
        # `couple_norms` came in 8843a31, after the table's first rows
        "group_lasso_coupled": ("8843a31", ["method=group_lasso", "lam=2e-3", "method.finetune_epochs=1",
                                            "method.couple_norms=true", "trainer.max_epochs=3"]),
        "hps_lenet": ["model=hps_lenet"],
    }),
    "pruning_dst": ("279040a", {
        "magnitude": ["method=magnitude", "sparsity=0.9", "method.prune_epoch=1", "trainer.max_epochs=3"],
        "magnitude_minmax": ["method=magnitude", "sparsity=0.9", "method.prune_epoch=1", "trainer.max_epochs=3",
                             "balancer=minmax", "balancer.update_every=2"],
        "reweighted_l1": ["method=reweighted_l1", "sparsity=0.9", "method.pretrain_epochs=1",
                          "method.reweight_epochs=1", "method.refresh_every=1", "trainer.max_epochs=3"],
        "snip": ["method=snip", "sparsity=0.9"],
        "disparse_static": ["method=disparse_static", "sparsity=0.9"],
        "set": ["method=set", "sparsity=0.9", "method.update_interval=3"],
        "rigl": ["method=rigl", "sparsity=0.9", "method.update_interval=3"],
        "rigl_minmax": ["method=rigl", "sparsity=0.9", "method.update_interval=3", "balancer=minmax",
                        "balancer.update_every=2"],
        "disparse_dynamic": ["method=disparse_dynamic", "sparsity=0.9", "method.update_interval=3"],
        "minmax_dst": ["method=minmax_dst", "sparsity=0.9", "method.update_every=1", "method.end_epoch=1"],
    }),
    "balancers": ("d3c8b96", {
        **{b: [f"balancer={b}"] for b in ("linear", "uncertainty", "dwa", "rlw", "gradnorm", "famo", "mgda",
                                          "upgrad", "pcgrad", "cagrad", "nashmtl", "imtl_g", "aligned_mtl",
                                          "graddrop", "dualproj", "gradvac")},
        **{f"{b}_group_lasso": [f"balancer={b}", "method=group_lasso", "lam=3e-3"]
           for b in ("linear", "uncertainty", "mgda", "pcgrad", "nashmtl")},
    }),
    "mdmtn_short": ("36ff9f9", {
        "hps_lenet_mgda": ["model=hps_lenet", "balancer=mgda"],
        "hps_lenet_chebyshev": ["model=hps_lenet", "balancer=chebyshev", "k0=0", "balancer.epochs_per_iteration=1"],
        "mdmtn_chebyshev": ["model=mdmtn", "balancer=chebyshev", "k0=0", "balancer.epochs_per_iteration=1"],
        "mdmtn_growl": ["model=mdmtn", "balancer=chebyshev", "method=growl", "k0=1e-3", "k=[0.5,0.499]",
                        "method.lam=15", "balancer.epochs_per_iteration=1", "method.phase1_iterations=1",
                        "method.phase2_iterations=1"],
        "stl": ["model=stl"],
        "mtan": ["model=mtan"],
    }),
}
COMPARED = ("test/", "sparsity/", "val/")


def _worktree(commit: str, root: Path) -> Path:
    tree = root / f"tree-{commit}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit],
                       check=True, capture_output=True)
    return tree


def _head_label() -> str:
    """This checkout's commit, `-dirty` with uncommitted changes: its runs are kept under this name."""
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True,
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           check=True, capture_output=True, text=True).stdout.strip()
    return f"{rev}-dirty" if dirty else rev


def _run(tree: Path, overrides: list[str], run_dir: Path, data: Path) -> dict | str:
    """One `python -m mtlsparse` on `tree`'s code; its compared metrics, or the error's last line.
    A finished run of a committed tree is reused; a `-dirty` tree's code may have changed since, so it reruns."""
    metrics = run_dir / "metrics.json"
    if run_dir.parent.name.endswith("-dirty"):
        shutil.rmtree(run_dir, ignore_errors=True)
    if not metrics.exists():
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(tree), "MTLSPARSE_DATA": str(data), "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "mtlsparse", "dataset=multi_fashion", *TINY, *overrides,
                               f"hydra.run.dir={run_dir}"], env=env, cwd=run_dir.parent, capture_output=True,
                              text=True)
        if proc.returncode != 0 or not metrics.exists():
            return (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {k: v for k, v in json.loads(metrics.read_text()).items() if k.startswith(COMPARED)}


def _compare(old: dict | str, new: dict | str) -> str:
    if isinstance(old, str) or isinstance(new, str):
        return f"failed: {old if isinstance(old, str) else new}"
    shared = old.keys() & new.keys()
    differing = sorted(k for k in shared if old[k] != new[k])
    if not shared:
        return "no shared metrics"
    if not differing:
        return f"identical ({len(shared)} metrics)"
    worst = max(differing, key=lambda k: abs(float(old[k]) - float(new[k])))
    return f"{len(differing)} of {len(shared)} differ; largest {worst}: {old[worst]} → {new[worst]}"


def main(out: Path, tables: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    head = _head_label()
    report, moved = {}, 0
    for table in tables:
        table_commit, cases = TABLES[table]
        for case, spec in cases.items():
            commit, overrides = spec if isinstance(spec, tuple) else (table_commit, spec)
            old = _run(_worktree(commit, out), overrides, out / commit / table / case, out / f"data-{commit}")
            new = _run(REPO, overrides, out / head / table / case, out / "data-HEAD")
            verdict = _compare(old, new)
            moved += not verdict.startswith("identical")
            report[f"{table}/{case}"] = {"commit": commit, "against": head, "overrides": overrides,
                                         "verdict": verdict}
            print(f"| {table} | {commit} | {case} | {verdict} |", flush=True)
            (out / "drift.json").write_text(json.dumps(report, indent=1))
    return 1 if moved else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help") or any(t not in TABLES for t in args[1:]):
        sys.exit(f"usage: python tools/table_drift.py OUT_DIR [{' | '.join(TABLES)} ...]")
    sys.exit(main(Path(args[0]), args[1:] or list(TABLES)))
