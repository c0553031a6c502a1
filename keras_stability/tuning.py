"""Hyper-parameter search for stability training with keras-tuner.

The paper tunes the noise level sigma, the weight alpha of the stability term
and the learning rate on a grid (Table 2: sigma in [0.01, 0.4], alpha in
[0.001, 1], learning rate in [0.001, 0.1]) and keeps the setting that is most
robust to the distortions it evaluates (§4.3). This module does the same with
keras-tuner:

- `StabilityHyperModel` wraps a user's model-building function: each trial
  builds the model, wraps it in a `StabilityModel` with the trial's sigma and
  alpha, and compiles it with the trial's learning rate. It also runs the
  paper's two-phase recipe (train on the task loss first, then fine-tune with
  the stability term, optionally only the last layers) and can tune `epochs`
  and `batch_size`. Every keras-tuner tuner accepts it.
- `ResumableGridSearch` is `keras_tuner.GridSearch` with three fixes: it
  resumes an interrupted search (keras-tuner issue #1055), hands out grid
  points to parallel workers without waiting, and can score trials that break
  a constraint (e.g. clean accuracy must not drop) as the worst.
- `grid_search()` runs the whole search in one call, with a clean or a robust
  objective (`val_jpeg-10_accuracy` from `DistortedValidation`), and returns
  a `GridSearchResult`: the best `StabilityModel`, reloaded from disk, and a
  table of all trials.

Resuming: call `grid_search()` (or build the tuner) again with the same
`directory`, `project_name` and `overwrite=False`. Finished trials are not
run again; a trial that was running when the process died runs again.

Distributed search uses keras-tuner's chief/worker protocol (gRPC; needs
`grpcio`). Run the same script, which calls `grid_search(...,
directory=SHARED_DIR, overwrite=False)`, once as the chief and once per
worker, with a directory that all of them see:

```shell
# The chief serves the grid to the workers and runs no trial.
KERASTUNER_TUNER_ID=chief KERASTUNER_ORACLE_IP=10.0.0.1 \
    KERASTUNER_ORACLE_PORT=8000 python search.py &
# Each worker asks the chief for grid points until none is left.
KERASTUNER_TUNER_ID=worker0 KERASTUNER_ORACLE_IP=10.0.0.1 \
    KERASTUNER_ORACLE_PORT=8000 python search.py &
KERASTUNER_TUNER_ID=worker1 KERASTUNER_ORACLE_IP=10.0.0.1 \
    KERASTUNER_ORACLE_PORT=8000 python search.py &
wait
# Collect: the same call without the variables runs nothing new and returns
# the result (best model and table).
python search.py
```

`grid_search()` returns `None` in the chief and in the workers. The chief
listens on `KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT` and exits when the
grid is done and every worker has been told to stop. Worker ids must be
unique and must not contain "chief". A worker that dies mid-trial leaves its
trial running in the chief; restart the chief (it resumes, see above) to run
that trial again.

On the TensorFlow backend keras-tuner imports `tensorboard` (for the
`TensorBoard` callback's hyper-parameter logs), which TensorFlow 2.16+ does not
install: install the `tuning` extra (`keras-tuner`, `tensorboard`, `grpcio`).
"""

import inspect
import math
import numbers
import os
import time
import warnings

import keras
import keras_tuner
import numpy as np
from keras_tuner.engine.metrics_tracking import infer_metric_direction
from keras_tuner.engine.trial import TrialStatus

from keras_stability import _validation
from keras_stability.evaluation import DistortedValidation
from keras_stability.finetune import freeze_all_but
from keras_stability.models import StabilityModel
from keras_stability.perturbations import GaussianPerturbation

__all__ = [
    "GridSearchResult",
    "ResumableGridSearch",
    "ResumableGridSearchOracle",
    "StabilityHyperModel",
    "grid_search",
]

# Grids spanning the paper's Table 2, on roughly logarithmic steps. Choices,
# not log-sampled `hp.Float`s: GridSearch turns a Float without `step` into 10
# quantile points that need not include the bounds, and BayesianOptimization
# and RandomSearch handle Choices as well.
DEFAULT_SIGMA = (0.01, 0.04, 0.1, 0.2, 0.4)
DEFAULT_ALPHA = (0.001, 0.01, 0.1, 1.0)
DEFAULT_LEARNING_RATE = (0.001, 0.01, 0.1)

_OPERATORS = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
}

# Seconds a tuner waits before asking the oracle again after "no grid point
# free yet": keras-tuner asks again at once, which on a worker spins a gRPC
# loop on a core that trials elsewhere need.
_IDLE_WAIT_SECONDS = 0.2


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def _as_tuple(value):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return (value,)
    return tuple(value)


def _check_grid(name, values, minimum=None, maximum=None, exclusive_minimum=False):
    """Returns the grid `values` as a tuple of floats, or raises ValueError."""
    values = _as_tuple(values)
    if not values:
        raise ValueError(
            f"The grid `{name}` is empty: give at least one value. "
            f"Received: {name}={values!r}"
        )
    checked = tuple(
        _validation.check_number(
            name,
            value,
            minimum=minimum,
            maximum=maximum,
            exclusive_minimum=exclusive_minimum,
        )
        for value in values
    )
    if len(set(checked)) != len(checked):
        raise ValueError(
            f"The grid `{name}` repeats a value. Received: {name}={values!r}"
        )
    return checked


