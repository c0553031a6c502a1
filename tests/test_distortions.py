import io
import math
import os
import re

import keras
import numpy as np
import pytest
from PIL import Image

from keras_stability import distortions
from keras_stability.distortions import (
    JPEG,
    Crop,
    DistortedPyDataset,
    Gaussian,
    Thumbnail,
    crop_window,
    distort,
    thumbnail_size,
)

BICUBIC = Image.Resampling.BICUBIC


def _smooth_photo(size=96):
    """A real photo, blurred so that a lossless-ish codec is close to it."""
    try:
        from skimage import data

        photo = data.astronaut()
    except ImportError:
        # A smooth, colourful stand-in with the same role.
        yy, xx = np.mgrid[0:512, 0:512] / 512.0
        photo = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx) * np.cos(4 * yy)], axis=-1)
        photo = (photo * 255).astype("uint8")
    small = Image.fromarray(photo).resize((size // 3, size // 3), Image.BOX)
    return np.asarray(small.resize((size, size), BICUBIC))


@pytest.fixture(scope="module")
def photo():
    return _smooth_photo()


@pytest.fixture(scope="module")
def batch(photo):
    # Eight different 64x64 windows of the photo.
    return np.stack([photo[i * 4 : i * 4 + 64, i * 3 : i * 3 + 64] for i in range(8)])


def _mae(a, b):
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()


# ---------------------------------------------------------------------------
# Each distortion against an independent expectation
# ---------------------------------------------------------------------------


def test_jpeg_error_grows_as_quality_drops(photo):
    error_100 = _mae(JPEG(100).apply(photo), photo)
    error_10 = _mae(JPEG(10).apply(photo), photo)
    assert error_100 < 2.0
    assert error_10 > 4 * error_100


def test_jpeg_equals_a_pillow_round_trip(photo):
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=50)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    np.testing.assert_array_equal(distort(photo[None], "jpeg-50")[0], expected)


@pytest.mark.parametrize(
    "width, height", [(224, 224), (640, 480), (480, 640), (1000, 37), (5, 3)]
)
@pytest.mark.parametrize("pixels", [1, 50, 1000, 30000, 50000])
def test_thumbnail_size_keeps_area_and_aspect_ratio(width, height, pixels):
    thumb_w, thumb_h = thumbnail_size(width, height, pixels)
    if pixels >= width * height:
        assert (thumb_w, thumb_h) == (width, height)
        return
    # Each side is the exact scaled side, rounded (and at least 1 pixel).
    scale = math.sqrt(pixels / (width * height))
    assert abs(thumb_w - max(1.0, width * scale)) <= 0.5
    assert abs(thumb_h - max(1.0, height * scale)) <= 0.5
    if min(thumb_w, thumb_h) >= 10:
        assert thumb_w * thumb_h == pytest.approx(pixels, rel=0.15)
        assert thumb_w / thumb_h == pytest.approx(width / height, rel=0.1)


def test_thumbnail_resizes_down_and_back_up(photo):
    out = Thumbnail(1000).apply(photo)
    small = Image.fromarray(photo).resize((32, 32), BICUBIC)  # 32 * 32 ~ 1000
    expected = np.asarray(small.resize((96, 96), BICUBIC))
    assert out.shape == photo.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    assert 0 < _mae(out, photo) < 10


def test_thumbnail_of_at_least_the_image_size_is_the_identity(batch):
    np.testing.assert_array_equal(distort(batch, "thumb-4096"), batch)
    np.testing.assert_array_equal(distort(batch, "thumb-100000"), batch)


@pytest.mark.parametrize("width, height, offset", [(32, 32, 4), (40, 25, 1)])
def test_crop_window_stays_inside_the_image(width, height, offset):
    positions = set()
    for seed in range(400):
        left, top, right, bottom = crop_window(width, height, offset, rng=seed)
        assert 0 <= left and 0 <= top and right <= width and bottom <= height
        assert (right - left, bottom - top) == (width - offset, height - offset)
        positions.add((left, top))
    # Every allowed position is drawn, none outside (uniform over 0..offset).
    assert positions == {(i, j) for i in range(offset + 1) for j in range(offset + 1)}


def test_crop_takes_the_drawn_window():
    # Channel 0 holds 2*x, channel 1 holds 2*y: the mean of the distorted
    # image tells where its window was.
    height, width, offset = 60, 80, 20
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = np.stack([2 * xx, 2 * yy, np.zeros_like(xx)], axis=-1).astype("uint8")
    for index in range(5):
        out = distort(ramp[None], "crop-20", seed=7, start_index=index)[0]
        left, top, _, _ = crop_window(
            width, height, offset, np.random.default_rng([7, index])
        )
        centre_x = left + (width - offset - 1) / 2
        centre_y = top + (height - offset - 1) / 2
        assert out[..., 0].mean() / 2 == pytest.approx(centre_x, abs=0.5)
        assert out[..., 1].mean() / 2 == pytest.approx(centre_y, abs=0.5)
        np.testing.assert_array_equal(
            out,
            np.asarray(
                Image.fromarray(
                    ramp[top : top + height - offset, left : left + width - offset]
                ).resize((width, height), BICUBIC)
            ),
        )


def test_gaussian_noise_has_the_stddev_in_normalised_units():
    flat = np.full((4, 64, 64, 3), 128, "uint8")
    noise = distort(flat, "gaussian-0.05").astype(np.float64) - 128
    assert noise.mean() == pytest.approx(0.0, abs=0.3)
    assert noise.std() == pytest.approx(0.05 * 255, rel=0.03)

    flat_float = np.full((4, 64, 64, 3), 0.5, "float32")
    noise = distort(flat_float, "gaussian-0.05") - 0.5
    assert noise.std() == pytest.approx(0.05, rel=0.03)


def test_gaussian_is_clipped_to_the_value_range():
    near_top = np.full((2, 32, 32), 0.98, "float32")
    out = distort(near_top, "gaussian-0.2")
    assert out.max() == 1.0 and out.min() >= 0.0
    out = distort(near_top * 255, "gaussian-0.2", value_range=(0, 255))
    assert out.max() == 255.0 and out.min() >= 0.0


# ---------------------------------------------------------------------------
# Seeds and workers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["crop-10", "gaussian-0.1"])
def test_same_seed_same_output_and_other_seed_other_output(batch, name):
    first = distort(batch, name, seed=3)
    np.testing.assert_array_equal(first, distort(batch, name, seed=3))
    assert not np.array_equal(first, distort(batch, name, seed=4))
    # Each image gets its own randomness.
    same_images = np.repeat(batch[:1], 4, axis=0)
    out = distort(same_images, name, seed=3)
    assert not np.array_equal(out[0], out[1])


@pytest.mark.parametrize("name", ["jpeg-50", "thumb-1000", "crop-10", "gaussian-0.1"])
def test_workers_do_not_change_the_output(batch, name, monkeypatch):
    # Force threads even for these small images.
    monkeypatch.setattr(distortions, "_MIN_PIXELS_PER_WORKER", 1)
    assert distortions._num_threads(batch.shape, 2) == 2
    one = distort(batch, name, seed=5, workers=1)
    np.testing.assert_array_equal(one, distort(batch, name, seed=5, workers=2))
    np.testing.assert_array_equal(one, distort(batch, name, seed=5, workers=3))


def test_batches_with_start_index_equal_the_whole_set(batch):
    whole = distort(batch, "crop-10", seed=1)
    parts = [
        distort(batch[i : i + 3], "crop-10", seed=1, start_index=i) for i in (0, 3, 6)
    ]
    np.testing.assert_array_equal(whole, np.concatenate(parts))


def test_small_batches_run_on_one_thread():
    assert distortions._num_threads((4, 64, 64, 3), 8) == 1
    assert distortions._num_threads((256, 224, 224, 3), 2) == 2
    assert distortions._num_threads((3, 1024, 1024, 3), 8) == 3


# ---------------------------------------------------------------------------
# Dtypes, ranges and shapes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jpeg-50", "thumb-1000", "crop-10", "gaussian-0.1"])
def test_uint8_and_float_inputs_keep_dtype_shape_and_range(batch, name):
    out = distort(batch, name)
    assert out.shape == batch.shape and out.dtype == np.uint8

    unit = batch.astype("float32") / 255
    out = distort(unit, name)
    assert out.shape == batch.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0

    out = distort(batch.astype("float64"), name, value_range=(0, 255))
    assert out.dtype == np.float64
    assert 0.0 <= out.min() and out.max() <= 255.0
    assert out.max() > 1.0


@pytest.mark.parametrize("name", ["jpeg-50", "thumb-1000", "crop-10"])
def test_float_inputs_equal_the_uint8_result_up_to_scale(batch, name):
    # The Pillow distortions quantise floats to 8 bits: on inputs that are
    # already 8-bit values the results agree exactly (up to float rounding).
    expected = distort(batch, name, seed=2).astype(np.float64)
    unit = distort(batch.astype("float32") / 255, name, seed=2)
    np.testing.assert_allclose(unit * 255, expected, atol=1e-3)
    wide = distort(batch.astype("float32"), name, seed=2, value_range=(0, 255))
    np.testing.assert_allclose(wide, expected, atol=1e-3)
    shifted = distort(batch / 127.5 - 1, name, seed=2, value_range=(-1, 1))
    np.testing.assert_allclose((shifted + 1) * 127.5, expected, atol=1e-3)


@pytest.mark.parametrize("name", ["jpeg-50", "thumb-1000", "crop-10", "gaussian-0.1"])
def test_grayscale_with_and_without_channel_axis(batch, name):
    gray = batch[..., 0]
    out = distort(gray, name, seed=1)
    assert out.shape == gray.shape and out.dtype == np.uint8
    with_channel = distort(gray[..., None], name, seed=1)
    np.testing.assert_array_equal(with_channel[..., 0], out)


def test_empty_batch(batch):
    out = distort(batch[:0], "jpeg-50")
    assert out.shape == (0, 64, 64, 3) and out.dtype == np.uint8


# ---------------------------------------------------------------------------
# Names, configs and errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("jpeg-50", JPEG(50)),
        ("thumb-30000", Thumbnail(30000)),
        ("thumb-30k", Thumbnail(30000)),
        ("crop-10", Crop(10)),
        ("gaussian-0.1", Gaussian(0.1)),
        ("gaussian-1e-3", Gaussian(0.001)),
    ],
)
def test_get_parses_paper_names_and_configs_round_trip(name, expected):
    distortion = distortions.get(name)
    assert distortion == expected
    assert distortions.get(distortion.name) == distortion
    assert distortions.get(distortion) is distortion
    assert type(distortion).from_config(distortion.get_config()) == distortion
    assert distortions.get(distortions.serialize(distortion)) == distortion


