"""Stability distances D(f(x), f(x')) and the triplet ranking loss.

The stability losses follow Zheng et al., "Improving the Robustness of Deep
Neural Networks via Stability Training" (CVPR 2016): eq. (10) for class
probabilities and eq. (8) for embeddings. They are ordinary
`keras.losses.Loss` subclasses whose two arguments are the outputs on the clean
input and on the perturbed input, so they reduce, weight and scale under
`tf.distribute` exactly like any Keras loss.
"""

import keras
from keras import ops

from keras_stability import _validation

_KL_FORMS = ("kl", "cross_entropy")


def _as_float32(x):
    # The distances are computed in float32 even for float16 models: the
    # epsilon that keeps log() and sqrt() finite underflows in float16.
    return ops.cast(x, "float32")


@keras.saving.register_keras_serializable(package="keras_stability")
class StabilityKL(keras.losses.Loss):
    """Stability distance between class distributions (paper eq. 10).

    `StabilityKL()(p_clean, p_perturbed)` returns, per sample, either the
    Kullback-Leibler divergence `KL(p(x) || p(x')) = sum_j p_j log(p_j / p'_j)`
    (`form="kl"`, the default) or the paper's literal cross-entropy
    `-sum_j p_j log p'_j` (`form="cross_entropy"`).

    The two differ by the entropy `H(p(x))`, which depends on the weights:
    minimising the cross-entropy form also pushes the clean prediction towards
    lower entropy (more confident outputs). `"kl"` is the default because it is
    a true divergence: it is exactly zero when `f(x) == f(x')`, so `sigma=0`
    or `alpha=0` reduce stability training to plain training, and the only
    thing it rewards is agreement between the two outputs.

    Gradients flow through both arguments, as in the paper (Fig. 4).

    Args:
        from_logits: whether the inputs are logits (softmax is applied) or
            probabilities.
        form: `"kl"` or `"cross_entropy"`.
        epsilon: probabilities are clipped to `[epsilon, 1]` before the log,
            so saturated outputs give a finite loss and gradient.
        reduction: as for any `keras.losses.Loss`.
        name: name of the loss.
        dtype: dtype of the returned loss.

    Example:

    >>> import numpy as np
    >>> p = np.array([[0.5, 0.5]], "float32")
    >>> q = np.array([[0.9, 0.1]], "float32")
    >>> round(float(StabilityKL()(p, q)), 4)  # 0.5*ln(0.5/0.9)+0.5*ln(0.5/0.1)
    0.5108
    """

    def __init__(
        self,
        from_logits=False,
        form="kl",
        epsilon=1e-7,
        reduction="sum_over_batch_size",
        name="stability_kl",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not isinstance(from_logits, bool):
            raise TypeError(
                f"`from_logits` must be a bool. Received: from_logits={from_logits!r}"
            )
        if form not in _KL_FORMS:
            raise ValueError(
                f"`form` must be one of {_KL_FORMS}. Received: form={form!r}"
            )
        self.from_logits = from_logits
        self.form = form
        self.epsilon = _validation.check_number(
            "epsilon", epsilon, minimum=0.0, exclusive_minimum=True
        )

    def _log_probs(self, y):
        if self.from_logits:
            return ops.log_softmax(y, axis=-1)
        return ops.log(ops.clip(y, self.epsilon, 1.0))

    def _probs(self, y):
        return ops.softmax(y, axis=-1) if self.from_logits else y

    def call(self, y_clean, y_perturbed):
        y_clean = _as_float32(y_clean)
        y_perturbed = _as_float32(y_perturbed)
        p = self._probs(y_clean)
        cross_entropy = -ops.sum(p * self._log_probs(y_perturbed), axis=-1)
        if self.form == "cross_entropy":
            return ops.cast(cross_entropy, self.dtype)
        # p * log p is 0 at p == 0, which the clipped log keeps finite.
        neg_entropy = ops.sum(p * self._log_probs(y_clean), axis=-1)
        return ops.cast(neg_entropy + cross_entropy, self.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "from_logits": self.from_logits,
                "form": self.form,
                "epsilon": self.epsilon,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_stability")
class StabilityL2(keras.losses.Loss):
    """Euclidean distance between clean and perturbed outputs (paper eq. 8).

    `||f(x) - f(x')||_2` over the last axis (the feature vector). Outputs
    with more axes give one distance per vector, and the reduction averages
    them: for a `TripletModel`, whose output stacks the embeddings of
    `(q, p, n)` as `(batch, 3, dim)`, the loss is the mean of the three
    per-image distances, so the stability term covers all three images
    (paper §3.3). The square root is taken of `max(squared_distance,
    epsilon)`, so the loss and its gradient stay finite when the two outputs
    coincide (`sigma=0`), where the gradient of a plain norm is undefined.

    Args:
        epsilon: floor of the squared distance inside the square root.
        reduction: as for any `keras.losses.Loss`.
        name: name of the loss.
        dtype: dtype of the returned loss.

    Example:

    >>> import numpy as np
    >>> a = np.array([[0.0, 3.0]], "float32")
    >>> b = np.array([[4.0, 0.0]], "float32")
    >>> float(StabilityL2()(a, b))
    5.0
    """

    def __init__(
        self,
        epsilon=1e-12,
        reduction="sum_over_batch_size",
        name="stability_l2",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.epsilon = _validation.check_number(
            "epsilon", epsilon, minimum=0.0, exclusive_minimum=True
        )

    def call(self, y_clean, y_perturbed):
        diff = _as_float32(y_clean) - _as_float32(y_perturbed)
        squared = ops.sum(ops.square(diff), axis=-1)
        return ops.cast(ops.sqrt(ops.maximum(squared, self.epsilon)), self.dtype)

    def get_config(self):
        config = super().get_config()
        config["epsilon"] = self.epsilon
        return config


@keras.saving.register_keras_serializable(package="keras_stability")
class TripletRankingLoss(keras.losses.Loss):
    """Triplet hinge loss on (query, positive, negative) embeddings (eq. 7).

    `max(0, g + D(f(q), f(p)) - D(f(q), f(n)))` with `D` the L2 distance and
    `g` the margin. `y_pred` is the three embeddings stacked on axis 1, shape
    `(batch, 3, dim)`, as returned by `keras_stability.TripletModel`; `y_true`
    is ignored (pass `None` or any array of length `batch`).

    Args:
        margin: the margin `g >= 0`.
        epsilon: floor of the squared distances inside the square root, so the
            gradient stays finite for identical embeddings.
        reduction: as for any `keras.losses.Loss`.
        name: name of the loss.
        dtype: dtype of the returned loss.

    Example:

    >>> import numpy as np
    >>> q, p, n = [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]  # D(q,p)=0.894 D(q,n)=1.414
    >>> y = np.array([[q, p, n]], "float32")
    >>> round(float(TripletRankingLoss(margin=1.0)(None, y)), 4)
    0.4802
    """

    def __init__(
        self,
        margin=0.1,
        epsilon=1e-12,
        reduction="sum_over_batch_size",
        name="triplet_ranking",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.margin = _validation.check_number("margin", margin, minimum=0.0)
        self.epsilon = _validation.check_number(
            "epsilon", epsilon, minimum=0.0, exclusive_minimum=True
        )

    def __call__(self, y_true, y_pred, sample_weight=None):
        if y_true is None:
            y_true = ops.zeros((ops.shape(y_pred)[0],))
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def _distance(self, a, b):
        squared = ops.sum(ops.square(a - b), axis=-1)
        return ops.sqrt(ops.maximum(squared, self.epsilon))

    def call(self, y_true, y_pred):
        del y_true
        y_pred = _as_float32(y_pred)
        if len(y_pred.shape) != 3 or (
            y_pred.shape[1] is not None and y_pred.shape[1] != 3
        ):
            raise ValueError(
                "TripletRankingLoss expects embeddings stacked as "
                "(batch, 3, dim) for (query, positive, negative). "
                f"Received shape: {tuple(y_pred.shape)}"
            )
        query, positive, negative = y_pred[:, 0], y_pred[:, 1], y_pred[:, 2]
        hinge = (
            self.margin
            + self._distance(query, positive)
            - self._distance(query, negative)
        )
        return ops.cast(ops.relu(hinge), self.dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"margin": self.margin, "epsilon": self.epsilon})
        return config


def get(identifier, from_logits=False):
    """Returns a stability distance from a name or a `keras.losses.Loss`.

    Args:
        identifier: `"kl"` (true KL divergence, eq. 10), `"cross_entropy"`
            (the paper's literal form of eq. 10), `"l2"` (eq. 8), or a
            `keras.losses.Loss` instance taking `(f(x), f(x'))`.
        from_logits: passed to `StabilityKL` for the named KL forms.

    Returns:
        A `keras.losses.Loss`.

    Example:

    >>> get("l2").name
    'stability_l2'
    """
    if isinstance(identifier, keras.losses.Loss):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower()
        if key in _KL_FORMS:
            return StabilityKL(from_logits=from_logits, form=key)
        if key == "l2":
            return StabilityL2()
    raise ValueError(
        "`stability_loss` must be one of 'kl', 'cross_entropy', 'l2' or a "
        f"keras.losses.Loss instance. Received: stability_loss={identifier!r}"
    )
