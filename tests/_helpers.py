"""Small models and layers shared by the tests."""

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="keras_stability_tests")
class FixedOffset(keras.layers.Layer):
    """A perturbation whose output is known: adds a fixed array in training."""

    def __init__(self, offset, **kwargs):
        super().__init__(**kwargs)
        self.offset = np.asarray(offset, "float32")

    def call(self, inputs, training=False):
        inputs = ops.cast(inputs, "float32")
        return inputs + self.offset if training else inputs

    def get_config(self):
        return {**super().get_config(), "offset": self.offset.tolist()}


def dense_classifier(num_features=4, num_classes=3, seed=0):
    """softmax(x W + b) with weights drawn from a fixed numpy seed."""
    model = keras.Sequential(
        [
            keras.Input((num_features,)),
            keras.layers.Dense(num_classes, activation="softmax"),
        ]
    )
    rng = np.random.default_rng(seed)
    model.set_weights(
        [
            rng.normal(0, 0.5, (num_features, num_classes)),
            rng.normal(0, 0.1, num_classes),
        ]
    )
    return model


def classification_data(n=32, num_features=4, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, num_features)).astype("float32")
    y = rng.integers(0, num_classes, n)
    return x, y