def _check_int_grid(name, values, minimum, allow_none=False):
    """Returns `None` or a tuple of ints `>= minimum`, or raises ValueError."""
    if values is None and allow_none:
        return None
    values = _as_tuple(values)
    if not values:
        raise ValueError(
            f"The grid `{name}` is empty: give at least one value. "
            f"Received: {name}={values!r}"
        )
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(
                f"`{name}` must be an int or a list of ints. Received: "
                f"{name}={values!r}"
            )
        if value < minimum:
            raise ValueError(
                f"`{name}` must be >= {minimum}. Received: {name}={values!r}"
            )
    if len(set(values)) != len(values):
        raise ValueError(
            f"The grid `{name}` repeats a value. Received: {name}={values!r}"
        )
    return tuple(int(value) for value in values)


def _accepts_hp(build_model):
    """Whether `build_model` takes the `HyperParameters` as an argument."""
    try:
        parameters = inspect.signature(build_model).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL)
    positional += (inspect.Parameter.POSITIONAL_OR_KEYWORD,)
    return any(parameter.kind in positional for parameter in parameters)


# ---------------------------------------------------------------------------
# HyperModel
# ---------------------------------------------------------------------------


class _TaskModel(keras.Model):
    """The user's model alone, to train it on the task loss `L0` only.

    A separate wrapper, rather than compiling the user's model, keeps the
    pre-training optimizer out of the `StabilityModel`'s saved weights.
    """

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.inner = model

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)


