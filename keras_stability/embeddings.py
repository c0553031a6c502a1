"""Embedding models for the paper's ranking setting (§3.3, §4.1)."""

import keras
from keras import ops

_TRIPLET_KEYS = ("query", "positive", "negative")


@keras.saving.register_keras_serializable(package="keras_stability")
class TripletModel(keras.Model):
    """Embeds a (query, positive, negative) triplet with one shared model.

    Takes `(q, p, n)` (a tuple or list of three image batches, or a dict with
    keys `"query"`, `"positive"`, `"negative"`) and returns the three
    embeddings stacked as `(batch, 3, dim)`, the input of
    `TripletRankingLoss`. Wrapped in a `StabilityModel` with
    `stability_loss="l2"`, the perturbation is applied to each of the three
    images and the stability term averages the three distances
    `||f(x) - f(x')||_2` (paper §3.3, last paragraph).

    Args:
        embedding: the embedding model `f` (image batch -> `(batch, dim)`),
            shared by the three branches.
        **kwargs: base `keras.Model` arguments.

    Example:

    >>> import numpy as np
    >>> import keras_stability as ks
    >>> f = ks.embedding_model((16, 16, 3), dim=8)
    >>> model = ks.StabilityModel(ks.TripletModel(f), alpha=0.1,
    ...     stability_loss="l2", perturbation=ks.GaussianPerturbation(0.2))
    >>> model.compile("adam", ks.TripletRankingLoss(margin=0.1))
    >>> q, p, n = (np.random.rand(8, 16, 16, 3).astype("float32") for _ in range(3))
    >>> history = model.fit((q, p, n), epochs=1, verbose=0)
    >>> model.predict((q, p, n), verbose=0).shape
    (8, 3, 8)
    """

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(embedding, keras.Model):
            raise TypeError(
                f"`embedding` must be a keras.Model. Received: embedding={embedding!r}"
            )
        self.embedding = embedding

    def _split(self, inputs):
        if isinstance(inputs, dict):
            missing = [key for key in _TRIPLET_KEYS if key not in inputs]
            if missing:
                raise ValueError(
                    f"A triplet dict needs the keys {_TRIPLET_KEYS}; missing "
                    f"{missing}. Received keys: {sorted(inputs)}"
                )
            return [inputs[key] for key in _TRIPLET_KEYS]
        if isinstance(inputs, (list, tuple)) and len(inputs) == 3:
            return list(inputs)
        shape = getattr(inputs, "shape", None)
        raise ValueError(
            "TripletModel expects a triplet (query, positive, negative): a "
            "tuple/list of three image batches or a dict with keys "
            f"{_TRIPLET_KEYS}. Received: {type(inputs).__name__}"
            + (f" of shape {tuple(shape)}" if shape is not None else "")
            + (f" of length {len(inputs)}" if isinstance(inputs, (list, tuple)) else "")
        )

    def call(self, inputs, training=None):
        images = self._split(inputs)
        return ops.stack(
            [self.embedding(image, training=training) for image in images], axis=1
        )

    def build(self, input_shape=None):
        if not self.embedding.built and input_shape is not None:
            self.embedding.build(self._split(input_shape)[0])
        self.built = True

    def get_config(self):
        config = super().get_config()
        config["embedding"] = keras.saving.serialize_keras_object(self.embedding)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["embedding"] = keras.saving.deserialize_keras_object(config["embedding"])
        return cls(**config)


def embedding_model(input_shape=(32, 32, 3), dim=64, width=32, name="embedding"):
    """A small CNN mapping images in `[0, 1]` to L2-normalised embeddings.

    A CPU-sized stand-in for the paper's Inception-based ranking network
    (§4.1): three conv blocks, global average pooling, a dense projection to
    `dim` (64 in the paper) and `keras.layers.UnitNormalization`, so that
    `||f(a) - f(b)||_2` lies in `[0, 2]`.

    Args:
        input_shape: shape of one image, `(height, width, channels)`.
        dim: embedding dimension.
        width: number of filters of the first conv block (doubled after).
        name: model name.

    Returns:
        A functional `keras.Model`.

    Example:

    >>> f = embedding_model((32, 32, 3), dim=64)
    >>> f.output_shape
    (None, 64)
    """
    for arg, value in (("dim", dim), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"`{arg}` must be a positive int. Received: {arg}={value!r}"
            )
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (width, 2 * width, 2 * width):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(dim)(x)
    outputs = keras.layers.UnitNormalization()(x)
    return keras.Model(inputs, outputs, name=name)
