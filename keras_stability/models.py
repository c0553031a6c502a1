"""`StabilityModel`: trains any Keras model with the stability objective."""

import keras
from keras import ops

from keras_stability import _validation
from keras_stability import losses as stability_losses
from keras_stability.perturbations import GaussianPerturbation

try:  # The one private import: Keras' own loss tracker uses the same helper.
    from keras.src.losses.loss import unscale_loss_for_distribution
except ImportError:  # pragma: no cover - a future Keras that moved it

    def unscale_loss_for_distribution(value):
        return value


def _is_float_or_int(x):
    dtype = keras.backend.standardize_dtype(x.dtype)
    return dtype != "bool" and (
        keras.backend.is_float_dtype(dtype) or keras.backend.is_int_dtype(dtype)
    )


def _num_samples(x):
    """Number of samples in array-like `x`, or None when it cannot be told."""
    if isinstance(x, keras.utils.PyDataset):
        return len(x)
    leaves = [t for t in keras.tree.flatten(x) if hasattr(t, "shape")]
    if leaves and len(leaves[0].shape) > 0:
        return leaves[0].shape[0]
    cardinality = getattr(x, "cardinality", None)  # tf.data.Dataset
    if callable(cardinality):
        count = int(cardinality())
        return count if count >= 0 else None
    return None


def _check_not_empty(x):
    if _num_samples(x) == 0:
        raise ValueError(
            "`x` is empty: fit() needs at least one sample (or one batch). "
            f"Received: x of type {type(x).__name__} with 0 samples."
        )