def test_names_are_the_papers():
    assert JPEG(50).name == "jpeg-50"
    assert Thumbnail(30000).name == "thumb-30000"
    assert Crop(10).name == "crop-10"
    assert Gaussian(0.1).name == "gaussian-0.1"
    assert Gaussian(0.04).name == "gaussian-0.04"


_IMAGES = np.zeros((2, 32, 32, 3), "uint8")


@pytest.mark.parametrize(
    "call, bad_value",
    [
        (lambda: distortions.get("blur-3"), "blur-3"),
        (lambda: distortions.get("jpeg"), "'jpeg'"),
        (lambda: distortions.get("jpeg-0"), "quality=0"),
        (lambda: distortions.get("jpeg-101"), "quality=101"),
        (lambda: distortions.get("thumb-0"), "pixels=0"),
        (lambda: distortions.get("crop-0"), "offset=0"),
        (lambda: distortions.get(3), "3"),
        (lambda: JPEG(50.5), "50.5"),
        (lambda: Gaussian(-0.1), "-0.1"),
        (lambda: Crop(5, resample="cubic"), "cubic"),
        (lambda: distort(_IMAGES, "crop-32"), "crop offset 32"),
        (lambda: distort(_IMAGES[:, :, :20], "crop-25"), "min(32, 20)"),
        (lambda: Crop(40).apply(_IMAGES[0]), "crop offset 40"),
        (lambda: distort(_IMAGES[0, :, :, 0], "jpeg-50"), "(32, 32)"),
        (lambda: distort(_IMAGES[None], "jpeg-50"), "(1, 2, 32, 32, 3)"),
        (lambda: distort(_IMAGES[..., :2], "jpeg-50"), "(2, 32, 32, 2)"),
        (lambda: distort(_IMAGES.astype(bool), "jpeg-50"), "bool"),
        (lambda: distort(_IMAGES, "jpeg-50", value_range=(1, 1)), "(1, 1)"),
        (lambda: distort(_IMAGES, "jpeg-50", seed=-1), "seed=-1"),
        (lambda: distort(_IMAGES, "jpeg-50", workers=0), "workers=0"),
        (lambda: JPEG(50).apply(_IMAGES[0].astype("float32")), "float32"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_value(call, bad_value):
    with pytest.raises(ValueError, match=re.escape(bad_value)):
        call()


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


def test_cache_stores_and_reloads(batch, tmp_path, monkeypatch):
    first = distort(batch, "crop-10", seed=1, cache_dir=tmp_path)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("crop-10-")
    assert files[0].endswith(".npy")

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of loading the cache")

    monkeypatch.setattr(Crop, "call", fail)
    np.testing.assert_array_equal(
        distort(batch, "crop-10", seed=1, cache_dir=tmp_path), first
    )
    monkeypatch.undo()
    # Another seed, input or range is another entry.
    distort(batch, "crop-10", seed=2, cache_dir=tmp_path)
    distort(batch[:4], "crop-10", seed=1, cache_dir=tmp_path)
    assert len(os.listdir(tmp_path)) == 3


# ---------------------------------------------------------------------------
# PyDataset
# ---------------------------------------------------------------------------


def test_pydataset_batches_equal_distort(batch):
    labels = np.arange(len(batch))
    dataset = DistortedPyDataset(batch, labels, "crop-10", batch_size=3, seed=4)
    assert len(dataset) == 3
    shapes = [dataset[i][0].shape for i in range(3)]
    assert shapes == [(3, 64, 64, 3), (3, 64, 64, 3), (2, 64, 64, 3)]
    np.testing.assert_array_equal(dataset[2][1], labels[6:])
    np.testing.assert_array_equal(dataset[1][0], dataset[1][0])
    np.testing.assert_array_equal(
        np.concatenate([dataset[i][0] for i in range(3)]),
        distort(batch, "crop-10", seed=4),
    )
    with pytest.raises(IndexError):
        dataset[3]


def test_pydataset_feeds_predict(batch):
    keras.backend.clear_session()
    dataset = DistortedPyDataset(batch, None, "jpeg-50", batch_size=4)
    x_batch = dataset[0]
    assert isinstance(x_batch, tuple) and len(x_batch) == 1
    model = keras.Sequential(
        [
            keras.Input((64, 64, 3)),
            keras.layers.Rescaling(1.0 / 255),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    assert model.predict(dataset, verbose=0).shape == (8, 2)


def test_pydataset_validates_arguments(batch):
    with pytest.raises(ValueError, match="len\\(y\\)=3"):
        DistortedPyDataset(batch, np.arange(3), "jpeg-50")
    with pytest.raises(ValueError, match="crop offset 64"):
        DistortedPyDataset(batch, None, "crop-64")
    with pytest.raises(ValueError, match="batch_size=0"):
        DistortedPyDataset(batch, None, "jpeg-50", batch_size=0)
