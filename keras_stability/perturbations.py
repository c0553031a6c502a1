"""Samplers of the perturbed copy x' used by stability training."""

import keras
from keras import ops

from keras_stability import _validation


@keras.saving.register_keras_serializable(package="keras_stability")
class GaussianPerturbation(keras.layers.Layer):
    """Adds pixel-wise Gaussian noise, in normalised units (paper eq. 5).

    `x'_k = x_k + eps_k` with `eps_k ~ N(0, (stddev * (high - low))^2)`. The
    paper defines `stddev` on pixels normalised to `[0, 1]`; `value_range`
    tells the layer the range of its inputs, so a model that takes 0-255
    images gets the same relative noise (`stddev=0.04` adds noise of standard
    deviation 10.2 to 0-255 inputs).

    Like `keras.layers.GaussianNoise`, the layer is the identity unless called
    with `training=True`. Integer inputs (e.g. uint8 images) are cast to the
    layer's compute dtype first, in both modes. The noise is drawn from a
    `keras.random.SeedGenerator` owned by the layer: it is fresh at every step
    and reproducible from `seed` on every backend.

    `stddev` lives in a non-trainable variable, so `layer.stddev = 0.1` takes
    effect in an already compiled train step (a noise warm-up or schedule from
    a callback), as `StabilityModel.alpha` does.

    Args:
        stddev: standard deviation of the noise as a fraction of the value
            range; `>= 0`. The paper's classification default is 0.04, its
            ranking default 0.2.
        value_range: `(low, high)` range of the input values.
        clip: whether to clip the perturbed values to `value_range`.
        seed: integer seed of the noise, or `None` for a random one.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Example:

    >>> import keras, numpy as np
    >>> layer = GaussianPerturbation(stddev=0.1, value_range=(0, 255), seed=1)
    >>> x = np.full((2, 8, 8, 3), 128, dtype="uint8")
    >>> y = layer(x, training=True)
    >>> tuple(y.shape), keras.backend.standardize_dtype(y.dtype)
    ((2, 8, 8, 3), 'float32')
    """

    def __init__(
        self, stddev=0.04, value_range=(0.0, 1.0), clip=False, seed=None, **kwargs
    ):
        super().__init__(**kwargs)
        stddev = _validation.check_number("stddev", stddev, minimum=0.0)
        # A variable, not a Python float, which a compiled step would freeze.
        self._stddev = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(stddev),
            dtype="float32",
            trainable=False,
            name="stddev",
        )
        self.value_range = _validation.check_value_range(value_range)
        if not isinstance(clip, bool):
            raise TypeError(f"`clip` must be a bool. Received: clip={clip!r}")
        self.clip = clip
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int or None. Received: seed={seed!r}")
        self.seed = seed
        # Owned from __init__: under JAX tracing a seed=None draw fails, and an
        # int seed passed straight to keras.random repeats the same noise.
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True
        self.built = True

    @property
    def stddev(self):
        """Noise standard deviation as a fraction of the value range."""
        return _validation.float_value(self._stddev)

    @stddev.setter
    def stddev(self, value):
        self._stddev.assign(_validation.check_number("stddev", value, minimum=0.0))

    @property
    def noise_stddev(self):
        """Standard deviation of the noise in the units of the inputs."""
        low, high = self.value_range
        return self.stddev * (high - low)

    def call(self, inputs, training=False):
        if not keras.backend.is_float_dtype(
            keras.backend.standardize_dtype(inputs.dtype)
        ):
            inputs = ops.cast(inputs, self.compute_dtype)
        if not training:
            return inputs
        low, high = self.value_range
        scale = ops.cast(self._stddev, inputs.dtype) * (high - low)
        noise = keras.random.normal(
            ops.shape(inputs), dtype=inputs.dtype, seed=self.seed_generator
        )
        outputs = inputs + noise * scale
        if self.clip:
            outputs = ops.clip(outputs, *self.value_range)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "stddev": self.stddev,
                "value_range": list(self.value_range),
                "clip": self.clip,
                "seed": self.seed,
            }
        )
        return config