class StabilityHyperModel(keras_tuner.HyperModel):
    """A keras-tuner `HyperModel` that stability-trains a user's model.

    Each trial calls `build_model`, wraps the model in a `StabilityModel`
    with a `GaussianPerturbation` of standard deviation `sigma` and weight
    `alpha`, and compiles it with `optimizer` at `learning_rate`. The three
    are drawn with `hp.Choice("sigma" | "alpha" | "learning_rate", grid)`
    (`hp.Fixed` for a single value); `build_model(hp)` may add its own
    hyper-parameters. Works with every keras-tuner tuner (`GridSearch`,
    `RandomSearch`, `BayesianOptimization`, `Hyperband`).

    Training follows the paper's recipe (§4.3) when `pretrain_epochs > 0`:
    train on the task loss alone for `pretrain_epochs` epochs, then train
    with the stability term for `epochs` epochs, all layers or only the last
    `finetune_last` layers with weights (`freeze_all_but`). Only the second
    phase reports to the tuner. A tuple for `epochs`, `batch_size`,
    `pretrain_epochs` or `finetune_last` tunes it too (`0` in a
    `finetune_last` grid means all layers).

    Args:
        build_model: a function `build_model(hp)` or `build_model()` returning
            an uncompiled `keras.Model` `f` (its output: class probabilities,
            or logits with `from_logits=True`).
        sigma: noise standard deviation(s) as a fraction of `value_range`, in
            `(0, 1]`. Default: `(0.01, 0.04, 0.1, 0.2, 0.4)`.
        alpha: stability weight(s), `>= 0` (`0` is the baseline without the
            stability term). Default: `(0.001, 0.01, 0.1, 1.0)`.
        learning_rate: learning rate(s), `> 0`. Default:
            `(0.001, 0.01, 0.1)`.
        epochs: epochs of the (second) training phase; `None` takes them from
            the `fit`/`search` arguments.
        batch_size: batch size; `None` takes it from the `fit`/`search`
            arguments.
        pretrain_epochs: epochs on the task loss alone before the stability
            phase; `0` skips that phase.
        finetune_last: number of final layers with weights that the stability
            phase trains; `None` trains all of them.
        optimizer: a Keras optimizer name, class, instance (cloned with the
            trial's learning rate) or a function `learning_rate -> optimizer`.
        loss: the task loss `L0` for `compile()`.
        metrics: metrics for `compile()`.
        value_range: `(low, high)` range of the model's input values.
        stability_loss: the distance `D` of `StabilityModel` (`"kl"`,
            `"cross_entropy"`, `"l2"` or a loss instance).
        from_logits: whether the model outputs logits.
        compile_kwargs: other `compile()` arguments, e.g.
            `{"jit_compile": False}`.
        seed: if set, `keras.utils.set_random_seed(seed)` before each build, so
            that all trials start from the same weights.
        name: name of the HyperModel.

    Example:

    >>> import keras, keras_tuner
    >>> def build_model(hp):
    ...     return keras.Sequential([keras.Input((4,)),
    ...                              keras.layers.Dense(3, activation="softmax")])
    >>> hypermodel = StabilityHyperModel(build_model, sigma=(0.04, 0.1), alpha=0.01,
    ...                                  learning_rate=0.01)
    >>> model = hypermodel.build(keras_tuner.HyperParameters())
    >>> type(model).__name__, model.alpha, model.perturbation.stddev
    ('StabilityModel', 0.01, 0.04)
    """

    def __init__(
        self,
        build_model,
        sigma=None,
        alpha=None,
        learning_rate=None,
        epochs=None,
        batch_size=None,
        pretrain_epochs=0,
        finetune_last=None,
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=("accuracy",),
        value_range=(0.0, 1.0),
        stability_loss="kl",
        from_logits=False,
        compile_kwargs=None,
        seed=None,
        name=None,
    ):
        super().__init__(name=name)
        if not callable(build_model):
            raise TypeError(
                "`build_model` must be a function `build_model(hp)` or "
                f"`build_model()` returning a keras.Model. Received: {build_model!r}"
            )
        self.build_model = build_model
        self.sigma = _check_grid(
            "sigma",
            DEFAULT_SIGMA if sigma is None else sigma,
            minimum=0.0,
            maximum=1.0,
            exclusive_minimum=True,
        )
        self.alpha = _check_grid(
            "alpha", DEFAULT_ALPHA if alpha is None else alpha, minimum=0.0
        )
        self.learning_rate = _check_grid(
            "learning_rate",
            DEFAULT_LEARNING_RATE if learning_rate is None else learning_rate,
            minimum=0.0,
            exclusive_minimum=True,
        )
        self.epochs = _check_int_grid("epochs", epochs, 1, allow_none=True)
        self.batch_size = _check_int_grid("batch_size", batch_size, 1, allow_none=True)
        self.pretrain_epochs = _check_int_grid("pretrain_epochs", pretrain_epochs, 0)
        self.finetune_last = _check_int_grid(
            "finetune_last", finetune_last, 0, allow_none=True
        )
        self.optimizer = optimizer
        self.loss = loss
        self.metrics = list(_as_tuple(metrics)) if metrics is not None else None
        self.value_range = _validation.check_value_range(value_range)
        self.stability_loss = stability_loss
        self.from_logits = from_logits
        self.compile_kwargs = dict(compile_kwargs or {})
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int or None. Received: seed={seed!r}")
        self.seed = seed

    @property
    def grid_size(self):
        """Number of points of the grid this HyperModel declares.

        Counts the hyper-parameters declared here, not those `build_model(hp)`
        adds.
        """
        sizes = [len(self.sigma), len(self.alpha), len(self.learning_rate)]
        for grid in self._fit_grids().values():
            sizes.append(len(grid) if grid is not None else 1)
        return math.prod(sizes)

    def metric_names(self, validation=True):
        """The names the trials log (for objectives and constraints).

        Args:
            validation: whether the trials get validation data, which adds
                the `val_` names.

        Returns:
            A list of log keys, e.g. `['loss', 'task_loss', 'stability_loss',
            'accuracy', 'val_loss', 'val_task_loss', 'val_accuracy']`.
        """
        names = ["loss", "task_loss", "stability_loss"]
        names += _compiled_metric_names(self.metrics)
        if validation:
            # evaluate() computes no stability term, hence no val_stability_loss.
            names += [f"val_{name}" for name in names if name != "stability_loss"]
        return names

    def _fit_grids(self):
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "pretrain_epochs": self.pretrain_epochs,
            "finetune_last": self.finetune_last,
        }

    def _declare(self, hp):
        """Registers (or reads) this HyperModel's hyper-parameters in `hp`.

        Declared in the same order by `build` and `fit`, so the space is
        complete after keras-tuner's first `build` (before any trial).

        Returns:
            A dict of the trial's values; `None` for untuned fit options.
        """
        values = {
            name: _choose(hp, name, getattr(self, name))
            for name in ("sigma", "alpha", "learning_rate")
        }
        for name, grid in self._fit_grids().items():
            if grid is None:
                values[name] = None
            elif len(grid) == 1:
                values[name] = grid[0]  # fixed: not part of the search space
            else:
                values[name] = hp.Choice(name, list(grid))
        return values

    def build(self, hp):
        """Builds and compiles the `StabilityModel` of one trial.

        Args:
            hp: the trial's `keras_tuner.HyperParameters`.

        Returns:
            A compiled `StabilityModel`.
        """
        values = self._declare(hp)
        if self.seed is not None:
            keras.utils.set_random_seed(self.seed)
        if _accepts_hp(self.build_model):
            base = self.build_model(hp)
        else:
            base = self.build_model()
        if isinstance(base, StabilityModel) or not isinstance(base, keras.Model):
            raise TypeError(
                "`build_model` must return a plain keras.Model (the "
                "StabilityHyperModel wraps it in a StabilityModel). Received: "
                f"{base!r}"
            )
        perturbation = GaussianPerturbation(
            stddev=values["sigma"], value_range=self.value_range
        )
        model = StabilityModel(
            base,
            alpha=values["alpha"],
            perturbation=perturbation,
            stability_loss=self.stability_loss,
            from_logits=self.from_logits,
        )
        self._compile(model, values["learning_rate"])
        return model

    def fit(self, hp, model, *args, **kwargs):
        """Trains one trial's model: optional pre-training, then stability.

        Args:
            hp: the trial's `keras_tuner.HyperParameters`.
            model: the `StabilityModel` from `build`.
            *args: `fit()` arguments (data), from `tuner.search()`.
            **kwargs: `fit()` keyword arguments, with keras-tuner's callbacks.

        Returns:
            The `History` of the stability phase.
        """
        values = self._declare(hp)
        for name in ("epochs", "batch_size"):
            if values[name] is not None:
                kwargs[name] = values[name]
        if values["pretrain_epochs"]:
            self._pretrain(model, values, args, kwargs)
        if values["finetune_last"]:
            freeze_all_but(model.model, last=values["finetune_last"])
            # Keras reads `trainable` when compiling: compile again.
            self._compile(model, values["learning_rate"])
        return model.fit(*args, **kwargs)

    def _pretrain(self, model, values, args, kwargs):
        """Phase 1 (§4.3): the task loss alone, no perturbed pass."""
        task_model = _TaskModel(model.model, name="task_model")
        task_model.compile(
            optimizer=self._make_optimizer(values["learning_rate"]),
            loss=self.loss,
            **self.compile_kwargs,
        )
        # keras-tuner's callbacks (checkpoint, objective) and validation
        # belong to the phase that is tuned.
        skip = {"callbacks", "validation_data", "validation_split", "validation_freq"}
        skip |= {"epochs", "initial_epoch"}
        fit_kwargs = {k: v for k, v in kwargs.items() if k not in skip}
        task_model.fit(*args, epochs=values["pretrain_epochs"], **fit_kwargs)

    def _compile(self, model, learning_rate):
        model.compile(
            optimizer=self._make_optimizer(learning_rate),
            loss=self.loss,
            metrics=_fresh_metrics(self.metrics),
            **self.compile_kwargs,
        )

    def _make_optimizer(self, learning_rate):
        """A new optimizer at `learning_rate` (never shared between trials)."""
        optimizer = self.optimizer
        if isinstance(optimizer, str):
            return keras.optimizers.get(
                {"class_name": optimizer, "config": {"learning_rate": learning_rate}}
            )
        if isinstance(optimizer, keras.optimizers.Optimizer):
            config = optimizer.get_config()
            config["learning_rate"] = learning_rate
            return optimizer.__class__.from_config(config)
        if callable(optimizer):
            return optimizer(learning_rate=learning_rate)
        raise TypeError(
            "`optimizer` must be a name, an optimizer class or instance, or a "
            f"function of `learning_rate`. Received: optimizer={optimizer!r}"
        )


