"""Golden outputs for refactors: a fixed set of short CPU runs, recorded before and compared after.

    python tools/golden.py record OUT_DIR     # run every case, write OUT_DIR/<case>.json
    python tools/golden.py compare OLD NEW    # every metric equal? (timings and latencies excluded)

Each case is a real training through `mtlsparse.train.run` on tiny data (synthetic, or
the fake NYUv2 of the tests), seeded, single thread, so a behaviour-preserving change gives
bit-identical metrics. The resumed case is killed after its first optimizer steps and
resumed from checkpoints/last.ckpt, as a requeued job would be.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

TINY = ["dataset=synthetic", "trainer=cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "dataset.batch_size=32"]
DENSE = ["dataset=nyuv2", "model=deeplab_resnet", "trainer=cpu", "trainer.max_epochs=2",
         "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
         "trainer.enable_progress_bar=false", "dataset.image_size=[32,32]", "model.depth=18", "model.width=0.0625",
         "dataset.batch_size=2", "dataset.eval_batch_size=2", "dataset.num_workers=0"]
CASES = {
    "default": TINY,
    "group_lasso": [*TINY, "method=group_lasso", "lam=1e-2"],
    "growl_chebyshev": [*TINY, "method=growl", "k0=1e-3", "trainer.max_epochs=3", "method.lam=0.05"],
    "rigl_minmax": [*TINY, "method=rigl", "sparsity=0.8", "balancer=minmax", "method.update_interval=2"],
    "disparse_static": [*TINY, "method=disparse_static", "sparsity=0.8"],
    "upgrad_group_lasso_rep": [*TINY, "balancer=upgrad", "balancer.mode=representation", "method=group_lasso",
                               "lam=1e-2"],
    "kdmtl": [*TINY, "model=kdmtl", "model.allow_untrained_teachers=true"],
    "mdmtn": [*TINY, "model=mdmtn"],
    "deeplab_nyuv2": DENSE,
}
RESUMED = ("resumed_group_lasso", [*TINY, "method=group_lasso", "lam=1e-2", "trainer.max_epochs=3"], 5)
VOLATILE = ("time/", "latency/")


def _stable(metrics: dict) -> dict:
    return {k: v for k, v in sorted(metrics.items()) if not k.startswith(VOLATILE)}


def record(out: Path) -> None:
    from mtlsparse.config import compose_config
    from mtlsparse.module import MultiTaskModule
    from mtlsparse.train import run

    from fakes_dense import write_fake_nyuv2

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_fake_nyuv2(scratch / "data")
        for name, overrides in CASES.items():
            metrics = run(compose_config([*overrides, f"data_root={scratch / 'data'}"]), scratch / name)
            (out / f"{name}.json").write_text(json.dumps(_stable(metrics), indent=1))
            print(name, "done", flush=True)
        name, overrides, kill_step = RESUMED
        cfg = [*overrides, f"data_root={scratch / 'data'}"]
        original = MultiTaskModule.training_step

        def dying(self, batch, batch_idx):
            if self.global_step == kill_step:
                raise RuntimeError("killed")  # stands in for SIGKILL: checkpoints of the finished epochs stay
            return original(self, batch, batch_idx)

        MultiTaskModule.training_step = dying
        try:
            run(compose_config(cfg), scratch / name)
        except RuntimeError as err:
            assert str(err) == "killed", err
        finally:
            MultiTaskModule.training_step = original
        metrics = run(compose_config(cfg), scratch / name)
        (out / f"{name}.json").write_text(json.dumps(_stable(metrics), indent=1))
        print(name, "done", flush=True)


def compare(old: Path, new: Path) -> int:
    differing = 0
    for path in sorted(old.glob("*.json")):
        before, after = json.loads(path.read_text()), json.loads((new / path.name).read_text())
        keys = before.keys() | after.keys()
        diffs = {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}
        print(f"{path.stem}: {'identical' if not diffs else f'{len(diffs)} differ'}")
        for key, (a, b) in sorted(diffs.items()):
            print(f"    {key}: {a} → {b}")
        differing += bool(diffs)
    return 1 if differing else 0


USAGE = "usage: python tools/golden.py record OUT_DIR | compare OLD_DIR NEW_DIR"

if __name__ == "__main__":
    command, *paths = sys.argv[1:] or ["--help"]
    if command == "record" and len(paths) == 1:
        record(Path(paths[0]))
    elif command == "compare" and len(paths) == 2:
        sys.exit(compare(Path(paths[0]), Path(paths[1])))
    elif command in ("-h", "--help"):
        print(USAGE)
    else:
        sys.exit(f"{USAGE}\n(got: {' '.join(sys.argv[1:])})")
