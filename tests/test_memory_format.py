"""`memory_format=channels_last`: the convs train in NHWC, the run's results match a contiguous run's up to
round-off, and the sparsity metrics and export read channels-last weights right."""
from __future__ import annotations

import copy

import pytest
import torch

from mtlsparse.builders import build_module, build_trainer
from mtlsparse.config import build
from mtlsparse.memory_format import check_memory_format
from mtlsparse.train import run

NOT_COMPARED = ("time/", "latency/", "export/")  # timings; export compares its own runtimes


def test_convs_and_batches_stay_channels_last_through_a_fit_with_a_prox(tiny_cfg, tmp_path):
    cfg = tiny_cfg("method=group_lasso", "lam=1", "memory_format=channels_last", "dataset.channels=3")
    datamodule = build(cfg, "dataset")
    module = build_module(cfg, datamodule)
    seen = []
    module.model.register_forward_pre_hook(lambda _, args: seen.append(args[0]))  # train, val and test batches
    trainer, _ = build_trainer(cfg, tmp_path)
    trainer.fit(module, datamodule=datamodule)
    weights = [p for p in module.model.parameters() if p.dim() == 4]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                           for w in weights)
    assert seen and all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in seen)
    # the sparsity summary reads the NHWC weights as it reads their NCHW copies
    nchw = copy.deepcopy(module)
    nchw.model.to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in nchw.model.parameters())
    assert module.sparsity_summary() == nchw.sparsity_summary()
    assert module.sparsity_summary()["sparsity/group"] > 0  # the prox zeroed groups at this λ


def test_a_channels_last_run_matches_a_contiguous_one_up_to_round_off(tiny_cfg, tmp_path):
    base = ("method=group_lasso", "lam=1e-2", "dataset.channels=3")
    nchw = run(tiny_cfg(*base), tmp_path / "nchw")
    nhwc = run(tiny_cfg(*base, "memory_format=channels_last"), tmp_path / "nhwc")
    assert (nchw["config/memory_format"], nhwc["config/memory_format"]) == ("contiguous", "channels_last")
    keys = [k for k, v in nchw.items() if isinstance(v, float) and not k.startswith(NOT_COMPARED)]
    assert "test/mean_acc" in keys and "val/t0/loss" in keys
    for key in keys:
        assert nhwc[key] == pytest.approx(nchw[key], rel=1e-3, abs=1e-4), key
    assert nhwc["export/channels_removed"] > 0 and nhwc["export/max_abs_diff"] <= 1e-4  # compacted from NHWC


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match=r"memory_format must be one of \['contiguous', 'channels_last'\], got 'nhwc'"):
        check_memory_format("nhwc")