def _choose(hp, name, grid):
    if len(grid) == 1:
        return hp.Fixed(name, grid[0])
    return hp.Choice(name, list(grid))


def _fresh_metrics(metrics):
    """Copies metric objects: a Metric holds state and belongs to one model."""
    if metrics is None:
        return None
    return [
        keras.metrics.deserialize(keras.metrics.serialize(metric))
        if isinstance(metric, keras.metrics.Metric)
        else metric
        for metric in metrics
    ]


def _compiled_metric_names(metrics):
    """The log keys Keras gives the metrics passed to `compile()`."""
    names = []
    for metric in keras.tree.flatten(metrics or []):
        if isinstance(metric, str):
            names.append(metric)
        elif isinstance(metric, keras.metrics.Metric):
            names.append(metric.name)
        else:
            names.append(getattr(metric, "__name__", str(metric)))
    return names


# ---------------------------------------------------------------------------
# Oracle and tuner
# ---------------------------------------------------------------------------


class _Constraint:
    """`metric op value`, e.g. `val_accuracy >= 0.95`, checked per trial."""

    def __init__(self, spec):
        try:
            metric, op, value = spec
        except (TypeError, ValueError):
            raise ValueError(
                "`constraint` must be a tuple (metric, operator, value), e.g. "
                f"('val_accuracy', '>=', 0.95). Received: constraint={spec!r}"
            ) from None
        if not isinstance(metric, str) or op not in _OPERATORS:
            raise ValueError(
                "`constraint` must be (metric name, one of "
                f"{sorted(_OPERATORS)}, number). Received: constraint={spec!r}"
            )
        self.metric = metric
        self.op = op
        self.value = _validation.check_number("constraint value", value)

    def satisfied(self, trial):
        if not trial.metrics.exists(self.metric):
            return False
        observed = trial.metrics.get_last_value(self.metric)
        return observed is not None and _OPERATORS[self.op](observed, self.value)

    def __str__(self):
        return f"{self.metric} {self.op} {self.value:g}"


