"""Dense task kinds: losses on valid pixels only, split-wide metrics (exact, batch-order invariant,
mergeable across DDP ranks), Δm and the checkpoint score for mixed metric directions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlsparse.metrics.dense import ANGLE_BIN, check_reference, delta_m
from mtlsparse.tasks import Task

SEG = Task("seg", kind="segmentation", num_classes=4, ignore_index=-1)
DEPTH = Task("depth", kind="depth")
NORMAL = Task("normal", kind="normal")
BINARY = Task("male", kind="binary")


def random_normals(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=1)


def test_out_dims_and_selection_metrics():
    assert [t.out_dim for t in (SEG, DEPTH, NORMAL, BINARY)] == [4, 1, 3, 1]
    assert SEG.selection_metric == ("miou", "max") and DEPTH.selection_metric == ("abs_err", "min")
    assert NORMAL.selection_metric == ("mean_angle", "min") and BINARY.selection_metric == ("acc", "max")
    assert Task("c").selection_metric == ("acc", "max") and Task("c").out_dim == 10 and not Task("c").dense
    assert SEG.dense and DEPTH.dense and NORMAL.dense and not BINARY.dense


def test_segmentation_loss_and_metrics_ignore_unlabelled_pixels():
    logits = torch.randn(2, 4, 3, 5)
    target = logits.argmax(1)
    target[0, 0] = -1
    wrong = target.clone()
    wrong[1, 2, :2] = (target[1, 2, :2] + 1) % 4
    m = SEG.metrics()
    m.update(logits, wrong)
    out = m.compute()
    valid = wrong != -1
    assert out["pix_acc"] == pytest.approx(float((logits.argmax(1) == wrong)[valid].float().mean()))
    pred, conf = logits.argmax(1)[valid], torch.zeros(4, 4)
    for p, t in zip(pred.tolist(), wrong[valid].tolist()):
        conf[t, p] += 1
    iou = conf.diag() / (conf.sum(0) + conf.sum(1) - conf.diag())
    assert out["miou"] == pytest.approx(float(iou[~iou.isnan()].mean()), abs=1e-6)  # absent classes don't count
    ce = F.cross_entropy(logits, target, ignore_index=-1)
    assert SEG.loss(logits, target) == pytest.approx(float(ce))
    assert SEG.loss(logits, torch.full_like(target, -1)) == 0  # no labelled pixel: 0, not NaN


def test_depth_loss_and_errors_use_valid_pixels_only():
    pred = torch.rand(2, 1, 4, 4) + 0.5
    target = torch.rand(2, 1, 4, 4) + 0.5
    target[0, 0, 0] = 0  # no measurement
    valid = target > 0
    assert DEPTH.loss(pred, target) == pytest.approx(float((pred - target).abs()[valid].mean()))
    mse = Task("depth", kind="depth", loss_type="mse")
    assert mse.loss(pred, target) == pytest.approx(float((pred - target).square()[valid].mean()))
    m = DEPTH.metrics()
    m.update(pred, target.squeeze(1))  # [B,H,W] targets are accepted
    out = m.compute()
    assert out["abs_err"] == pytest.approx(float((pred - target).abs()[valid].mean()), rel=1e-6)
    assert out["rel_err"] == pytest.approx(float(((pred - target).abs() / target)[valid].mean()), rel=1e-6)
    assert DEPTH.loss(pred, torch.zeros_like(target)) == 0


def test_normal_metrics_match_numpy_over_the_split():
    pred = torch.randn(4, 3, 9, 11)
    target = random_normals(4, 3, 9, 11, seed=1)
    target[0, :, :2] = 0  # no measurement
    m = NORMAL.metrics()
    for i in range(4):  # batch by batch, as in evaluation
        m.update(pred[i:i + 1], target[i:i + 1])
    out = m.compute()
    valid = target.abs().sum(1) > 0
    cos = F.cosine_similarity(pred, target, dim=1)[valid].double().clamp(-1, 1)
    angles = np.degrees(np.arccos(cos.numpy()))
    assert out["mean_angle"] == pytest.approx(angles.mean(), abs=1e-3)
    assert out["median_angle"] == pytest.approx(np.median(angles), abs=2 * ANGLE_BIN)
    for key, t in (("within_11_25", 11.25), ("within_22_5", 22.5), ("within_30", 30.0)):
        assert out[key] == pytest.approx((angles < t).mean(), abs=1e-6)
    assert out["cos_sim"] == pytest.approx(float(cos.mean()), abs=1e-5)
    loss = (1 - F.cosine_similarity(pred, target, dim=1))[valid].mean()
    assert NORMAL.loss(pred, target) == pytest.approx(float(loss), rel=1e-5)


def test_normal_median_is_exact_on_a_known_distribution():
    angles = torch.tensor([1.0, 10.0, 20.0, 40.0, 80.0, 100.0, 150.0])  # median 40°
    rad = torch.deg2rad(angles)
    target = torch.zeros(1, 3, 1, len(angles))
    target[0, 2] = 1  # all normals along z
    pred = torch.stack([torch.sin(rad), torch.zeros_like(rad), torch.cos(rad)])[None, :, None]
    out = NORMAL.metrics()
    out.update(pred, target)
    result = out.compute()
    assert result["median_angle"] == pytest.approx(40.0, abs=2 * ANGLE_BIN)
    assert result["within_11_25"] == pytest.approx(2 / 7) and result["within_30"] == pytest.approx(3 / 7)


@pytest.mark.parametrize("task, make", [
    (NORMAL, lambda: (torch.randn(6, 3, 5, 5), random_normals(6, 3, 5, 5))),
    (DEPTH, lambda: (torch.rand(6, 1, 5, 5), torch.rand(6, 1, 5, 5))),
])
def test_states_merge_like_ddp_ranks(task, make):
    """Two ranks' states, summed as DDP's reduction does, give the single-process result."""
    torch.manual_seed(0)
    pred, target = make()
    whole, rank0, rank1 = task.metrics(), task.metrics(), task.metrics()
    whole.update(pred, target)
    rank0.update(pred[:2], target[:2])
    rank1.update(pred[2:], target[2:])
    (m0,), (m1,) = rank0.values(), rank1.values()
    m0.merge_state(m1)  # the states' declared reductions (sums), as the DDP sync applies them
    expected, merged = whole.compute(), rank0.compute()
    for key, value in expected.items():
        assert merged[key] == pytest.approx(float(value), rel=1e-6), key


def test_binary_accuracy_thresholds_logits_at_zero():
    logits = torch.tensor([[0.2], [0.9], [-0.1], [-3.0]])  # all logits of the first two lie in [0, 1]
    m = BINARY.metrics()
    m.update(logits, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert m.compute()["acc"] == pytest.approx(0.75)
    assert BINARY.loss(logits, torch.tensor([1.0, 1.0, 0.0, 1.0])) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits.squeeze(1), torch.tensor([1.0, 1.0, 0.0, 1.0]))))


def test_delta_m_sign_convention_and_task_averaging():
    modes = {"seg/miou": "max", "seg/pix_acc": "max", "depth/abs_err": "min"}
    ref = {"seg/miou": 0.5, "seg/pix_acc": 0.8, "depth/abs_err": 0.4}
    assert delta_m(ref, ref, modes) == 0
    better = {"seg/miou": 0.55, "seg/pix_acc": 0.8, "depth/abs_err": 0.36}
    # seg: mean(+10%, 0%) = +5%; depth: error 10% lower = +10%; tasks averaged: +7.5%
    assert delta_m(better, ref, modes) == pytest.approx(7.5)
    assert delta_m({"depth/abs_err": 0.44}, {"depth/abs_err": 0.4}, modes) == pytest.approx(-10.0)


@pytest.mark.parametrize("reference, message", [
    ({"seg/iou": 1.0}, "reference key 'seg/iou' is not a metric"),
    ({"seg/miou": 0}, "must be a non-zero number"),
    ({"seg": {"miou": "high"}}, "must be a non-zero number"),
])
def test_bad_references_are_rejected(reference, message):
    with pytest.raises(ValueError, match=message):
        check_reference(reference, {"seg/miou": "max"})


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="loss_type 'mse' is not one of"):
        Task("n", kind="normal", loss_type="mse")
    empty = NORMAL.metrics()
    empty.update(torch.randn(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    assert math.isnan(float(empty.compute()["mean_angle"]))  # nothing measured: NaN, not 0
