"""Dense datasets read tiny fakes in their real on-disk formats: shapes, ranges, splits,
augmentation applied jointly to image and targets, and missing-file errors naming the layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mtlsparse.data.celeba_mask import BACKGROUND, HAIR, SKIN, CelebAMaskHQ
from mtlsparse.data.cityscapes import BASELINE_M, FOCAL_PX, Cityscapes, label_lookup
from mtlsparse.data.dense import IMAGENET_MEAN, IMAGENET_STD, JointTransform
from mtlsparse.data.nyuv2 import NYUv2

from fakes_dense import write_fake_cityscapes, write_fake_dense_datasets, write_fake_nyuv2


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_fake_dense_datasets(tmp_path_factory.mktemp("dense"))


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(-1, 1, 1) + torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)


# ------------------------------------------------------------------ NYUv2
def test_nyuv2_splits_shapes_and_ranges(root):
    dm = NYUv2(root=str(root), batch_size=4, val_fraction=0.25, num_workers=0)
    dm.setup()
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 6, "val": 2, "test": 4}
    assert [p[0].name for p in dm.datasets["test"].samples] == ["val"] * 4  # test = the val/ directory
    assert not {s[1] for s in dm.datasets["train"].samples} & {s[1] for s in dm.datasets["val"].samples}
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert set(y) == {"seg", "depth", "normal"}
    assert y["seg"].dtype == torch.int64 and y["seg"].shape == (4, 32, 32)
    assert int(y["seg"].min()) == -1 and int(y["seg"].max()) <= 12
    assert y["depth"].shape == (4, 1, 32, 32) and (y["depth"] >= 0).all() and (y["depth"] == 0).any()
    norms = y["normal"].norm(dim=1)
    assert y["normal"].shape == (4, 3, 32, 32) and torch.allclose(norms[norms > 0], torch.ones(1), atol=1e-5)
    image = np.load(root / "nyuv2" / "val" / "image" / "0.npy")
    assert torch.allclose(unnormalise(x[0]), torch.from_numpy(image).permute(2, 0, 1), atol=1e-5)


def test_nyuv2_task_subset_40_classes_resize_and_limits(root):
    dm = NYUv2(root=str(root), tasks=["seg"], seg_classes=40, image_size=[16, 24], limit_train=4, limit_test=2,
               val_fraction=0.25)
    dm.setup()
    assert list(dm.tasks) == ["seg"] and dm.tasks["seg"].num_classes == 40 and dm.input_shape == (3, 16, 24)
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 3, "val": 1, "test": 2}
    x, y = dm.datasets["test"][0]
    assert x.shape == (3, 16, 24) and set(y) == {"seg"} and y["seg"].shape == (16, 24)
    assert int(y["seg"].max()) <= 39


def test_nyuv2_split_is_seeded(root):
    def train_names(seed):
        dm = NYUv2(root=str(root), seed=seed, val_fraction=0.25)
        dm.setup()
        return [s[1] for s in dm.datasets["train"].samples]
    assert train_names(0) == train_names(0) and train_names(0) != train_names(3)


def test_nyuv2_flip_applies_to_image_and_every_target(root):
    flipping = NYUv2(root=str(root), hflip_prob=1.0, val_fraction=0.25)
    flipping.setup()
    sample = flipping.datasets["train"].samples[0]
    image, targets = flipping.read_sample(sample)
    x, y = flipping.datasets["train"][0]
    ref_x, ref_y = flipping.transform(image, targets, train=False)
    assert torch.equal(x, ref_x.flip(-1))
    assert torch.equal(y["seg"], ref_y["seg"].flip(-1)) and torch.equal(y["depth"], ref_y["depth"].flip(-1))
    expected = ref_y["normal"].flip(-1)
    assert torch.equal(y["normal"][0], -expected[0]) and torch.equal(y["normal"][1:], expected[1:])


def test_crop_and_flip_keep_targets_aligned_with_the_image():
    """Every target is cut from the same window as the image, and flipped with it (normal x negated)."""
    torch.manual_seed(0)
    image = torch.rand(3, 20, 30)
    targets = {"seg": torch.randint(-1, 5, (20, 30)), "depth": torch.rand(1, 20, 30),
               "normal": torch.nn.functional.normalize(torch.randn(3, 20, 30), dim=0), "male": torch.tensor(1.0)}
    kinds = {"seg": "segmentation", "depth": "depth", "normal": "normal", "male": "binary"}
    transform = JointTransform(kinds, size=None, crop=(12, 16), flip_prob=0.5)
    flips = 0
    for _ in range(20):
        x, y = transform(image, targets, train=True)
        raw = unnormalise(x)
        matches = [(top, left, flip) for top in range(9) for left in range(15) for flip in (False, True)
                   if torch.allclose(raw, _window(image, top, left, flip), atol=1e-5)]
        assert len(matches) == 1
        top, left, flip = matches[0]
        flips += flip
        assert torch.equal(y["seg"], _window(targets["seg"], top, left, flip))
        assert torch.equal(y["depth"], _window(targets["depth"], top, left, flip))
        normal = _window(targets["normal"], top, left, flip)
        assert torch.equal(y["normal"][0], -normal[0] if flip else normal[0])
        assert torch.equal(y["normal"][1:], normal[1:])
        assert y["male"] == 1.0
    assert 0 < flips < 20


def _window(x: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    out = x[..., top:top + 12, left:left + 16]
    return out.flip(-1) if flip else out


def test_resize_keeps_label_ids_and_invalid_depth():
    image = torch.rand(3, 8, 8)
    seg = torch.arange(64).view(8, 8) % 5 - 1
    depth = torch.where(torch.arange(64).view(1, 8, 8) % 3 == 0, 0.0, 2.5)
    x, y = JointTransform({"seg": "segmentation", "depth": "depth"}, size=(4, 12))(
        image, {"seg": seg, "depth": depth}, train=False)
    assert x.shape == (3, 4, 12) and y["seg"].dtype == torch.int64
    assert set(y["seg"].unique().tolist()) <= set(seg.unique().tolist())
    assert set(y["depth"].unique().tolist()) <= {0.0, 2.5}


def test_nyuv2_missing_directory_says_where_files_go(tmp_path):
    dm = NYUv2(root=str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    message = str(err.value)
    assert str(tmp_path / "nyuv2") in message and "train/image/<i>.npy" in message and "mtan" in message


def test_nyuv2_missing_target_file_is_named(tmp_path):
    write_fake_nyuv2(tmp_path, n_train=3, n_test=1)
    (tmp_path / "nyuv2" / "train" / "normal" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"task 'normal' needs .*1 missing, e.g. \['1.npy'\]"):
        NYUv2(root=str(tmp_path)).setup()
    NYUv2(root=str(tmp_path), tasks=["seg", "depth"]).setup()  # tasks that have all their files still load


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": ["seg", "edges"]}, "tasks must be a non-empty list of distinct names from ['seg', 'depth', 'normal']"),
    ({"seg_classes": 21}, "seg_classes must be one of [13, 40]"),
    ({"crop_size": [64, 64], "image_size": [32, 32]}, "crop_size [64, 64] must fit in image_size [32, 32]"),
    ({"reference": {"seg/iou": 0.3}}, "reference key 'seg/iou' is not a metric"),
    ({"depth_loss": "huber"}, "loss_type 'huber' is not one of ('l1', 'mse')"),
])
def test_nyuv2_bad_options_fail_with_a_message(kwargs, message):
    with pytest.raises(ValueError) as err:
        NYUv2(**kwargs)
    assert message in str(err.value)


def test_reference_accepts_flat_and_nested_keys():
    flat = NYUv2(reference={"seg/miou": 0.4, "depth/abs_err": 0.6}).reference
    nested = NYUv2(reference={"seg": {"miou": 0.4}, "depth": {"abs_err": 0.6}}).reference
    assert flat == nested == {"seg/miou": 0.4, "depth/abs_err": 0.6}


# ------------------------------------------------------------ CelebAMask-HQ
def test_celeba_seg_from_part_masks_and_attributes(root):
    dm = CelebAMaskHQ(root=str(root), image_size=None)
    dm.setup()
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 6, "val": 2, "test": 2}
    all_ids = sorted(sum((ds.samples for ds in dm.datasets.values()), []))
    assert all_ids == list(range(10))  # disjoint and complete
    for i in (0, 1, 3):
        image, y = dm.read_sample(i)
        assert image.shape == (3, 32, 32) and y["seg"].shape == (16, 16)  # masks are at their own size
        assert y["male"] == i % 2 and y["smile"] == (i % 3 == 0)
        seg = y["seg"]
        assert (seg[2:, :8] == SKIN).all() and (seg[2:, 8:] == BACKGROUND).all() and (seg[1] == HAIR).all()
        assert (seg[0] == (BACKGROUND if i % 2 else HAIR)).all()  # the hat (odd i) is painted over the hair
    x, y = dm.datasets["test"][0]
    assert x.shape == (3, 32, 32) and y["seg"].shape == (32, 32)  # resized to the image for batching
    batch_x, batch_y = next(iter(dm.train_dataloader()))
    assert batch_y["male"].dtype == torch.float32 and batch_y["male"].shape == (batch_x.shape[0],)


def test_celeba_resize_limits_and_seeded_split(root):
    dm = CelebAMaskHQ(root=str(root), image_size=[16, 16], limit_train=3, limit_test=1, tasks=["seg", "smile"])
    dm.setup()
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 3, "val": 1, "test": 1}
    x, y = dm.datasets["train"][0]
    assert x.shape == (3, 16, 16) and set(y) == {"seg", "smile"} and set(y["seg"].unique().tolist()) <= {0, 1, 2}
    splits = [CelebAMaskHQ(root=str(root), seed=seed).split_samples() for seed in (0, 0, 5)]
    assert splits[0] == splits[1] and splits[0] != splits[2]


def test_celeba_missing_files_say_where_they_go(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        CelebAMaskHQ(root=str(tmp_path)).setup()
    assert "CelebA-HQ-img/<i>.jpg" in str(err.value) and "CelebAMask-HQ-attribute-anno.txt" in str(err.value)


# --------------------------------------------------------------- Cityscapes
def test_cityscapes_label_mapping_follows_the_official_table():
    lut19, lut7 = label_lookup(19), label_lookup(7)
    assert lut19[7] == 0 and lut19[26] == 13 and lut19[33] == 18  # road, car, bicycle
    assert lut19[0] == -1 and lut19[9] == -1  # unlabeled, parking (ignored in evaluation)
    assert lut7[7] == 0 and lut7[11] == 1 and lut7[23] == 4 and lut7[24] == 5 and lut7[26] == 6
    assert lut7[9] == -1 and lut7[0] == -1
    assert set(lut19.tolist()) == set(range(19)) | {-1} and set(lut7.tolist()) == set(range(7)) | {-1}


def test_cityscapes_loads_seg_and_depth_from_disparity(root):
    dm = Cityscapes(root=str(root), image_size=None, val_fraction=0.2)
    dm.setup()
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 5, "val": 1, "test": 3}
    sample = dm.datasets["test"].samples[0]
    image, y = dm.read_sample(sample)
    assert image.shape == (3, 16, 32) and y["seg"].shape == (16, 32) and y["depth"].shape == (1, 16, 32)
    ids = np.asarray(Image.open(str(sample).replace("leftImg8bit", "gtFine").replace(
        "gtFine.png", "gtFine_labelIds.png")))
    assert torch.equal(y["seg"], label_lookup(19)[torch.from_numpy(ids.astype(np.int64))])
    raw = torch.arange(16 * 32).view(1, 16, 32).float() % 1000
    expected = torch.where(raw > 1, BASELINE_M * FOCAL_PX / ((raw - 1) / 256).clamp_min(1e-9), torch.zeros(()))
    assert torch.allclose(y["depth"], expected, rtol=1e-5)
    disparity = Cityscapes(root=str(root), depth_mode="disparity", image_size=None)
    disparity.setup()
    _, yd = disparity.read_sample(sample)
    assert torch.allclose(yd["depth"], torch.where(raw > 0, (raw - 1) / 256, torch.zeros(())))
    x, yb = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 16, 32) and yb["seg"].min() >= -1 and yb["seg"].max() <= 18


def test_cityscapes_7_classes_and_resize(root):
    dm = Cityscapes(root=str(root), seg_classes=7, tasks=["seg"], image_size=[8, 16])
    dm.setup()
    x, y = dm.datasets["test"][0]
    assert x.shape == (3, 8, 16) and set(y) == {"seg"} and int(y["seg"].max()) <= 6


def test_cityscapes_missing_disparity_is_named(tmp_path):
    write_fake_cityscapes(tmp_path, {"train": 2, "val": 1})
    for p in (tmp_path / "cityscapes" / "disparity").rglob("*.png"):
        p.unlink()
    with pytest.raises(FileNotFoundError) as err:
        Cityscapes(root=str(tmp_path)).setup()
    assert "task 'depth': 2 of 2 files missing" in str(err.value) and "disparity_trainvaltest.zip" in str(err.value)
    Cityscapes(root=str(tmp_path), tasks=["seg"]).setup()


def test_cityscapes_missing_root_says_where_files_go(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        Cityscapes(root=str(tmp_path)).setup()
    assert str(tmp_path / "cityscapes") in str(err.value) and "leftImg8bit/{train,val}/<city>/" in str(err.value)


def test_nyuv2_float_images_outside_0_1_are_refused(tmp_path):
    write_fake_nyuv2(tmp_path, n_train=2, n_test=1)
    path = tmp_path / "nyuv2" / "val" / "image" / "0.npy"
    np.save(path, np.load(path) * 255)
    dm = NYUv2(root=str(tmp_path), val_fraction=0.0)
    dm.setup()
    with pytest.raises(ValueError, match="float images must be in \\[0, 1\\]"):
        dm.datasets["test"][0]