class ResumableGridSearchOracle(keras_tuner.oracles.GridSearchOracle):
    """`keras_tuner.oracles.GridSearchOracle` that resumes and parallelises.

    keras-tuner 1.4.8's grid oracle finds the next grid point from two
    in-memory structures (`_ordered_ids`, a linked list of the trials in grid
    order, and `_populate_next`, a queue of trials whose successor is not
    generated yet) that `oracle.json` does not store. After a restart both are
    empty: the first trial to finish raises `KeyError` in
    `LinkedList.next()` (keras-tuner issue #1055) and, if no trial was
    running, the search stops at once with the grid unfinished. It also
    answers "wait" to every worker but two until a trial ends.

    This oracle derives the next point from what is stored: the trials
    (reloaded from their `trial.json`) and the hashes of the values tried. The
    next point is the first, in grid order, of the default values and the
    successors of every trial that is not tried yet. Grid order and the set
    of points are those of `GridSearchOracle`. Parallel workers get a new
    point whenever one is left; the search space must then be declared before
    the first trial (true when every hyper-parameter is drawn in
    `HyperModel.build()`, which keras-tuner calls before searching).

    With `constraint=(metric, op, value)` a completed trial whose `metric`
    (at the best epoch) fails `op value` gets the worst score (`-inf` when
    maximising, `+inf` when minimising), so it is never the best trial unless
    no trial passes.

    Args:
        objective: a `keras_tuner.Objective` (or a name keras-tuner can infer
            a direction for).
        constraint: `None` or a tuple `(metric, op, value)` with `op` one of
            `">="`, `">"`, `"<="`, `"<"`.
        **kwargs: `keras_tuner.oracles.GridSearchOracle` arguments
            (`max_trials`, `seed`, `hyperparameters`, ...).

    Example:

    >>> import keras_tuner
    >>> oracle = ResumableGridSearchOracle(
    ...     objective=keras_tuner.Objective("val_accuracy", "max"),
    ...     constraint=("val_loss", "<=", 1.0))
    >>> str(oracle.constraint)
    'val_loss <= 1'
    """

    def __init__(self, objective=None, constraint=None, **kwargs):
        super().__init__(objective=objective, **kwargs)
        self.constraint = None if constraint is None else _Constraint(constraint)

    def populate_space(self, trial_id):
        values = self._next_untried_values()
        if values is not None:
            return {"status": TrialStatus.RUNNING, "values": values}
        if self.ongoing_trials:
            # A running trial may fail and come back for a retry.
            return {"status": TrialStatus.IDLE, "values": None}
        return {"status": TrialStatus.STOPPED, "values": None}

    def _next_untried_values(self):
        space = self.get_space()
        defaults = {hp.name: hp.default for hp in space.space}
        # GridSearchOracle's order of values: the default first, then the rest.
        orders = {
            hp.name: [hp.default] + [v for v in hp.values if v != hp.default]
            for hp in space.space
        }

        def grid_position(values):
            return tuple(
                orders[name].index(value) if value in orders[name] else -1
                for name, value in values.items()
            )

        # Every trial's values, completed with defaults for hyper-parameters
        # that joined the space after it ran, in grid order.
        tried = [{**defaults, **t.hyperparameters.values} for t in self.trials.values()]
        tried.sort(key=grid_position)
        first = {hp.name: hp.default for hp in space.space if space.is_active(hp)}
        candidates = [first] + [self._get_next_combination(v) for v in tried]
        for values in candidates:
            if values is not None and not self._duplicate(values):
                return values
        return None

    @keras_tuner.synchronized
    def end_trial(self, trial):
        # Skips GridSearchOracle.end_trial, which only feeds `_populate_next`.
        keras_tuner.Oracle.end_trial(self, trial)

    def reload(self):
        super().reload()
        # A trial whose own file says it finished is done, even when the
        # process died before `oracle.json` (written after it) said so.
        finished = {
            TrialStatus.COMPLETED,
            TrialStatus.FAILED,
        }
        pending = []
        for trial_id in self._retry_queue:
            if self.trials[trial_id].status in finished:
                if trial_id not in self.end_order:
                    self.end_order.append(trial_id)
            else:
                pending.append(trial_id)
        self._retry_queue = pending

    def score_trial(self, trial):
        super().score_trial(trial)
        if self.constraint is not None and not self.constraint.satisfied(trial):
            trial.score = _worst(self.objective.direction)


def _worst(direction):
    return -math.inf if direction == "max" else math.inf


def _distributed_role():
    """`None`, `"chief"` or `"worker"`, from keras-tuner's variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return None
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"


class ResumableGridSearch(keras_tuner.GridSearch):
    """`keras_tuner.GridSearch` that resumes after a crash and runs in parallel.

    Uses `ResumableGridSearchOracle` (see there for the keras-tuner bug it
    works around). Besides: it reloads an existing project whenever
    `oracle.json` exists (keras-tuner only reloads when this tuner id's own
    file exists, so a collecting process after a distributed search would
    start the grid again), it waits briefly between "no grid point free yet"
    answers, and the chief stops serving within a second of the last trial.

    Args:
        hypermodel: a `keras_tuner.HyperModel` (e.g. `StabilityHyperModel`) or a
            function `build(hp)`.
        objective: a `keras_tuner.Objective` or a metric name.
        constraint: see `ResumableGridSearchOracle`.
        max_trials: optional limit on the number of trials.
        seed, hyperparameters, tune_new_entries, allow_new_entries,
            max_retries_per_trial, max_consecutive_failed_trials: as in
            `keras_tuner.GridSearch`.
        **kwargs: `keras_tuner.Tuner` arguments (`directory`, `project_name`,
            `overwrite`, ...).

    Example:

    >>> import keras, keras_tuner, numpy as np, tempfile
    >>> def build_model():
    ...     return keras.Sequential([keras.Input((4,)),
    ...                              keras.layers.Dense(3, activation="softmax")])
    >>> hypermodel = StabilityHyperModel(build_model, sigma=(0.04, 0.1),
    ...                                  alpha=0.01, learning_rate=0.01)
    >>> tuner = ResumableGridSearch(
    ...     hypermodel, objective=keras_tuner.Objective("val_accuracy", "max"),
    ...     directory=tempfile.mkdtemp(), project_name="demo")
    >>> x, y = np.random.rand(32, 4), np.random.randint(0, 3, 32)
    >>> tuner.search(x, y, validation_data=(x, y), epochs=1, verbose=0)
    >>> len(tuner.oracle.trials)
    2
    """

    def __init__(
        self,
        hypermodel=None,
        objective=None,
        max_trials=None,
        seed=None,
        hyperparameters=None,
        tune_new_entries=True,
        allow_new_entries=True,
        max_retries_per_trial=0,
        max_consecutive_failed_trials=3,
        constraint=None,
        **kwargs,
    ):
        self.seed = seed
        self._asked_without_trial = False
        oracle = ResumableGridSearchOracle(
            objective=objective,
            constraint=constraint,
            max_trials=max_trials,
            seed=seed,
            hyperparameters=hyperparameters,
            tune_new_entries=tune_new_entries,
            allow_new_entries=allow_new_entries,
            max_retries_per_trial=max_retries_per_trial,
            max_consecutive_failed_trials=max_consecutive_failed_trials,
        )
        # GridSearch.__init__ would build a plain GridSearchOracle.
        keras_tuner.Tuner.__init__(self, oracle, hypermodel, **kwargs)

    def _populate_initial_space(self):
        oracle_file = os.path.join(self.project_dir, "oracle.json")
        if _distributed_role() != "worker" and os.path.exists(oracle_file):
            print(f"Reloading Oracle from {oracle_file}")
            self.oracle.reload()
            return
        super()._populate_initial_space()

    def load_model(self, trial):
        with warnings.catch_warnings():
            # The checkpoint also holds the optimizer's variables, which the
            # rebuilt model's optimizer has not created yet; the model's own
            # weights load in full.
            warnings.filterwarnings(
                "ignore", message="Skipping variable loading for optimizer"
            )
            return super().load_model(trial)

    def pre_create_trial(self):
        if self._asked_without_trial:
            time.sleep(_IDLE_WAIT_SECONDS)
        self._asked_without_trial = True

    def on_trial_begin(self, trial):
        self._asked_without_trial = False
        super().on_trial_begin(trial)

    def search(self, *fit_args, **fit_kwargs):
        if _distributed_role() != "chief":
            return super().search(*fit_args, **fit_kwargs)
        try:
            from keras_tuner.src.distribute import oracle_chief
        except ImportError:  # pragma: no cover - a keras-tuner that moved it
            return super().search(*fit_args, **fit_kwargs)
        if "verbose" in fit_kwargs:
            self.oracle.verbose = fit_kwargs["verbose"]
        self.save()
        _serve(self.oracle, oracle_chief)


def _serve(oracle, oracle_chief):
    """keras-tuner's chief server, polling every 0.2 s instead of 20 s."""
    import concurrent.futures

    import grpc
    from keras_tuner.src import protos

    address = (
        f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    )
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    server.start()
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(0.2)
    finally:
        server.stop(grace=1.0)


