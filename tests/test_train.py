"""End-to-end runs on tiny data: every config option trains, metrics.json is complete,
same seed → same metrics, bad configs fail with messages naming the key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from mtlsparse.config import CONF_DIR, ConfigError
from mtlsparse.train import ECHOED_GROUPS, run

from conftest import REPO, TINY, compose_cfg
from fakes import write_fake_cifar10, write_fake_cifar100, write_fake_source

GROUPS_RUN_IN_PROCESS = ("model", "balancer", "method", "optimizer", "scheduler")
REQUIRED_KEYS = ["test/mean_acc", "sparsity/param", "sparsity/group", "sparsity/sr", "sparsity/cr", "sparsity/ps",
                 "params/total", "params/nonzero", "time/train_s", "time/train_samples_per_s", "config/k0",
                 "config/k", "config/lam", "config/sparsity", "config/seed", "config/method", "config/balancer"]


# options that need an extra override to run in 2 tiny steps
SMOKE_EXTRA = {("model", "kdmtl"): ["model.allow_untrained_teachers=true"],
               ("model", "vgg16_mt"): ["model.width=0.125"],
               ("model", "deeplab_resnet"): ["model.width=0.0625", "model.depth=18"],
               ("model", "ltb_resnet"): ["model.width=0.0625", "model.depth=18"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in Path(CONF_DIR, group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS_RUN_IN_PROCESS for o in options(g)])
def test_every_group_option_trains_two_steps(tiny_cfg, tmp_path, group, option):
    cfg = tiny_cfg(f"{group}={option}", "lam=1e-3", "k0=0.01", *SMOKE_EXTRA.get((group, option), []))
    metrics = run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in REQUIRED_KEYS + ["test/t0/acc", "test/t1/acc", "test/t0/loss", "test/t1/loss"]:
        assert key in saved, key
    if group in ECHOED_GROUPS:
        assert saved[f"config/{group}"] == option
    assert 0 <= saved["test/mean_acc"] <= 1
    assert saved["test/worst_acc"] == min(saved["test/t0/acc"], saved["test/t1/acc"])


# small builds so each dataset's 2-step run is quick; files come from fakes in the real formats
DATASET_EXTRA = {"multi_fashion": ["dataset.train_pairs=256", "dataset.test_pairs=64"],
                 "multi_mnist": ["dataset.train_pairs=256", "dataset.test_pairs=64"],
                 "multi_fashion_mnist": ["dataset.train_pairs=256", "dataset.test_pairs=64"],
                 "multi_digits": ["dataset.train_pairs=256", "dataset.test_pairs=64", "model.kernel_size=3"]}


@pytest.fixture(scope="module")
def fake_data_root(tmp_path_factory) -> Path:
    """A data root with fake Fashion-MNIST, MNIST (IDX) and CIFAR-10/100 (pickles) in torchvision's layouts."""
    root = tmp_path_factory.mktemp("fake_data")
    write_fake_source(root / "FashionMNIST" / "raw", seed=1)
    write_fake_source(root / "MNIST" / "raw", seed=2)
    write_fake_cifar100(root)
    write_fake_cifar10(root)
    return root


# dense-prediction sets need a dense model and their own fakes: tests/test_deeplab.py trains each of them
DENSE_DATASETS = {"nyuv2", "celeba_mask", "cityscapes"}


@pytest.mark.parametrize("option", [o for o in options("dataset") if o not in DENSE_DATASETS])
def test_every_dataset_option_trains_two_steps(fake_data_root, tmp_path, option):
    cfg = compose_cfg(TINY + [f"dataset={option}", *DATASET_EXTRA.get(option, [])], data_root=fake_data_root)
    metrics = run(cfg, tmp_path)
    assert metrics["config/dataset"] == option
    tasks = {k.split("/")[1] for k in metrics if k.startswith("test/") and k.endswith("/acc")}
    assert len(tasks) == (20 if option == "cifar100_20" else 2)


@pytest.mark.parametrize("option", ["cpu", "default"])
def test_trainer_options_train(tiny_cfg, tmp_path, option):
    metrics = run(tiny_cfg(f"trainer={option}", "trainer.enable_progress_bar=false"), tmp_path)
    assert (tmp_path / "metrics.json").exists() and "test/t0/acc" in metrics


@pytest.mark.parametrize("option", ["gpu", "ddp"])
def test_accelerator_trainer_options_compose(option):
    cfg = compose_cfg([f"trainer={option}"])
    assert cfg.trainer._target_ == "lightning.Trainer"
    assert cfg.trainer.accelerator == "gpu" if option == "gpu" else cfg.trainer.strategy == "ddp"


