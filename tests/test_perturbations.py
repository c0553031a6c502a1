import keras
import numpy as np
import pytest
from keras import ops

from keras_stability import GaussianPerturbation


def _np(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize(
    "value_range, expected_std", [((0.0, 1.0), 0.05), ((0, 255), 0.05 * 255)]
)
def test_noise_std_is_scaled_by_value_range(value_range, expected_std):
    layer = GaussianPerturbation(stddev=0.05, value_range=value_range, seed=3)
    x = np.full((64, 32, 32, 3), value_range[1] / 2, "float32")
    noise = _np(layer(x, training=True)) - x
    assert abs(noise.mean()) < 0.01 * expected_std
    assert noise.std() == pytest.approx(expected_std, rel=0.01)


def test_identity_when_not_training_and_casts_integers():
    layer = GaussianPerturbation(stddev=0.5, value_range=(0, 255), seed=0)
    x = np.arange(24, dtype="uint8").reshape(2, 3, 4, 1)
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_array_equal(_np(out), x.astype("float32"))
    noisy = layer(x, training=True)
    assert keras.backend.standardize_dtype(noisy.dtype) == "float32"
    assert np.abs(_np(noisy) - x).max() > 1.0


def test_fresh_noise_each_call_and_reproducible_from_seed():
    x = np.zeros((4, 16), "float32")
    a, b = GaussianPerturbation(0.1, seed=7), GaussianPerturbation(0.1, seed=7)
    first_a, second_a = _np(a(x, training=True)), _np(a(x, training=True))
    first_b, second_b = _np(b(x, training=True)), _np(b(x, training=True))
    assert not np.allclose(first_a, second_a)
    np.testing.assert_array_equal(first_a, first_b)
    np.testing.assert_array_equal(second_a, second_b)
    other = GaussianPerturbation(0.1, seed=8)
    assert not np.allclose(_np(other(x, training=True)), first_a)


def test_clip_keeps_values_in_range():
    layer = GaussianPerturbation(stddev=0.5, value_range=(0.0, 1.0), clip=True, seed=0)
    out = _np(layer(np.full((8, 100), 0.9, "float32"), training=True))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out == 1.0).any()


def test_zero_stddev_is_identity_in_training():
    x = np.random.rand(3, 5).astype("float32")
    np.testing.assert_array_equal(_np(GaussianPerturbation(0.0)(x, training=True)), x)


def test_stddev_setter_validates_and_rescales_the_noise():
    layer = GaussianPerturbation(stddev=0.05, seed=3)
    x = np.full((64, 32, 32, 3), 0.5, "float32")
    layer.stddev = 0.2
    assert layer.stddev == 0.2 and layer.get_config()["stddev"] == 0.2
    assert (_np(layer(x, training=True)) - x).std() == pytest.approx(0.2, rel=0.01)
    with pytest.raises(ValueError, match="stddev"):
        layer.stddev = -1.0
    assert layer.stddev == 0.2


def test_config_round_trip():
    layer = GaussianPerturbation(
        0.2, value_range=(0, 255), clip=True, seed=4, name="noise"
    )
    restored = GaussianPerturbation.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config()
    assert restored.noise_stddev == pytest.approx(51.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stddev": -0.1}, "stddev"),
        ({"stddev": "0.1"}, "stddev"),
        ({"stddev": True}, "stddev"),
        ({"stddev": float("nan")}, "stddev"),
        ({"value_range": (1.0, 0.0)}, "value_range"),
        ({"value_range": 255}, "value_range"),
        ({"clip": "yes"}, "clip"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        GaussianPerturbation(**kwargs)
