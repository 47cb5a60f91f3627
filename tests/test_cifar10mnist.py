"""Cifar10Mnist on tiny fakes in the real formats (CIFAR-10 pickles, MNIST IDX): reading, blend, cache, errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtlsparse.config import CONF_DIR
from mtlsparse.data.cifar10mnist import Cifar10Mnist, load_cifar10
from mtlsparse.data.idx import write_idx
from mtlsparse.data.sources import FILE_NAMES

from fakes import fake_items, write_fake_cifar10

N_TRAIN, N_TEST = 100, 40  # fake CIFAR-10 sizes; the fake MNIST has more digits, as the real one does


def clean_mnist() -> dict[str, torch.Tensor]:
    """Fake MNIST (file name -> tensor) whose digits have an exactly-zero background, as real MNIST."""
    train_x, train_y = fake_items(N_TRAIN + 20, seed=5)
    test_x, test_y = fake_items(N_TEST + 10, seed=6)
    for images in (train_x, test_x):
        images[images < 60] = 0  # drop fake_items' background noise, so ink and background differ
    return dict(zip(FILE_NAMES, (train_x, train_y, test_x, test_y)))


def write_clean_mnist(directory: Path) -> None:
    directory.mkdir(parents=True)
    for name, tensor in clean_mnist().items():
        write_idx(directory / name, tensor)


@pytest.fixture
def root(tmp_path) -> Path:
    write_fake_cifar10(tmp_path, N_TRAIN, N_TEST)
    write_clean_mnist(tmp_path / "MNIST" / "raw")
    return tmp_path


@pytest.mark.parametrize("key", [str.encode, str], ids=["bytes_keys", "str_keys"])
def test_reads_the_torchvision_pickles_in_batch_order(tmp_path, key):
    written = write_fake_cifar10(tmp_path, N_TRAIN, N_TEST, key=key)
    cifar = load_cifar10(tmp_path)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = cifar[split]
        data, expected_labels = written[split]
        assert images.dtype == torch.uint8 and images.shape == (n, 3, 32, 32)
        assert labels.tolist() == expected_labels.tolist()
        assert torch.equal(images[n - 1, 1], torch.from_numpy(data[n - 1, 1024:2048].reshape(32, 32)))  # green


def test_shapes_and_labels_come_from_the_matching_items(root):
    dm = Cifar10Mnist(root=str(root), batch_size=16)
    data = dm.load()
    cifar, mnist = load_cifar10(root), clean_mnist()
    for split, n, labels_file in (("train", N_TRAIN, FILE_NAMES[1]), ("test", N_TEST, FILE_NAMES[3])):
        images, targets = getattr(data, f"{split}_images"), getattr(data, f"{split}_targets")
        assert images.dtype == torch.uint8 and images.shape == (n, 3, 32, 32)
        assert targets.dtype == torch.int64 and targets.shape == (n, 2)
        assert torch.equal(targets[:, 0], cifar[split][1])  # task cifar: the i-th CIFAR-10 label
        assert torch.equal(targets[:, 1], mnist[labels_file][:n].long())  # task digit: the i-th MNIST label
    assert len(data.mean) == len(data.std) == 3
    dm.setup()
    assert (len(dm.datasets["train"]), len(dm.datasets["val"]), len(dm.datasets["test"])) == (80, 20, N_TEST)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and set(y) == {"cifar", "digit"}


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_blend_matches_the_formula_on_one_sample(root, alpha):
    i = 7
    images = Cifar10Mnist(root=str(root), alpha=alpha).load().train_images[i].double()
    cifar = load_cifar10(root)["train"][0][i].double()
    digit = clean_mnist()[FILE_NAMES[0]][i].double()
    digit = F.interpolate(digit[None, None], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    digit = digit.round().clamp(0, 255)[0]  # [1,32,32], broadcast over RGB
    ink = digit > 0
    assert 0 < ink.sum() < ink.numel()
    expected = torch.where(ink, (1 - alpha) * cifar + alpha * digit, cifar)
    assert torch.equal(images[:, ~ink[0]], cifar[:, ~ink[0]])  # no ink: the CIFAR pixel unchanged
    assert (images - expected).abs().max() <= 0.5  # ink: the blend, rounded to uint8


def test_build_is_deterministic_and_cached_atomically(root, monkeypatch):
    dm = Cifar10Mnist(root=str(root))
    first = dm.build()
    assert all(torch.equal(first[k], v) for k, v in dm.build().items() if isinstance(v, torch.Tensor))
    dm.prepare_data()
    cache_dir = root / "mtlsparse_cache"
    assert [p.name for p in cache_dir.iterdir()] == [dm.cache_path.name]  # no temp files left
    assert dm.cache_path.name.startswith("cifar10mnist-")
    monkeypatch.setattr(Cifar10Mnist, "build", lambda self: pytest.fail("cache should have been reused"))
    assert torch.equal(Cifar10Mnist(root=str(root), seed=3).load().train_images, first["train_images"])
    assert Cifar10Mnist(root=str(root), alpha=0.4).cache_path != dm.cache_path


def test_missing_cifar10_message_names_the_files_and_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Cifar10Mnist(root=str(tmp_path)).prepare_data()
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message
    assert "cifar-10-python.tar.gz" in message and "dataset.download=true" in message


def test_missing_mnist_message(tmp_path):
    write_fake_cifar10(tmp_path, N_TRAIN, N_TEST)
    with pytest.raises(FileNotFoundError, match=r"MNIST not found(.|\n)*MNIST/raw"):
        Cifar10Mnist(root=str(tmp_path)).load()


def test_download_uses_torchvision_when_asked(tmp_path, monkeypatch):
    import torchvision

    calls = []

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, download))
            write_fake_cifar10(Path(root), N_TRAIN, N_TEST)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    images, _ = load_cifar10(tmp_path, download=True)["train"]
    assert calls == [(str(tmp_path), True)] and len(images) == N_TRAIN


def test_too_few_digits_is_an_error(tmp_path):
    write_fake_cifar10(tmp_path, n_train=200, n_test=N_TEST)
    write_clean_mnist(tmp_path / "MNIST" / "raw")
    with pytest.raises(ValueError, match="MNIST has 120 digits for 200 CIFAR-10 images"):
        Cifar10Mnist(root=str(tmp_path)).load()


def test_config_instantiates_without_loading(tmp_path):
    cfg = OmegaConf.create({"data_root": str(tmp_path), "seed": 3,
                            "dataset": OmegaConf.load(Path(CONF_DIR) / "dataset" / "cifar10mnist.yaml")})
    dm = instantiate(cfg.dataset)
    assert type(dm) is Cifar10Mnist and dm.input_shape == (3, 32, 32) and list(dm.tasks) == ["cifar", "digit"]
    assert (dm.val_fraction, dm.alpha, dm.batch_size) == (0.2, 0.5, 256)
    assert not (tmp_path / "mtlsparse_cache").exists()
    with pytest.raises(ValueError, match="alpha"):
        Cifar10Mnist(alpha=0.0)
