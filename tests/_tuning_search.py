"""A tiny grid search, run in-process by test_tuning.py or as a subprocess.

As a script it is a search that the tests kill (resume test) or run as the
chief or a worker of a distributed search (keras-tuner reads its
`KERASTUNER_*` variables from the environment):

    python _tuning_search.py DIRECTORY PROJECT LOG [--hang-at N]

`LOG` gets one line per training run and event (`begin`/`end`), with the
process id and the trial's sigma and learning rate, so the tests can tell
which grid point trained in which process. With `--hang-at N` the N-th
training run of the process writes `DIRECTORY/hanging` and sleeps, so that
the test can kill the process in the middle of a trial.
"""

import argparse
import os
import sys
import time

import keras
import numpy as np
from keras import ops

# sigma x learning_rate: 4 grid points; alpha fixed.
SIGMA = (0.04, 0.2)
ALPHA = 0.1
LEARNING_RATE = (0.003, 0.1)
GRID = {(s, lr) for s in SIGMA for lr in LEARNING_RATE}
OBJECTIVE = "val_jpeg-10_accuracy"


def make_data(n=240, seed=0):
    """Three classes of 8x8 images: a bright band per class, under noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.random((n, 8, 8, 1)).astype("float32") * 0.7
    for c in range(3):
        x[y == c, 2 * c : 2 * c + 3, :, 0] += 0.3
    x = np.clip(x, 0.0, 1.0)
    split = 2 * n // 3
    return (x[:split], y[:split]), (x[split:], y[split:])


def build_model():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def grid_point(model):
    """(sigma, learning_rate) of a trial's StabilityModel."""
    learning_rate = float(ops.convert_to_numpy(model.optimizer.learning_rate))
    return (
        round(float(model.perturbation.stddev), 6),
        round(learning_rate, 6),
    )


class RunLog(keras.callbacks.Callback):
    """Appends `pid event sigma learning_rate` lines to a file; may hang."""

    # Class-level: keras-tuner deep-copies callbacks for every trial.
    runs_in_process = 0

    def __init__(self, path, hang_at=None, hang_marker=None):
        super().__init__()
        self.path = path
        self.hang_at = hang_at
        self.hang_marker = hang_marker

    def _write(self, event):
        sigma, learning_rate = grid_point(self.model)
        with open(self.path, "a") as log:
            log.write(f"{os.getpid()} {event} {sigma} {learning_rate}\n")

    def on_train_begin(self, logs=None):
        self._write("begin")
        RunLog.runs_in_process += 1
        if self.hang_at is not None and RunLog.runs_in_process == self.hang_at:
            with open(self.hang_marker, "w") as marker:
                marker.write(str(os.getpid()))
            time.sleep(600)  # killed by the test long before

    def on_train_end(self, logs=None):
        self._write("end")


def read_log(path):
    """List of `(pid, event, (sigma, learning_rate))` from a RunLog file."""
    if not os.path.exists(path):
        return []
    entries = []
    with open(path) as log:
        for line in log:
            pid, event, sigma, learning_rate = line.split()
            entries.append((int(pid), event, (float(sigma), float(learning_rate))))
    return entries


def run_search(directory, project, log, hang_at=None, overwrite=False, callbacks=()):
    from keras_stability import tuning

    (x, y), validation = make_data()
    callback = RunLog(log, hang_at, os.path.join(directory, "hanging"))
    return tuning.grid_search(
        build_model,
        x,
        y,
        validation,
        objective=OBJECTIVE,
        distortions=["jpeg-10"],
        sigma=SIGMA,
        alpha=ALPHA,
        learning_rate=LEARNING_RATE,
        epochs=1,
        batch_size=32,
        seed=1,
        directory=directory,
        project_name=project,
        overwrite=overwrite,
        callbacks=[callback, *callbacks],
        verbose=0,
    )


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("project")
    parser.add_argument("log")
    parser.add_argument("--hang-at", type=int, default=None)
    args = parser.parse_args(argv)
    run_search(args.directory, args.project, args.log, hang_at=args.hang_at)


if __name__ == "__main__":
    main(sys.argv[1:])