def test_group_lasso_and_l1_make_sparse_trunks(tiny_cfg, tmp_path):
    """With a large λ the prox zeroes groups/weights of the trunk (input layer and heads untouched)."""
    gl = run(tiny_cfg("method=group_lasso", "lam=10", "optimizer.lr=0.05", "trainer.limit_train_batches=4"),
             tmp_path / "gl")
    assert gl["sparsity/group"] > 50 and gl["sparsity/sr"] > 0
    l1 = run(tiny_cfg("method=l1", "lam=10", "optimizer.lr=0.05", "trainer.limit_train_batches=4"), tmp_path / "l1")
    assert l1["sparsity/param"] > 50
    assert l1["params/nonzero"] < l1["params/total"]


def test_run_dir_records_versions_and_git_revision(tiny_cfg, tmp_path):
    run(tiny_cfg(), tmp_path)
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__
    assert env["git"] != "" and "lightning" in env


def test_nan_loss_stops_with_step_task_losses_and_balancer_state(tiny_cfg, tmp_path, monkeypatch):
    from mtlsparse.models.hps import HPS
    from mtlsparse.module import NonFiniteLossError

    forward = HPS.forward
    monkeypatch.setattr(HPS, "forward", lambda self, x: {k: v * float("nan") for k, v in forward(self, x).items()})
    with pytest.raises(NonFiniteLossError, match=r"at global step 0 .*task losses \{'t0': nan, 't1': nan\}.*"
                                                 r"balancer state \{'w/t0': 0.5, 'w/t1': 0.5\}"):
        run(tiny_cfg(), tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_same_seed_same_metrics(tiny_cfg, tmp_path):
    a = run(tiny_cfg("method=group_lasso", "lam=1e-2"), tmp_path / "a")
    b = run(tiny_cfg("method=group_lasso", "lam=1e-2"), tmp_path / "b")
    c = run(tiny_cfg("method=group_lasso", "lam=1e-2", "seed=1"), tmp_path / "c")
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "latency/"))}  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_uncertainty_log_variances_are_trained(tiny_cfg, tmp_path):
    run(tiny_cfg("balancer=uncertainty", "trainer.limit_train_batches=4", "optimizer.lr=0.05"), tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.all(state["balancer.log_vars"] != 0)


def test_pref_sets_k0_and_k(tiny_cfg, tmp_path):
    metrics = run(tiny_cfg("pref=[0.1,0.3,0.6]"), tmp_path)
    assert metrics["config/k0"] == 0.1 and metrics["config/k"] == [0.3, 0.6]


@pytest.mark.parametrize("override, message", [
    ("k=[1.0]", "k has 1 entries but dataset 'Synthetic' has 2 tasks"),
    ("k=[0.5,-1]", "k must hold non-negative numbers"),
    ("sparsity=1.0", "sparsity must be in [0, 1)"),
    ("sparsity=-0.1", "sparsity must be in [0, 1)"),
    ("lam=-1e-3", "lam must be >= 0"),
    ("k0=-1", "k0 must be >= 0"),
    ("test_ckpt=worst", "test_ckpt must be one of ['best', 'last']"),
    ("memory_format=nhwc", "memory_format must be one of ['contiguous', 'channels_last'], got 'nhwc'"),
    ("+method.foo=1", "unknown key 'method.foo'"),
    ("method=group_lasso method.prox=newton", "method.prox must be one of ('plain', 'adam')"),
    ("dataset=multi_digits", "set model.kernel_size=3"),
])
def test_bad_config_values_fail_with_a_message_naming_the_key(tiny_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        run(tiny_cfg(*override.split()), tmp_path)
    assert message in str(err.value)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("override, message", [
    ("method.foo=1", "Key 'foo' is not in struct"),
    ("method=nope", "Could not find 'method/nope'"),
    ("balancer=nope", "Available options in 'balancer'"),
])
def test_bad_keys_and_options_fail_at_composition(override, message):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(TINY + [override])
    assert message in str(err.value) + str(err.value.__cause__)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": ""}
    return subprocess.run([sys.executable, "-m", "mtlsparse", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def test_cli_config_error_exits_nonzero_without_traceback(tmp_path):
    proc = _cli(*TINY, "k=[1,2,3]", f"data_root={tmp_path}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "k has 3 entries" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_multirun_writes_one_metrics_json_per_job_and_a_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _cli("-m", *TINY, "method=group_lasso", "lam=0,1e-2", f"data_root={tmp_path}/data",
                f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(sweep.glob("*/metrics.json"))
    assert len(files) == 2
    lams = sorted(json.loads(f.read_text())["config/lam"] for f in files)
    assert lams == [0.0, 1e-2]
    report = subprocess.run([sys.executable, "-c", "from mtlsparse.cli import main; main()", "report", str(sweep)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert report.returncode == 0, report.stderr[-3000:]
    assert (sweep / "report" / "summary.csv").exists() and (sweep / "report" / "summary.md").exists()
    assert list((sweep / "report").glob("*.png"))
