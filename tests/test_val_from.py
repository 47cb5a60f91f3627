"""dataset.val_from: validation pairs built from items that no training pair uses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtlsparse.data.digits import MultiDigits
from mtlsparse.data.multi_mnist import MultiFashion, MultiFashionMNIST
from mtlsparse.data.synthetic import Synthetic

from fakes import write_fake_source


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_fake_source(tmp_path / "FashionMNIST" / "raw", seed=1)
    write_fake_source(tmp_path / "MNIST" / "raw", seed=2)
    return tmp_path


def small(cls=MultiFashion, root: Path | str = "", **kwargs):
    defaults = dict(train_pairs=300, test_pairs=60, batch_size=32, eval_batch_size=64, val_fraction=0.1)
    return cls(root=str(root), **(defaults | kwargs))


def items_of(cache: dict, split: str) -> set[int]:
    return set(cache[f"{split}_left_index"].tolist()) | set(cache[f"{split}_right_index"].tolist())


def test_held_out_val_pairs_share_no_item_with_train_pairs_and_keep_the_counts(root):
    cache = small(root=root, val_from="held_out_items").build()
    assert len(cache["train_images"]) == 270 and len(cache["val_images"]) == 30
    # both sides draw from one Fashion-MNIST item pool: no item of a val pair is in any train pair
    assert items_of(cache, "val") and not items_of(cache, "val") & items_of(cache, "train")
    default = small(root=root).build()
    assert "val_images" not in default  # the default split holds val out of these training pairs
    # the test pairs are the default protocol's, so both selections are tested on the same images
    assert torch.equal(cache["test_images"], default["test_images"])
    assert torch.equal(cache["test_targets"], default["test_targets"])


def test_held_out_split_per_source_when_sides_differ(root):
    cache = small(MultiFashionMNIST, root=root, val_from="held_out_items").build()
    for side in ("left", "right"):
        val, train = set(cache[f"val_{side}_index"].tolist()), set(cache[f"train_{side}_index"].tolist())
        assert val and not val & train


def test_setup_uses_the_held_out_pairs_and_limit_train_shrinks_them_in_proportion(root):
    dm = small(root=root, val_from="held_out_items")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 270 and len(dm.datasets["val"]) == 30
    limited = small(root=root, val_from="held_out_items", limit_train=90)
    limited.setup("fit")
    assert len(limited.datasets["train"]) == 90 and len(limited.datasets["val"]) == 10


def test_default_cache_key_is_unchanged_and_the_modes_cache_apart(root):
    default, held = small(root=root), small(root=root, val_from="held_out_items")
    assert "val_from" not in default.build_params  # caches built before the option stay valid
    assert default.cache_path != held.cache_path
    assert held.build_params["val_fraction"] == 0.1


def test_multi_digits_held_out_counts_and_test_pairs():
    held = MultiDigits(train_pairs=400, test_pairs=100, val_from="held_out_items", val_fraction=0.25)
    default = MultiDigits(train_pairs=400, test_pairs=100)
    a, b = held.load(), default.load()
    assert len(a.train_images) == 300 and len(a.val_images) == 100 and b.val_images is None
    assert torch.equal(a.test_images, b.test_images)


def test_datasets_without_shared_items_give_the_same_split_either_way():
    a = Synthetic(train_samples=200, test_samples=50, val_from="held_out_items")
    b = Synthetic(train_samples=200, test_samples=50)
    a.setup("fit"), b.setup("fit")
    assert torch.equal(a.val_indices, b.val_indices) and not a.shares_items


@pytest.mark.parametrize("kwargs, message", [
    (dict(val_from="held_out"), "dataset.val_from must be one of training_items, held_out_items"),
    (dict(val_from="held_out_items", val_fraction=0.0), "set dataset.val_fraction > 0"),
])
def test_bad_val_from_names_the_key_and_the_fix(root, kwargs, message):
    with pytest.raises(ValueError, match=message):
        small(root=root, **kwargs)


@pytest.mark.parametrize("build", [lambda root: small(root=root, train_pairs=3, val_from="held_out_items",
                                                      val_fraction=0.9).build(),
                                   lambda root: MultiDigits(train_pairs=3, test_pairs=10, val_from="held_out_items",
                                                            val_fraction=0.9).load()])
def test_a_val_fraction_that_takes_every_training_pair_is_refused(root, build):
    with pytest.raises(ValueError, match=r"dataset.val_fraction=0.9 leaves no training pairs of train_pairs=3"):
        build(root)
