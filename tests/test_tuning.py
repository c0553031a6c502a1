import collections
import contextlib
import glob
import os
import signal
import socket
import subprocess
import sys
import time

import _tuning_search as search
import keras
import keras_tuner
import numpy as np
import pytest
from keras_tuner.engine.trial import Trial, TrialStatus

from keras_stability import StabilityModel, tuning

HELPER = os.path.join(os.path.dirname(__file__), "_tuning_search.py")
# Generous: three interpreters importing Keras on 2 busy cores take a while.
PROCESS_TIMEOUT = 240


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _disk_trials(project_dir):
    files = glob.glob(os.path.join(project_dir, "trial_*", "trial.json"))
    return [Trial.load(name) for name in sorted(files)]


def _point(values):
    return (values["sigma"], values["learning_rate"])


def _completed_points(project_dir):
    return [
        _point(t.hyperparameters.values)
        for t in _disk_trials(project_dir)
        if t.status == TrialStatus.COMPLETED
    ]


def _subprocess_env(**extra):
    env = dict(os.environ)
    env.update(KERAS_BACKEND=keras.backend.backend(), TF_CPP_MIN_LOG_LEVEL="2")
    for name in (
        "KERASTUNER_TUNER_ID",
        "KERASTUNER_ORACLE_IP",
        "KERASTUNER_ORACLE_PORT",
    ):
        env.pop(name, None)
    env.update(extra)
    return env


@contextlib.contextmanager
def _processes():
    """Yields a list to put Popen objects in; kills the live ones at exit."""
    processes = []
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for process in processes:
            process.wait(timeout=30)