@keras.saving.register_keras_serializable(package="keras_stability")
class StabilityModel(keras.Model):
    """Wraps a Keras model to train it with stability training.

    The training loss is `L0(x) + alpha * D(f(x), f(x'))` (paper eq. 2-3):
    `L0` is the loss given to `compile()`, evaluated on the clean batch only;
    `x'` is drawn by `perturbation` at every step; `f(x')` comes from a second
    forward pass through the same weights; `D` is `stability_loss`. Gradients
    of both terms flow into the wrapped model. `evaluate()`, `predict()` and
    `__call__` behave like the wrapped model (no perturbation, no stability
    term), and `fit()`'s `History` holds `task_loss` (L0) and `stability_loss`
    (D, before the factor `alpha`) beside `loss`.

    Batch normalization statistics are updated by both passes and dropout
    draws a different mask in each: with `perturbed_pass_training=True` (the
    default, the paper's Fig. 4) the perturbed pass runs in training mode, so
    the stability term also asks the outputs to agree across dropout masks.
    With `False` the perturbed pass runs in inference mode (no dropout, moving
    statistics of BatchNorm, which are then updated by the clean pass only).

    Args:
        model: the Keras model `f` to train (Sequential, functional or
            subclassed).
        alpha: weight of the stability term, `>= 0`. Paper defaults: 0.01 for
            classification, 0.1 for ranking. Stored in a non-trainable
            variable, so `stability_model.alpha = ...` takes effect in an
            already compiled step (e.g. from a warm-up callback).
        perturbation: a Keras layer producing `x'` from `x` when called with
            `training=True`, applied to every input of the model. Defaults to
            `GaussianPerturbation(stddev=0.04)` (inputs in `[0, 1]`). Any layer
            works, e.g. `keras.layers.RandomTranslation(0.1, 0.1)`.
        stability_loss: the distance `D`: `"kl"` (KL divergence of class
            probabilities, eq. 10, the default), `"cross_entropy"` (the
            paper's literal form of eq. 10), `"l2"` (eq. 8, for embeddings), or
            a `keras.losses.Loss` instance taking `(f(x), f(x'))`.
        from_logits: whether the output `D` applies to holds logits; used by
            the named KL forms.
        stability_output: for models with several outputs, the output `D`
            applies to: an index into the list of outputs or an output name.
        perturbed_pass_training: `training` flag of the perturbed forward
            pass (see above).
        **kwargs: base `keras.Model` arguments (`name`, ...).

    Example:

    >>> import numpy as np, keras
    >>> base = keras.Sequential(
    ...     [keras.Input((8,)), keras.layers.Dense(3, activation="softmax")]
    ... )
    >>> model = StabilityModel(base, alpha=0.01)
    >>> model.compile("sgd", "sparse_categorical_crossentropy")
    >>> x, y = np.random.rand(32, 8), np.random.randint(0, 3, 32)
    >>> sorted(model.fit(x, y, epochs=1, verbose=0).history)
    ['loss', 'stability_loss', 'task_loss']
    """

    def __init__(
        self,
        model,
        alpha=0.01,
        perturbation=None,
        stability_loss="kl",
        from_logits=False,
        stability_output=None,
        perturbed_pass_training=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise TypeError(
                "`model` must be a keras.Model (Sequential, functional or "
                f"subclassed). Received: model={model!r}"
            )
        if perturbation is None:
            perturbation = GaussianPerturbation(stddev=0.04)
        if not isinstance(perturbation, keras.layers.Layer):
            raise TypeError(
                "`perturbation` must be a keras.layers.Layer that perturbs its "
                "inputs when called with training=True, e.g. "
                "keras_stability.GaussianPerturbation(0.04). "
                f"Received: perturbation={perturbation!r}"
            )
        if not isinstance(perturbed_pass_training, bool):
            raise TypeError(
                "`perturbed_pass_training` must be a bool. Received: "
                f"perturbed_pass_training={perturbed_pass_training!r}"
            )
        alpha = _validation.check_number("alpha", alpha, minimum=0.0)
        self.model = model
        self.perturbation = perturbation
        self.stability_loss = stability_losses.get(stability_loss, from_logits)
        self.from_logits = from_logits
        self.stability_output = stability_output
        self.perturbed_pass_training = perturbed_pass_training
        self._alpha = keras.Variable(
            alpha, dtype="float32", trainable=False, name="alpha"
        )
        self.task_loss_tracker = keras.metrics.Mean(name="task_loss")
        self.stability_loss_tracker = keras.metrics.Mean(name="stability_loss")
        self._stability_term_in_step = True
        self._check_outputs()

    @property
    def alpha(self):
        """Weight of the stability term (a float)."""
        return _validation.float_value(self._alpha)

    @alpha.setter
    def alpha(self, value):
        self._alpha.assign(_validation.check_number("alpha", value, minimum=0.0))

    def _output_names(self):
        return list(getattr(self.model, "output_names", None) or [])

    def _check_outputs(self):
        """Fails early when the model's outputs do not fit the distance."""
        outputs = getattr(self.model, "outputs", None)
        if not outputs:
            return  # subclassed model: checked at the first step instead
        if len(outputs) > 1 and self.stability_output is None:
            raise ValueError(
                f"The model has {len(outputs)} outputs "
                f"({self._output_names()}); pass `stability_output` (an index "
                "or one of these names) to say which one the stability loss "
                "applies to."
            )
        output = self._select_output(list(outputs) if len(outputs) > 1 else outputs[0])
        if isinstance(self.stability_loss, stability_losses.StabilityKL):
            self._check_kl_output(output)

    def _check_kl_output(self, output):
        if len(output.shape) < 2 or (output.shape[-1] or 0) < 2:
            raise ValueError(
                f"stability_loss='{self.stability_loss.form}' compares class "
                "distributions and needs an output of shape (batch, "
                f"num_classes >= 2); the model's output has shape {output.shape}. "
                "Use stability_loss='l2' for embeddings or regression outputs."
            )
        history = getattr(output, "_keras_history", None)
        layer = getattr(history, "operation", None)
        if layer is None and self.model.layers:
            layer = self.model.layers[-1]
        activation = getattr(getattr(layer, "activation", None), "__name__", None)
        if not self.from_logits and activation == "linear":
            raise ValueError(
                f"stability_loss='{self.stability_loss.form}' with "
                "from_logits=False expects probabilities, but the model's last "
                f"layer '{layer.name}' has a linear activation. Pass "
                "from_logits=True or end the model with a softmax."
            )

    def _select_output(self, y_pred):
        if self.stability_output is None:
            if isinstance(y_pred, (list, tuple, dict)) and len(y_pred) > 1:
                raise ValueError(
                    "The model returned several outputs; pass "
                    "`stability_output` (an index or an output name)."
                )
            if isinstance(y_pred, dict):
                return next(iter(y_pred.values()))
            if isinstance(y_pred, (list, tuple)):
                return y_pred[0]
            return y_pred
        key = self.stability_output
        if isinstance(y_pred, dict):
            if key in y_pred:
                return y_pred[key]
        elif isinstance(y_pred, (list, tuple)):
            if isinstance(key, int) and -len(y_pred) <= key < len(y_pred):
                return y_pred[key]
            names = self._output_names()
            if key in names and len(names) == len(y_pred):
                return y_pred[names.index(key)]
        raise ValueError(
            f"`stability_output={key!r}` does not name an output of the model. "
            f"Accepted: an index below the number of outputs or one of "
            f"{self._output_names() or list(getattr(y_pred, 'keys', list)())}."
        )

    def _select_sample_weight(self, sample_weight):
        if isinstance(sample_weight, dict):
            return sample_weight.get(self.stability_output)
        if isinstance(sample_weight, (list, tuple)):
            index = self.stability_output
            if not isinstance(index, int):
                index = self._output_names().index(index)
            return sample_weight[index]
        return sample_weight

    def fit(self, x=None, y=None, *args, **kwargs):
        _check_not_empty(x)
        return super().fit(x, y, *args, **kwargs)

    def perturb(self, x):
        """Returns the perturbed copy `x'` of every numeric input in `x`."""
        return keras.tree.map_structure(
            lambda t: (
                self.perturbation(t, training=True)
                if t is not None and _is_float_or_int(t)
                else t
            ),
            x,
        )

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        # L0 first: each top-level call resets the layer losses, so the clean
        # pass's regularisation losses must be read before the perturbed pass.
        task_loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        # Weighted by batch size, as Keras weights its own `loss` tracker, so
        # that loss == task_loss + alpha * stability_loss holds per epoch.
        batch_size = ops.shape(keras.tree.flatten(x)[0])[0]
        self.task_loss_tracker.update_state(
            unscale_loss_for_distribution(task_loss), sample_weight=batch_size
        )
        self._stability_term_in_step = training
        if not training:
            return task_loss
        y_perturbed = self(self.perturb(x), training=self.perturbed_pass_training)
        distance = self.stability_loss(
            self._select_output(y_pred),
            self._select_output(y_perturbed),
            sample_weight=self._select_sample_weight(sample_weight),
        )
        self.stability_loss_tracker.update_state(
            unscale_loss_for_distribution(distance), sample_weight=batch_size
        )
        return task_loss + ops.cast(self._alpha, task_loss.dtype) * ops.cast(
            distance, task_loss.dtype
        )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        results = super().compute_metrics(x, y, y_pred, sample_weight)
        if not self._stability_term_in_step:
            # evaluate() computes no stability term: report none, not a 0.
            results.pop(self.stability_loss_tracker.name, None)
        return results

    def build(self, input_shape=None):
        # keras-tuner and load_model need a built model to load weights into.
        if not self.model.built and input_shape is not None:
            self.model.build(input_shape)
        self.built = True

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "alpha": self.alpha,
                "perturbation": keras.saving.serialize_keras_object(self.perturbation),
                "stability_loss": keras.saving.serialize_keras_object(
                    self.stability_loss
                ),
                "from_logits": self.from_logits,
                "stability_output": self.stability_output,
                "perturbed_pass_training": self.perturbed_pass_training,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("model", "perturbation", "stability_loss"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