# ---------------------------------------------------------------------------
# One-call grid search and its result
# ---------------------------------------------------------------------------


def _infer_direction(name, known):
    """`"max"` or `"min"` for a metric name, or None when it cannot be told."""
    if name in known:
        return known[name]
    if name.endswith("accuracy") or name.endswith("_acc") or name == "acc":
        return "max"
    if name.endswith("loss") or name.endswith("flip_rate"):
        return "min"
    return infer_metric_direction(name)


def _check_name(kind, name, available):
    if name not in available:
        raise ValueError(
            f"The {kind} {name!r} is not logged by any trial: no metric or "
            f"callback produces it. Available: {sorted(set(available))}. Pass "
            "`distortions=[...]` for DistortedValidation names such as "
            "'val_jpeg-10_accuracy', and validation data for 'val_' names."
        )


def _resolve_objective(objective, direction, available, known_directions):
    if isinstance(objective, keras_tuner.Objective):
        objective, direction = objective.name, direction or objective.direction
    if not isinstance(objective, str):
        raise ValueError(
            "`objective` must be a metric name or a keras_tuner.Objective. "
            f"Received: objective={objective!r}"
        )
    _check_name("objective", objective, available)
    if direction is None:
        direction = _infer_direction(objective, known_directions)
    if direction not in ("min", "max"):
        raise ValueError(
            f"Cannot tell whether to maximise or minimise {objective!r}: pass "
            f"direction='max' or 'min'. Received: direction={direction!r}"
        )
    return keras_tuner.Objective(objective, direction)


def _distortion_callbacks(callbacks):
    return [c for c in callbacks if isinstance(c, DistortedValidation)]