def _spawn(processes, tmp_path, name, args, env):
    output = open(tmp_path / f"{name}.out", "w")
    process = subprocess.Popen(
        [sys.executable, HELPER, *args],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    output.close()
    process.output_path = tmp_path / f"{name}.out"
    processes.append(process)
    return process


def _tail(process):
    return process.output_path.read_text()[-3000:]


def _wait_until(condition, processes, what):
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not condition():
        for process in processes:
            code = process.poll()
            assert code is None or code == 0, f"{what}: exit {code}\n{_tail(process)}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Recorder(keras.callbacks.Callback):
    """Keeps each trial's logged objective and its final predictions."""

    # Class-level: keras-tuner deep-copies the callbacks of every trial.
    objective = {}
    predictions = {}

    def __init__(self, x):
        super().__init__()
        self.x = x

    def on_epoch_end(self, epoch, logs=None):
        _Recorder.objective[search.grid_point(self.model)] = logs[search.OBJECTIVE]

    def on_train_end(self, logs=None):
        predictions = self.model.predict(self.x, verbose=0)
        _Recorder.predictions[search.grid_point(self.model)] = predictions


# ---------------------------------------------------------------------------
# End-to-end search
# ---------------------------------------------------------------------------


def test_grid_search_visits_the_grid_and_optimises_the_robust_objective(tmp_path):
    _, (x_val, _) = search.make_data()
    result = search.run_search(
        str(tmp_path), "p", str(tmp_path / "log"), callbacks=[_Recorder(x_val)]
    )
    points = [_point(row) for row in result.rows]
    assert sorted(points) == sorted(search.GRID)  # each grid point exactly once
    assert all(row["status"] == TrialStatus.COMPLETED for row in result.rows)

    # The tuner optimises DistortedValidation's metric, maximising it ...
    objective = result.tuner.oracle.objective
    assert (objective.name, objective.direction) == (search.OBJECTIVE, "max")
    # ... with the values the callback logged, and picks the best of them.
    for row in result.rows:
        assert row["objective"] == pytest.approx(_Recorder.objective[_point(row)])
    best = _point(result.best_hyperparameters)
    assert _Recorder.objective[best] == max(_Recorder.objective.values())
    assert result.rows[0]["trial_id"] == result.best_trial_id
    assert result.best_hyperparameters["alpha"] == search.ALPHA

    # The best model, reloaded from its checkpoint, is the trial's model.
    assert isinstance(result.best_model, StabilityModel)
    assert result.best_model.perturbation.stddev == best[0]
    np.testing.assert_allclose(
        result.best_model.predict(x_val, verbose=0),
        _Recorder.predictions[best],
        rtol=0,
        atol=1e-6,
    )

    text, markdown = result.to_text(), result.to_markdown()
    assert f"Objective: {search.OBJECTIVE} (max)" in text
    assert len(markdown.splitlines()) == 2 + 2 + len(search.GRID)
    assert "val_jpeg-10_flip_rate" in result.rows[0]


# ---------------------------------------------------------------------------
# Fail fast
# ---------------------------------------------------------------------------


BAD_INPUTS = {
    "empty sigma grid": (dict(sigma=()), "empty"),
    "empty learning-rate grid": (dict(learning_rate=[]), "empty"),
    "sigma zero": (dict(sigma=(0.0, 0.1)), "sigma"),
    "sigma above 1": (dict(sigma=1.5), "sigma"),
    "negative alpha": (dict(alpha=(-0.1, 0.1)), "alpha"),
    "zero learning rate": (dict(learning_rate=0.0), "learning_rate"),
    "repeated value": (dict(alpha=(0.1, 0.1)), "repeats"),
    "objective of another distortion": (
        dict(objective="val_jpeg-50_accuracy", distortions=["jpeg-10"]),
        "not logged",
    ),
    "robust objective without distortions": (
        dict(objective="val_jpeg-10_accuracy"),
        "not logged",
    ),
    "unknown objective": (dict(objective="val_precision"), "not logged"),
    "val objective without validation data": (
        dict(validation_data=None),
        "not logged",
    ),
    "distortions without validation data": (
        dict(validation_data=None, distortions=["jpeg-10"], objective="loss"),
        "validation_data",
    ),
    "unknown distortion": (dict(distortions=["jpeg-x"]), "jpeg-x"),
    "constraint on a missing metric": (
        dict(constraint=("val_top5", ">=", 0.5)),
        "not logged",
    ),
    "constraint with a bad operator": (
        dict(constraint=("val_accuracy", "=>", 0.5)),
        "operator|one of",
    ),
    "undecidable direction": (
        dict(objective="val_task_loss", direction="up"),
        "direction",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_before_any_trial(tmp_path, case):
    overrides, match = BAD_INPUTS[case]
    builds = []

    def build_model():
        builds.append(1)
        return search.build_model()

    (x, y), validation = search.make_data(n=30)
    kwargs = dict(validation_data=validation, sigma=0.1, alpha=0.1, learning_rate=0.01)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=match):
        tuning.grid_search(
            build_model, x, y, directory=str(tmp_path), project_name="p", **kwargs
        )
    assert builds == []  # not even keras-tuner's first build
    assert not (tmp_path / "p").exists()


def test_stability_hypermodel_and_grid_search_options_do_not_mix(tmp_path):
    hypermodel = tuning.StabilityHyperModel(search.build_model, sigma=0.1)
    (x, y), validation = search.make_data(n=30)
    with pytest.raises(ValueError, match="sigma"):
        tuning.grid_search(hypermodel, x, y, validation, sigma=0.2)


# ---------------------------------------------------------------------------
# Resume (keras-tuner issue #1055)
# ---------------------------------------------------------------------------


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so keras-tuner does not catch it."""


class _ToyGridSearch(tuning.ResumableGridSearch):
    """A Keras-free grid search over x * y, to test the oracle alone."""

    def __init__(self, directory, die_in_trial=None, die_after=None, **kwargs):
        super().__init__(
            hypermodel=None,
            objective=keras_tuner.Objective("score", "max"),
            directory=directory,
            project_name="toy",
            **kwargs,
        )
        self.die_in_trial, self.die_after, self.ran = die_in_trial, die_after, []

    def pre_create_trial(self):
        if self.die_after is not None and len(self.oracle.trials) == self.die_after:
            raise _Killed  # between two trials: none is running
        super().pre_create_trial()

    def run_trial(self, trial, *args, **kwargs):
        hp = trial.hyperparameters
        point = (hp.Choice("x", [1, 2, 3]), hp.Choice("y", [10, 20]))
        if len(self.ran) == self.die_in_trial:
            raise _Killed
        self.ran.append(point)
        return {"score": float(point[0] * point[1]), "other": float(point[1])}


@pytest.mark.parametrize("where", ["mid-trial", "between trials"])
def test_interrupted_grid_resumes_without_repeating_trials(tmp_path, where):
    die = dict(die_in_trial=2) if where == "mid-trial" else dict(die_after=2)
    first = _ToyGridSearch(str(tmp_path), **die)
    with pytest.raises(_Killed):
        first.search(verbose=0)
    assert len(first.ran) == 2
    # keras_tuner.GridSearch raises KeyError here (mid-trial) or stops with
    # the grid unfinished (between trials).
    second = _ToyGridSearch(str(tmp_path))
    second.search(verbose=0)
    assert not set(first.ran) & set(second.ran)
    assert sorted(first.ran + second.ran) == [
        (x, y) for x in (1, 2, 3) for y in (10, 20)
    ]
    trials = second.oracle.trials.values()
    assert len(trials) == 6
    assert all(t.status == TrialStatus.COMPLETED for t in trials)
    # A third run finds nothing left to do.
    third = _ToyGridSearch(str(tmp_path))
    third.search(verbose=0)
    assert third.ran == []


def test_resume_after_sigkill_mid_trial(tmp_path):
    project_dir = os.path.join(tmp_path, "p")
    log = str(tmp_path / "log")
    hanging = tmp_path / "hanging"
    with _processes() as processes:
        process = _spawn(
            processes,
            tmp_path,
            "search",
            [str(tmp_path), "p", log, "--hang-at", "2"],
            _subprocess_env(),
        )
        _wait_until(hanging.exists, processes, "the second trial to start")
        # Killed mid-trial, after one trial finished.
        assert len(_completed_points(project_dir)) == 1
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    done_before = _completed_points(project_dir)
    killed_pid = process.pid

    result = search.run_search(str(tmp_path), "p", log)  # overwrite=False

    completed = _completed_points(project_dir)
    assert sorted(completed) == sorted(search.GRID)  # every point exactly once
    assert len(_disk_trials(project_dir)) == len(search.GRID)
    assert len(result.rows) == len(search.GRID)
    entries = search.read_log(log)
    resumed = [p for pid, event, p in entries if pid != killed_pid and event == "begin"]
    assert not set(done_before) & set(resumed)  # finished trials not redone
    assert len(resumed) == len(search.GRID) - 1  # the killed trial ran again
    assert isinstance(result.best_model, StabilityModel)


# ---------------------------------------------------------------------------
# Distributed search
# ---------------------------------------------------------------------------


def test_distributed_chief_and_two_workers(tmp_path):
    project_dir = os.path.join(tmp_path, "p")
    log = str(tmp_path / "log")
    port = str(_free_port())
    args = [str(tmp_path), "p", log]
    with _processes() as processes:
        for tuner_id in ("chief", "worker0", "worker1"):
            env = _subprocess_env(
                KERASTUNER_TUNER_ID=tuner_id,
                KERASTUNER_ORACLE_IP="127.0.0.1",
                KERASTUNER_ORACLE_PORT=port,
            )
            _spawn(processes, tmp_path, tuner_id, args, env)
        _wait_until(
            lambda: all(p.poll() is not None for p in processes),
            processes,
            "the chief and the workers to finish",
        )
        for process in processes:
            assert process.returncode == 0, _tail(process)

    assert sorted(_completed_points(project_dir)) == sorted(search.GRID)
    assert len(_disk_trials(project_dir)) == len(search.GRID)
    begun = [p for _, event, p in search.read_log(log) if event == "begin"]
    assert collections.Counter(begun) == collections.Counter(search.GRID)

    # The recipe's last step: the same call, not distributed, collects.
    result = search.run_search(str(tmp_path), "p", log)
    assert len(search.read_log(log)) == 2 * len(search.GRID)  # nothing re-ran
    assert sorted(_point(row) for row in result.rows) == sorted(search.GRID)
    assert isinstance(result.best_model, StabilityModel)


# ---------------------------------------------------------------------------
# Constraint, table, HyperModel
# ---------------------------------------------------------------------------


def test_constraint_scores_violating_trials_worst(tmp_path):
    tuner = _ToyGridSearch(str(tmp_path), constraint=("other", "<=", 10.0))
    tuner.search(verbose=0)
    best = tuner.oracle.get_best_trials(1)[0]
    # The best score overall is x=3, y=20 (60), but only y=10 meets it.
    assert best.hyperparameters.values == {"x": 3, "y": 10}
    scores = sorted(t.score for t in tuner.oracle.trials.values())
    assert scores[:3] == [-np.inf] * 3


def test_result_table_renders_every_column():
    result = tuning.GridSearchResult(
        rows=[
            {
                "trial_id": "1",
                "sigma": 0.1,
                "alpha": 0.01,
                "learning_rate": 0.1,
                "objective": 0.75,
                "feasible": True,
                "status": "COMPLETED",
                "val_accuracy": 0.912345,
            },
            {
                "trial_id": "0",
                "sigma": 0.04,
                "alpha": 0.01,
                "learning_rate": 0.1,
                "objective": None,
                "feasible": False,
                "status": "FAILED",
            },
        ],
        objective=keras_tuner.Objective("val_jpeg-10_accuracy", "max"),
        constraint="val_accuracy >= 0.9",
    )
    lines = result.to_text().splitlines()
    assert lines[0] == (
        "Objective: val_jpeg-10_accuracy (max), constraint: val_accuracy >= 0.9"
    )
    assert lines[2].split() == [
        "trial_id",
        "sigma",
        "alpha",
        "learning_rate",
        "objective",
        "feasible",
        "status",
        "val_accuracy",
    ]
    assert lines[3].split() == [
        "1",
        "0.1",
        "0.01",
        "0.1",
        "0.75",
        "True",
        "COMPLETED",
        "0.9123",
    ]
    assert lines[4].split()[-4:] == ["-", "False", "FAILED", "-"]
    assert result.to_markdown().splitlines()[3] == "|---|---|---|---|---|---|---|---|"


def test_default_grids_span_table_2_as_choices():
    hypermodel = tuning.StabilityHyperModel(search.build_model)
    assert (min(hypermodel.sigma), max(hypermodel.sigma)) == (0.01, 0.4)
    assert (min(hypermodel.alpha), max(hypermodel.alpha)) == (0.001, 1.0)
    assert (min(hypermodel.learning_rate), max(hypermodel.learning_rate)) == (
        0.001,
        0.1,
    )
    assert hypermodel.grid_size == 5 * 4 * 3
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)
    kinds = {p.name: type(p).__name__ for p in hp.space}
    assert kinds == {"sigma": "Choice", "alpha": "Choice", "learning_rate": "Choice"}
    # The first grid point is each grid's first value.
    assert model.perturbation.stddev == 0.01
    assert model.alpha == pytest.approx(0.001)
    # A single value is fixed, not searched.
    hp = keras_tuner.HyperParameters()
    tuning.StabilityHyperModel(search.build_model, sigma=0.2).build(hp)
    assert [type(p).__name__ for p in hp.space] == ["Fixed", "Choice", "Choice"]


@pytest.mark.parametrize(
    "name, direction",
    [
        ("val_accuracy", "max"),
        ("val_jpeg-10_accuracy", "max"),
        ("val_jpeg-10_flip_rate", "min"),
        ("val_loss", "min"),
        ("val_task_loss", "min"),
        ("stability_loss", "min"),
    ],
)
def test_direction_is_inferred_from_the_name(name, direction):
    assert tuning._infer_direction(name, {}) == direction


def test_two_phase_recipe_pretrains_then_fine_tunes_the_last_layer():
    def build_model():
        return keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Flatten(),
                keras.layers.Dense(6, activation="relu", name="body"),
                keras.layers.Dense(3, activation="softmax", name="head"),
            ]
        )

    hypermodel = tuning.StabilityHyperModel(
        build_model,
        sigma=0.1,
        alpha=0.1,
        learning_rate=0.05,
        pretrain_epochs=2,
        finetune_last=1,
    )
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)
    initial = {layer.name: layer.get_weights() for layer in model.model.layers}

    class AtPhaseTwo(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.weights = {
                layer.name: layer.get_weights() for layer in self.model.model.layers
            }

    at_phase_two = AtPhaseTwo()
    (x, y), _ = search.make_data(n=60)
    history = hypermodel.fit(
        hp, model, x, y, epochs=1, batch_size=20, verbose=0, callbacks=[at_phase_two]
    )
    # Only the stability phase reports (one epoch, with the stability term).
    assert len(history.history["stability_loss"]) == 1
    body_before = initial["body"][0]
    body_at_two = at_phase_two.weights["body"][0]
    assert not np.allclose(body_before, body_at_two)  # pre-training trained it
    np.testing.assert_array_equal(
        body_at_two, model.model.get_layer("body").get_weights()[0]
    )  # then frozen
    assert not np.allclose(
        at_phase_two.weights["head"][0], model.model.get_layer("head").get_weights()[0]
    )


class _Steps(keras.callbacks.Callback):
    seen = []

    def on_train_begin(self, logs=None):
        _Steps.seen.append(self.params["steps"])


@pytest.mark.parametrize("tuner_class", ["RandomSearch", "BayesianOptimization"])
def test_other_keras_tuner_tuners_take_the_hypermodel(tmp_path, tuner_class):
    hypermodel = tuning.StabilityHyperModel(
        search.build_model, sigma=(0.04, 0.1), alpha=(0.01, 0.1), batch_size=(20, 40)
    )
    tuner = getattr(keras_tuner, tuner_class)(
        hypermodel,
        objective="val_accuracy",
        max_trials=1,
        directory=str(tmp_path),
        seed=0,
    )
    (x, y), validation = search.make_data(n=120)  # 80 training samples
    callbacks = [_Steps()]
    if keras.backend.backend() == "tensorflow":
        # keras-tuner imports tensorboard for this callback (TF backend only).
        callbacks.append(keras.callbacks.TensorBoard(str(tmp_path / "logs")))
    _Steps.seen = []
    tuner.search(
        x, y, validation_data=validation, epochs=1, callbacks=callbacks, verbose=0
    )
    values = tuner.get_best_hyperparameters()[0].values
    assert set(values) == {"sigma", "alpha", "learning_rate", "batch_size"}
    assert _Steps.seen == [80 // values["batch_size"]]  # the tuned batch size
    assert isinstance(tuner.get_best_models()[0], StabilityModel)
