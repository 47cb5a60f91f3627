"""Data layer: IDX reading, source lookup, pair building + cache, datamodules and loaders.

MNIST-format tests run on tiny fake IDX files written in the exact on-disk format;
one test builds real Multi-Fashion when the Debian Fashion-MNIST package is present.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtlsparse.data import MultiDigits, MultiFashion, MultiFashionMNIST, MultiMNIST, Synthetic
from mtlsparse.data.idx import IdxFormatError, read_idx, write_idx
from mtlsparse.data.pairs import paste_max
from mtlsparse.data.sources import FILE_NAMES, SOURCES, load_source

from fakes import N_TRAIN, write_fake_source

CONF_DATASET = Path(__file__).resolve().parents[1] / "conf" / "dataset"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data root holding fake Fashion-MNIST and MNIST in torchvision's layout."""
    write_fake_source(tmp_path / "FashionMNIST" / "raw", seed=1)
    write_fake_source(tmp_path / "MNIST" / "raw", seed=2)
    return tmp_path


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Hide the Debian Fashion-MNIST directory so the lookup sees only the data root."""
    hidden = dataclasses.replace(SOURCES["fashion_mnist"], system_dirs=(str(tmp_path / "no-debian"),))
    monkeypatch.setitem(SOURCES, "fashion_mnist", hidden)


def small(cls=MultiFashion, root: Path | str = "", **kwargs):
    defaults = dict(train_pairs=300, test_pairs=60, batch_size=32, eval_batch_size=64)
    return cls(root=str(root), **(defaults | kwargs))


def cache_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "mtlsparse_cache"))


# --- IDX -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    array = torch.randint(0, 256, (7, 5, 3), dtype=torch.uint8)
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == torch.uint8 and torch.equal(back, array)


def test_truncated_raw_idx_names_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, torch.zeros(4, 28, 28, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(IdxFormatError, match="train-images-idx3-ubyte.*truncated"):
        read_idx(path)


def test_truncated_gz_idx_names_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    write_idx(path, torch.arange(200, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(IdxFormatError, match="t10k-labels-idx1-ubyte.gz"):
        read_idx(path)


def test_bad_magic_names_file(tmp_path):
    path = tmp_path / "junk-idx1-ubyte"
    path.write_bytes(b"\x1f\x00\x08\x01" + bytes(8))
    with pytest.raises(IdxFormatError, match="junk-idx1-ubyte.*magic"):
        read_idx(path)


# --- sources -------------------------------------------------------------------------


@pytest.mark.parametrize("subdir, gz", [("FashionMNIST/raw", True), ("fashion-mnist", False)])
def test_fashion_found_in_root_layouts(tmp_path, subdir, gz):
    written = write_fake_source(tmp_path / subdir, seed=3, gz=gz)
    data = load_source("fashion_mnist", tmp_path)
    assert torch.equal(data["train"].images, written["train-images-idx3-ubyte"])
    assert torch.equal(data["test"].labels, written["t10k-labels-idx1-ubyte"].long())
    assert data["train"].labels.dtype == torch.int64


def test_missing_fashion_message_lists_paths_and_how_to(tmp_path, no_system_fashion):
    with pytest.raises(FileNotFoundError) as info:
        load_source("fashion_mnist", tmp_path)
    message = str(info.value)
    for directory in SOURCES["fashion_mnist"].search_dirs(tmp_path):
        assert str(directory) in message
    for name in FILE_NAMES:
        assert name in message
    assert "apt-get install dataset-fashion-mnist" in message and "download=true" in message


def test_missing_mnist_raises_from_datamodule(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST not found(.|\n)*MNIST/raw"):
        small(MultiMNIST, tmp_path).prepare_data()


def test_download_uses_torchvision_when_asked(tmp_path, monkeypatch, no_system_fashion):
    import torchvision

    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train, download):
            calls.append((root, download))
            write_fake_source(Path(root) / "FashionMNIST" / "raw", seed=4)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    with pytest.raises(FileNotFoundError):
        load_source("fashion_mnist", tmp_path)
    assert calls == []
    data = load_source("fashion_mnist", tmp_path, download=True)
    assert calls == [(str(tmp_path), True)] and len(data["train"].images) == N_TRAIN


# --- Multi-* builder and cache -------------------------------------------------------


def test_pairs_shapes_labels_and_construction(root):
    dm = small(root=root)
    cache = dm.build()
    fashion = load_source("fashion_mnist", root)
    for split, count in (("train", 300), ("test", 60)):
        images, targets = cache[f"{split}_images"], cache[f"{split}_targets"]
        assert images.shape == (count, 1, 36, 36) and images.dtype == torch.uint8
        assert targets.shape == (count, 2) and targets.dtype == torch.int64
        i, j = cache[f"{split}_left_index"], cache[f"{split}_right_index"]
        assert torch.equal(targets[:, 0], fashion[split].labels[i])
        assert torch.equal(targets[:, 1], fashion[split].labels[j])
    k = 5
    i, j = cache["train_left_index"][k].item(), cache["train_right_index"][k].item()
    left, right = fashion["train"].images[i].int(), fashion["train"].images[j].int()
    expected = torch.zeros(36, 36, dtype=torch.int32)
    expected[:28, :28] = left
    expected[8:, 8:] = torch.maximum(expected[8:, 8:], right)
    assert torch.equal(cache["train_images"][k, 0].int(), expected)
    assert len(set(cache["train_left_index"].tolist())) > 100  # pairs use many different items
    mean, std = cache["mean"][0], cache["std"][0]
    assert mean == pytest.approx(cache["train_images"].float().div(255).mean().item(), rel=1e-4)
    assert std == pytest.approx(cache["train_images"].float().div(255).std().item(), rel=1e-3)


def test_multi_fashion_mnist_takes_right_item_from_mnist(root):
    cache = small(MultiFashionMNIST, root).build()
    mnist = load_source("mnist", root)["train"]
    assert torch.equal(cache["train_targets"][:, 1], mnist.labels[cache["train_right_index"]])
    k, j = 0, cache["train_right_index"][0].item()
    region = cache["train_images"][k, 0, 8:, 8:]
    assert torch.all(region >= mnist.images[j])  # pixelwise max keeps the right item


def test_build_is_deterministic_in_seed(root):
    a, b, c = small(root=root, seed=7).build(), small(root=root, seed=7).build(), small(root=root, seed=8).build()
    assert torch.equal(a["train_images"], b["train_images"]) and torch.equal(a["test_targets"], b["test_targets"])
    assert not torch.equal(a["train_images"], c["train_images"])


def test_cache_written_atomically_and_reused(root, monkeypatch):
    dm = small(root=root)
    dm.prepare_data()
    assert cache_files(root) == [dm.cache_path.name]  # no temp files left behind
    assert dm.cache_path.name.startswith("multi_fashion-")
    mtime = dm.cache_path.stat().st_mtime_ns
    first = dm.load()

    def no_rebuild(self):
        raise AssertionError("cache should have been reused")

    monkeypatch.setattr(MultiFashion, "build", no_rebuild)
    again = small(root=root)
    again.prepare_data()
    second = again.load()
    assert torch.equal(first.train_images, second.train_images)
    assert dm.cache_path.stat().st_mtime_ns == mtime


def test_cache_name_depends_on_build_params(root):
    base = small(root=root).cache_path
    assert small(root=root, batch_size=7, limit_train=10).cache_path == base  # not build params
    for change in ({"seed": 1}, {"offset": 6}, {"resize": 28}, {"train_pairs": 301}):
        assert small(root=root, **change).cache_path != base


@pytest.mark.parametrize("corruption", ["garbage", "wrong_shape"])
def test_corrupt_cache_is_rebuilt_with_warning(root, corruption):
    dm = small(root=root)
    dm.prepare_data()
    good = dm.load()
    if corruption == "garbage":
        dm.cache_path.write_bytes(b"not a torch file")
    else:
        bad = torch.load(dm.cache_path, weights_only=True)
        bad["train_images"] = bad["train_images"][:10]
        torch.save(bad, dm.cache_path)
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = small(root=root).load()
    assert torch.equal(rebuilt.train_images, good.train_images)
    assert cache_files(root) == [dm.cache_path.name]
    assert torch.load(dm.cache_path, weights_only=True)["train_images"].shape == (300, 1, 36, 36)


def test_resize_and_mdmtn_offset(root):
    dm = small(root=root, offset=6, resize=28)
    assert dm.input_shape == (1, 28, 28)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28)
    cache = small(root=root, offset=6).build()
    i, j = cache["train_left_index"][0].item(), cache["train_right_index"][0].item()
    fashion = load_source("fashion_mnist", root)["train"].images
    image = cache["train_images"][0, 0]
    assert torch.equal(image[:6, :28], fashion[i][:6])  # left only, above the right item
    assert torch.equal(image[28:34, 6:34], fashion[j][22:])  # right only, below the left item
    assert torch.all(image[34:] == 0) and torch.all(image[:, 34:] == 0) and torch.all(image[:6, 28:] == 0)


def test_invalid_geometry_rejected(root):
    with pytest.raises(ValueError, match="offset"):
        small(root=root, offset=9)
    with pytest.raises(ValueError, match="val_fraction"):
        small(root=root, val_fraction=1.0)


def test_paste_max_overlap():
    left = torch.full((1, 2, 2), 5, dtype=torch.uint8)
    right = torch.tensor([[[1, 9], [9, 1]]], dtype=torch.uint8)
    out = paste_max(left, right, canvas=3, offset=1)
    assert out[0].tolist() == [[5, 5, 0], [5, 5, 9], [0, 9, 1]]


# --- datamodule: splits, batches, loaders --------------------------------------------


def test_batches_are_normalised_with_task_targets(root):
    dm = small(root=root)
    assert list(dm.tasks) == ["left", "right"] and dm.input_shape == (1, 36, 36)
    dm.setup("fit")
    data = dm.load()
    x, targets = next(iter(dm.val_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (30, 1, 36, 36)
    assert list(targets) == ["left", "right"]
    assert all(t.dtype == torch.int64 and t.shape == (30,) for t in targets.values())
    source = dm.val_indices  # eval loaders are in order
    expected = (data.train_images[source].float() / 255 - data.mean[0]) / data.std[0]
    assert torch.allclose(x, expected, atol=1e-5)
    assert torch.equal(targets["right"], data.train_targets[source, 1])


def test_train_loader_covers_each_sample_once_per_epoch():
    dm = Synthetic(train_samples=300, batch_size=64, seed=3)
    dm.setup("fit")
    full, full_targets = dm.datasets["train"][range(dm.num_train_samples)]
    rows = full.flatten(1)
    assert len(torch.unique(rows, dim=0)) == len(rows)  # samples are distinguishable
    epochs = []
    for _ in range(2):
        batches = list(dm.train_dataloader())
        assert [len(x) for x, _ in batches] == [64] * 4 + [14]
        xs = torch.cat([x for x, _ in batches]).flatten(1)
        t0 = torch.cat([t["t0"] for _, t in batches])
        assert torch.equal(torch.unique(xs, dim=0), torch.unique(rows, dim=0)) and len(xs) == len(rows)
        order = [torch.nonzero((rows == r).all(1)).item() for r in xs]
        assert torch.equal(t0, full_targets["t0"][order])  # targets travel with their images
        epochs.append(order)
    assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])  # reshuffled each epoch

    again = Synthetic(train_samples=300, batch_size=64, seed=3)
    again.setup("fit")
    first = torch.cat([x for x, _ in again.train_dataloader()]).flatten(1)
    assert [torch.nonzero((rows == r).all(1)).item() for r in first] == epochs[0]  # seeded shuffle


def test_split_disjoint_deterministic_and_sized():
    def split(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        dm = Synthetic(train_samples=500, val_fraction=0.2, seed=seed)
        dm.setup()
        assert dm.num_train_samples == 400 and len(dm.datasets["val"]) == 100 and len(dm.datasets["test"]) == 128
        return dm.train_indices, dm.val_indices

    train, val = split(0)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(500))
    train2, val2 = split(0)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert not torch.equal(val, split(1)[1])


def test_limits_subsample_after_build(root):
    dm = small(root=root, limit_train=100, limit_test=20, val_fraction=0.1)
    dm.setup()
    assert (dm.num_train_samples, len(dm.datasets["val"]), len(dm.datasets["test"])) == (90, 10, 20)
    assert cache_files(root) == [dm.cache_path.name]  # the full set was cached
    assert torch.load(dm.cache_path, weights_only=True)["train_images"].shape[0] == 300


def test_num_train_samples_needs_setup():
    with pytest.raises(RuntimeError, match="setup"):
        _ = Synthetic().num_train_samples


def test_worker_processes_give_the_same_batches():
    def batches(workers: int) -> list[torch.Tensor]:
        dm = Synthetic(num_workers=workers, batch_size=100)
        dm.setup()
        return [x for x, _ in dm.train_dataloader()]

    assert all(torch.equal(a, b) for a, b in zip(batches(0), batches(2), strict=True))


def test_lightning_trains_on_the_loaders():
    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(16 * 16, 8)
            self.seen = 0

        def training_step(self, batch, _):
            x, targets = batch
            self.seen += len(x)
            out = self.net(x.flatten(1))
            return sum(torch.nn.functional.cross_entropy(out[:, 4 * k : 4 * k + 4], targets[f"t{k}"]) for k in (0, 1))

        def validation_step(self, batch, _):
            self.log("val/loss", self.training_step(batch, _), batch_size=len(batch[0]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm, model = Synthetic(batch_size=64), Probe()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert model.seen == dm.num_train_samples + len(dm.datasets["val"])  # val steps count too
    assert "val/loss" in trainer.callback_metrics


# --- digits and synthetic ------------------------------------------------------------


def test_multi_digits_shapes_tasks_determinism():
    dm = MultiDigits(train_pairs=400, test_pairs=100, seed=2)
    assert list(dm.tasks) == ["left", "right"] and dm.input_shape == (1, 12, 12)
    dm.setup()
    x, targets = next(iter(dm.test_dataloader()))
    assert x.shape == (100, 1, 12, 12) and x.dtype == torch.float32
    assert all(0 <= t.min() and t.max() <= 9 for t in targets.values())
    a, b, c = (MultiDigits(train_pairs=400, test_pairs=100, seed=s).load() for s in (2, 2, 3))
    assert torch.equal(a.train_images, b.train_images) and not torch.equal(a.train_images, c.train_images)
    assert a.train_images.max() == 255  # 0..16 scaled to the full uint8 range


@pytest.mark.parametrize("num_tasks, channels", [(2, 1), (3, 3)])
def test_synthetic_shapes_tasks_determinism(num_tasks, channels):
    def make(seed):
        return Synthetic(num_tasks=num_tasks, channels=channels, num_classes=5, image_size=12, seed=seed)
    dm = make(0)
    assert list(dm.tasks) == [f"t{k}" for k in range(num_tasks)] and dm.input_shape == (channels, 12, 12)
    assert all(task.num_classes == 5 for task in dm.tasks.values())
    dm.setup()
    x, targets = next(iter(dm.train_dataloader()))
    assert x.shape == (256, channels, 12, 12) and list(targets) == list(dm.tasks)
    a, b, c = make(0).load(), make(0).load(), make(1).load()
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_targets, b.test_targets)
    assert not torch.equal(a.train_images, c.train_images)


def test_synthetic_labels_are_learnable():
    from sklearn.linear_model import LogisticRegression

    dm = Synthetic(seed=5)
    dm.setup()
    x, y = dm.datasets["train"][range(dm.num_train_samples)]
    xt, yt = dm.datasets["test"][range(128)]
    for task in dm.tasks:
        clf = LogisticRegression(max_iter=300).fit(x.flatten(1).numpy(), y[task].numpy())
        assert clf.score(xt.flatten(1).numpy(), yt[task].numpy()) > 0.8  # chance is 0.25


# --- configs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [
        ("multi_fashion", MultiFashion),
        ("multi_mnist", MultiMNIST),
        ("multi_fashion_mnist", MultiFashionMNIST),
        ("multi_digits", MultiDigits),
        ("synthetic", Synthetic),
    ],
)
def test_dataset_configs_instantiate(tmp_path, name, cls):
    dataset = OmegaConf.load(CONF_DATASET / f"{name}.yaml")
    cfg = OmegaConf.create({"data_root": str(tmp_path), "seed": 3, "dataset": dataset})
    dm = instantiate(cfg.dataset)
    assert type(dm) is cls and dm.root == str(tmp_path) and dm.seed == 3 and dm.batch_size == 256
    assert len(dm.tasks) >= 2 and len(dm.input_shape) == 3
    assert not (tmp_path / "mtlsparse_cache").exists()  # nothing loaded at construction


def test_multi_fashion_default_protocol():
    dm = MultiFashion()
    assert (dm.canvas, dm.offset, dm.resize, dm.train_pairs, dm.test_pairs) == (36, 8, None, 120_000, 20_000)
    assert "apt-get install dataset-fashion-mnist" in dm.source_hint


# --- real data -----------------------------------------------------------------------


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_multi_fashion(tmp_path):
    dm = MultiFashion(root=str(tmp_path), train_pairs=3000, test_pairs=500, limit_train=1000)
    dm.prepare_data()
    dm.setup()
    assert dm.num_train_samples == 900 and len(dm.datasets["test"]) == 500
    x, targets = next(iter(dm.train_dataloader()))
    assert x.shape == (256, 1, 36, 36) and x.dtype == torch.float32
    data = dm.load()
    for k in range(2):
        labels = data.train_targets[:, k]
        assert labels.min() == 0 and labels.max() == 9 and len(labels.unique()) == 10
    assert 0.1 < data.mean[0] < 0.4 and 0.2 < data.std[0] < 0.5  # Fashion-MNIST-like statistics
    raw = read_idx(DEBIAN_FASHION / "train-labels-idx1-ubyte.gz")
    assert raw.shape == (60_000,)


def test_augment_shift_translates_training_images_only_and_rejects_negative_values(tmp_path):
    with pytest.raises(ValueError, match="augment_shift must be >= 0"):
        Synthetic(root=str(tmp_path), augment_shift=-1)
    plain = Synthetic(root=str(tmp_path), batch_size=16)
    shifted = Synthetic(root=str(tmp_path), batch_size=16, augment_shift=2)
    plain.setup()
    shifted.setup()
    idx = list(range(16))
    assert not torch.equal(plain.datasets["train"][idx][0], shifted.datasets["train"][idx][0])
    assert torch.equal(plain.datasets["test"][idx][0], shifted.datasets["test"][idx][0])
