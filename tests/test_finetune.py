import keras
import numpy as np
import pytest

from keras_stability import StabilityModel, freeze_all_but


def _mlp():
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="body"),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(8, activation="relu", name="neck"),
            keras.layers.Dense(3, activation="softmax", name="head"),
        ]
    )


def test_last_counts_weighted_layers_only():
    model = _mlp()
    kept = freeze_all_but(model, last=2)
    assert [layer.name for layer in kept] == ["neck", "head"]
    assert [layer.trainable for layer in model.layers] == [False, False, True, True]


def test_fine_tune_with_stability_changes_only_the_head():
    model = _mlp()
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 6)).astype("float32"), rng.integers(0, 3, 32)
    before = {
        layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers
    }
    freeze_all_but(model, names=["head"])
    stable = StabilityModel(model, alpha=0.1)
    stable.compile("adam", "sparse_categorical_crossentropy")
    stable.fit(x, y, epochs=2, verbose=0)
    for name in ("body", "neck"):
        for old, new in zip(before[name], model.get_layer(name).get_weights()):
            np.testing.assert_array_equal(old, new)
    assert any(
        np.abs(old - new).max() > 0
        for old, new in zip(before["head"], model.get_layer("head").get_weights())
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one"),
        ({"last": 1, "names": ["head"]}, "exactly one"),
        ({"last": 0}, "positive int"),
        ({"last": 9}, "exceeds"),
        ({"names": ["tail"]}, "tail"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        freeze_all_but(_mlp(), **kwargs)