class GridSearchResult:
    """The outcome of `grid_search()`: best model and a table of all trials.

    Attributes:
        best_model: the best trial's `StabilityModel`, reloaded from its
            checkpoint (weights of its best epoch); `None` when no trial
            completed or none meets the constraint.
        best_hyperparameters: dict of the best trial's values, or `None`.
        best_trial_id: the best trial's id, or `None`.
        objective: the `keras_tuner.Objective` optimised.
        constraint: the constraint as text, or `None`.
        rows: one dict per trial, best first: `trial_id`, `sigma`, `alpha`,
            `learning_rate` (and any other hyper-parameter), `objective` (the
            objective's value at the trial's best epoch), `feasible` (with a
            constraint), `status`, then every other logged metric.
        tuner: the `ResumableGridSearch` that ran the search.

    Example:

    >>> import keras_tuner
    >>> result = GridSearchResult(
    ...     rows=[{"trial_id": "0", "sigma": 0.04, "alpha": 0.01,
    ...            "learning_rate": 0.01, "objective": 0.9,
    ...            "status": "COMPLETED"}],
    ...     objective=keras_tuner.Objective("val_accuracy", "max"))
    >>> print(result.to_markdown())
    Objective: val_accuracy (max)
    <BLANKLINE>
    | trial_id | sigma | alpha | learning_rate | objective | status |
    |---|---|---|---|---|---|
    | 0 | 0.04 | 0.01 | 0.01 | 0.9 | COMPLETED |
    """

    def __init__(
        self,
        rows,
        objective,
        best_model=None,
        best_trial_id=None,
        best_hyperparameters=None,
        constraint=None,
        tuner=None,
    ):
        self.rows = rows
        self.objective = objective
        self.best_model = best_model
        self.best_trial_id = best_trial_id
        self.best_hyperparameters = best_hyperparameters
        self.constraint = constraint
        self.tuner = tuner

    @property
    def columns(self):
        """The column names of `rows`, in display order."""
        columns = []
        for row in self.rows:
            columns += [key for key in row if key not in columns]
        return columns

    def _title(self):
        title = f"Objective: {self.objective.name} ({self.objective.direction})"
        if self.constraint:
            title += f", constraint: {self.constraint}"
        return title

    def _cells(self):
        return [[_format_cell(row.get(c)) for c in self.columns] for row in self.rows]

    def to_text(self):
        """The table as aligned plain text, best trial first."""
        header, cells = self.columns, self._cells()
        widths = [
            max([len(name)] + [len(row[i]) for row in cells])
            for i, name in enumerate(header)
        ]
        lines = [self._title(), ""]
        lines.append("  ".join(n.ljust(w) for n, w in zip(header, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join(line.rstrip() for line in lines)

    def to_markdown(self):
        """The table as GitHub-flavoured Markdown, best trial first."""
        header = self.columns
        lines = [self._title(), ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in self._cells()]
        return "\n".join(lines)

    def __str__(self):
        return self.to_text()

    def __repr__(self):
        return (
            f"<GridSearchResult {len(self.rows)} trials, objective="
            f"{self.objective.name!r}, best_trial_id={self.best_trial_id!r}>"
        )


def _format_cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _trial_row(trial, objective, constraint, hp_names):
    values = trial.hyperparameters.values
    row = {"trial_id": trial.trial_id}
    row.update({name: values.get(name) for name in hp_names})
    metrics = trial.metrics
    row["objective"] = (
        float(metrics.get_last_value(objective.name))
        if metrics.exists(objective.name)
        else None
    )
    if constraint is not None:
        row["feasible"] = constraint.satisfied(trial)
    row["status"] = trial.status
    names = sorted(n for n in metrics.metrics if n != objective.name)
    # Validation metrics first: they are the ones a search is read by.
    names.sort(key=lambda n: not n.startswith("val_"))
    for name in names:
        value = metrics.get_last_value(name)
        row[name] = None if value is None else float(value)
    return row


def _rank_key(row, direction):
    completed = row["status"] == TrialStatus.COMPLETED
    value = row["objective"]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        value = _worst(direction)
    sign = -1.0 if direction == "max" else 1.0
    return (not completed, not row.get("feasible", True), sign * value)


def _collect_result(tuner):
    """Builds the `GridSearchResult` from a tuner whose search returned."""
    oracle = tuner.oracle
    objective, constraint = oracle.objective, oracle.constraint
    hp_names = [hp.name for hp in oracle.get_space().space]
    trials = sorted(oracle.trials.values(), key=lambda t: t.trial_id)
    rows = [_trial_row(t, objective, constraint, hp_names) for t in trials]
    rows.sort(key=lambda row: _rank_key(row, objective.direction))
    result = GridSearchResult(
        rows,
        objective,
        constraint=None if constraint is None else str(constraint),
        tuner=tuner,
    )
    best = oracle.get_best_trials(1)
    best = best[0] if best else None
    completed = TrialStatus.COMPLETED
    if best is None or best.status != completed:
        warnings.warn("No trial of the grid search completed.", stacklevel=3)
        return result
    if constraint is not None and not constraint.satisfied(best):
        warnings.warn(
            f"No trial meets the constraint {constraint}: no best model.",
            stacklevel=3,
        )
        return result
    result.best_model = tuner.get_best_models(1)[0]
    result.best_trial_id = best.trial_id
    result.best_hyperparameters = dict(best.hyperparameters.values)
    return result


def grid_search(
    build_model,
    x,
    y=None,
    validation_data=None,
    *,
    objective="val_accuracy",
    direction=None,
    distortions=None,
    constraint=None,
    directory=None,
    project_name="stability_grid_search",
    overwrite=False,
    sigma=None,
    alpha=None,
    learning_rate=None,
    epochs=1,
    batch_size=None,
    pretrain_epochs=0,
    finetune_last=None,
    optimizer="adam",
    loss="sparse_categorical_crossentropy",
    metrics=("accuracy",),
    value_range=None,
    stability_loss="kl",
    from_logits=False,
    compile_kwargs=None,
    seed=None,
    max_trials=None,
    verbose=1,
    **fit_kwargs,
):
    """Grid-searches sigma, alpha and the learning rate (paper Table 2).

    Builds a `StabilityHyperModel` and runs a `ResumableGridSearch` over it.
    With `distortions`, a `DistortedValidation` callback logs
    `val_<distortion>_accuracy` and `val_<distortion>_flip_rate` on the
    validation data every epoch, and the objective may be one of them: the
    most robust setting rather than the most accurate. Every argument is
    checked before the first trial.

    Args:
        build_model: `build_model(hp)` or `build_model()` returning an
            uncompiled `keras.Model`, or a `StabilityHyperModel` (then the
            grid and model options below must be left at their defaults).
        x: training inputs (anything `Model.fit` takes).
        y: training targets.
        validation_data: `(x_val, y_val)`; needed for `val_` objectives and
            for `distortions`.
        objective: a logged metric name, e.g. `"val_accuracy"`,
            `"val_jpeg-10_accuracy"`, `"val_jpeg-10_flip_rate"`, or a
            `keras_tuner.Objective`.
        direction: `"max"` or `"min"`; default inferred from the name
            (`*accuracy` -> max, `*loss` and `*flip_rate` -> min).
        distortions: distortion names for `DistortedValidation`, e.g.
            `["jpeg-10", "thumb-200"]`.
        constraint: `None` or `(metric, op, value)`, e.g.
            `("val_accuracy", ">=", baseline - 0.01)`: trials that fail it
            rank last and are never the best.
        directory: directory of the search (trials, checkpoints).
        project_name: sub-directory name of this search.
        overwrite: start afresh; `False` resumes an existing search.
        sigma: grid of noise levels in `(0, 1]` (a number fixes it).
        alpha: grid of stability weights `>= 0`.
        learning_rate: grid of learning rates `> 0`.
        epochs: epochs per trial (a tuple tunes it).
        batch_size: batch size (a tuple tunes it; `None`: Keras' default).
        pretrain_epochs: epochs on the task loss before stability training.
        finetune_last: train only this many final layers with the stability
            term (`None`: all).
        optimizer: optimizer name, class, instance or function of
            `learning_rate`.
        loss: the task loss.
        metrics: metrics to compile.
        value_range: range of the input values; default `(0, 255)` for integer
            `x` and `(0, 1)` otherwise.
        stability_loss: the distance of `StabilityModel`.
        from_logits: whether the model outputs logits.
        compile_kwargs: other `compile()` arguments, e.g.
            `{"jit_compile": False}`.
        seed: seed set before each build (same initial weights per trial).
        max_trials: optional cap on the number of trials.
        verbose: verbosity of the search and of `fit`.
        **fit_kwargs: other `fit()` arguments (`callbacks`, `shuffle`, ...).

    Returns:
        A `GridSearchResult`, or `None` in the chief and workers of a
        distributed search (see the module docstring).

    Example:

    >>> import keras, numpy as np, tempfile
    >>> def build_model():
    ...     return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
    ...                              keras.layers.Dense(3, activation="softmax")])
    >>> x = np.random.rand(64, 8, 8, 1).astype("float32")
    >>> y = np.random.randint(0, 3, 64)
    >>> result = grid_search(build_model, x, y, validation_data=(x, y),
    ...                      objective="val_jpeg-10_accuracy",
    ...                      distortions=["jpeg-10"], sigma=(0.04, 0.1),
    ...                      alpha=0.01, learning_rate=0.01,
    ...                      directory=tempfile.mkdtemp(), verbose=0)
    >>> len(result.rows), type(result.best_model).__name__
    (2, 'StabilityModel')
    """
    hypermodel = _hypermodel_for(
        build_model,
        dict(
            sigma=sigma,
            alpha=alpha,
            learning_rate=learning_rate,
            epochs=epochs,
            batch_size=batch_size,
            pretrain_epochs=pretrain_epochs,
            finetune_last=finetune_last,
            optimizer=optimizer,
            loss=loss,
            metrics=metrics,
            value_range=_default_value_range(x) if value_range is None else value_range,
            stability_loss=stability_loss,
            from_logits=from_logits,
            compile_kwargs=compile_kwargs,
            seed=seed,
        ),
    )
    role = _distributed_role()
    if overwrite and role == "worker":
        raise ValueError(
            "`overwrite=True` in a worker of a distributed search would delete "
            "the shared directory under the chief: pass overwrite=False."
        )
    has_validation = validation_data is not None or bool(
        fit_kwargs.get("validation_split")
    )
    callbacks = list(fit_kwargs.pop("callbacks", None) or [])
    distortion_directions = _check_distortions(distortions, validation_data, callbacks)
    available = hypermodel.metric_names(validation=has_validation)
    available += list(distortion_directions)
    tuner_objective = _resolve_objective(
        objective, direction, available, distortion_directions
    )
    if constraint is not None:
        _check_name("constraint metric", _Constraint(constraint).metric, available)
    if distortions is not None and role != "chief":
        x_val, y_val = validation_data[0], validation_data[1]
        # First in the list: Keras calls callbacks in order, and the tuner's
        # checkpoint callback (appended after ours) must see these logs.
        callbacks.insert(
            0,
            DistortedValidation(
                x_val, y_val, distortions, value_range=hypermodel.value_range
            ),
        )
    tuner = ResumableGridSearch(
        hypermodel,
        objective=tuner_objective,
        constraint=constraint,
        max_trials=max_trials,
        directory=directory,
        project_name=project_name,
        overwrite=overwrite,
    )
    tuner.search(
        x,
        y,
        validation_data=validation_data,
        callbacks=callbacks,
        verbose=verbose,
        **fit_kwargs,
    )
    if role is not None:
        return None
    return _collect_result(tuner)


def _default_value_range(x):
    dtype = getattr(x, "dtype", None)
    if dtype is not None and np.issubdtype(np.dtype(str(dtype)), np.integer):
        return (0.0, 255.0)
    return (0.0, 1.0)


def _hypermodel_for(build_model, options):
    """The `StabilityHyperModel` of `grid_search` (checks the grids)."""
    if not isinstance(build_model, StabilityHyperModel):
        return StabilityHyperModel(build_model, **options)
    defaults = inspect.signature(grid_search).parameters
    changed = [
        name
        for name, value in options.items()
        if name != "value_range" and value != defaults[name].default
    ]
    if changed:
        raise ValueError(
            "`build_model` is a StabilityHyperModel, which holds the grid and "
            f"model options: set {changed} on it, not in grid_search()."
        )
    return build_model


def _check_distortions(distortions, validation_data, callbacks):
    """Log keys and directions of every DistortedValidation of the search."""
    directions = {}
    for callback in _distortion_callbacks(callbacks):
        directions.update(callback.metric_directions)
    if distortions is None:
        return directions
    if validation_data is None or len(validation_data) < 2:
        raise ValueError(
            "`distortions` needs `validation_data=(x_val, y_val)` to distort. "
            f"Received: validation_data={validation_data!r}"
        )
    directions.update(DistortedValidation.metric_directions_for(distortions))
    return directions
