"""The classification experiment of the paper (Tables 1 and 4) on offline data.

Three training arms, same architecture, seeds and budget:

- `baseline`: the task loss L0 on clean inputs (plain `fit`);
- `augmentation`: L0 on inputs with Gaussian noise (the data augmentation the
  paper's §3.2 and Table 1 show underfits);
- `stability`: `StabilityModel`, L0 on clean inputs plus `alpha * KL` on a
  Gaussian-perturbed copy (paper eq. 2, 10).

Each trained model is evaluated on the clean test set and on distorted copies
(jpeg-q, thumb-A, crop-o, gaussian-sigma) with top-1 accuracy, flip rate and
mean KL between clean and distorted predictions. Used by
`benchmarks/classification.py` and by the demo (`python -m keras_stability
demo`).
"""

import os
import statistics
import time

import keras
import numpy as np

from keras_stability import datasets, evaluation
from keras_stability.models import StabilityModel
from keras_stability.perturbations import GaussianPerturbation

ARMS = ("baseline", "augmentation", "stability")
# 28x28 digits: thumb-A and crop-o sized for them. A small CNN barely moves
# under JPEG on MNIST (DESIGN.md), so thumb, crop and noise carry the signal.
MNIST_DISTORTIONS = (
    "jpeg-50",
    "jpeg-10",
    "jpeg-5",
    "thumb-100",
    "thumb-64",
    "crop-2",
    "crop-4",
    "gaussian-0.3",
)
_VALUE_RANGE = (0, 255)


def mnist_cnn(num_classes=10):
    """The small CNN used for MNIST in the demo and the benchmark."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(num_classes, activation="softmax"),
        ],
        name="mnist_cnn",
    )


def _trainable(arm, base, alpha, sigma, seed):
    """The model `fit` runs for `arm`; all arms train the same `base`."""
    noise = GaussianPerturbation(sigma, value_range=_VALUE_RANGE, seed=seed)
    if arm == "baseline":
        return base
    if arm == "augmentation":
        # The noise layer is active only in training, so L0 sees noisy inputs.
        return keras.Sequential([keras.Input(base.input_shape[1:]), noise, base])
    if arm == "stability":
        return StabilityModel(base, alpha=alpha, perturbation=noise)
    raise ValueError(f"`arm` must be one of {ARMS}. Received: arm={arm!r}")


def train_arm(arm, x, y, seed, epochs, alpha, sigma, batch_size=64, verbose=0):
    """Trains a fresh `mnist_cnn` with one arm; returns the bare classifier."""
    keras.utils.set_random_seed(seed)
    base = mnist_cnn()
    model = _trainable(arm, base, alpha, sigma, seed)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=verbose)
    return base


def _mean_std(values):
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def _format(mean, std, scale=100.0, digits=1):
    """`mean ± std` (scaled); the mean alone for a single seed."""
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def summarize(reports):
    """Mean and std over seeds: `{arm: {distortion: {metric: (mean, std)}}}`."""
    summary = {}
    for arm, per_seed in reports.items():
        names = [row["distortion"] for row in per_seed[0].rows]
        summary[arm] = {
            name: {
                metric: _mean_std(report.row(name)[metric] for report in per_seed)
                for metric in ("top1", "flip_rate", "mean_kl")
            }
            for name in names
        }
    return summary


def to_markdown(summary):
    """One row per distortion; top-1 and flip rate of every arm (mean ± std)."""
    arms = list(summary)
    names = list(summary[arms[0]])
    header = ["distortion"]
    header += [f"{arm} top-1 %" for arm in arms]
    header += [f"{arm} flip %" for arm in arms]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        for metric in ("top1", "flip_rate"):
            for arm in arms:
                cells.append(_format(*summary[arm][name][metric]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kl_markdown(summary):
    """Mean KL(clean || distorted) of every arm per distortion (mean ± std)."""
    arms = list(summary)
    names = [n for n in summary[arms[0]] if n != "original"]
    lines = ["| distortion | " + " | ".join(f"{a} KL" for a in arms) + " |"]
    lines.append("|" + "---|" * (len(arms) + 1))
    for name in names:
        cells = [_format(*summary[a][name]["mean_kl"], scale=1, digits=3) for a in arms]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(summary, path):
    """Grouped bars of top-1 accuracy per distortion and arm, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    names = list(summary[arms[0]])
    positions = np.arange(len(names))
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 4))
    for i, arm in enumerate(arms):
        means = [100 * summary[arm][n]["top1"][0] for n in names]
        stds = [100 * (summary[arm][n]["top1"][1] or 0.0) for n in names]
        ax.bar(positions + i * width, means, width, yerr=stds, label=arm, capsize=2)
    ax.set_xticks(positions + width * (len(arms) - 1) / 2, names, rotation=30)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(
        max(0, min(100 * summary[a][n]["top1"][0] for a in arms for n in names) - 10),
        100,
    )
    ax.legend()
    ax.set_title("MNIST: accuracy on clean and distorted test sets")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_classification_benchmark(
    seeds=(0, 1, 2),
    epochs=5,
    alpha=0.01,
    sigma=0.04,
    distortions=MNIST_DISTORTIONS,
    arms=ARMS,
    verbose=0,
    plot_dir=None,
    log=print,
):
    """Trains every arm for every seed and evaluates it under distortion.

    Args:
        seeds: training seeds; the same seeds are used by every arm.
        epochs: training epochs of every arm (same budget).
        alpha: weight of the stability term.
        sigma: noise std in normalised units, for `stability` and
            `augmentation` alike.
        distortions: distortion names for the test set.
        arms: which of `ARMS` to run.
        verbose: Keras `fit` verbosity (1 shows progress bars).
        plot_dir: where to write `classification_accuracy.png` and the
            per-model robustness plots of the first seed; `None` for none.
        log: function used for progress messages.

    Returns:
        `(summary, reports)`: `summarize(reports)` and the per-seed
        `RobustnessReport`s, `{arm: [report, ...]}`.

    Example:

    >>> summary, _ = run_classification_benchmark(
    ...     seeds=(0,), epochs=1, arms=("baseline",), distortions=("jpeg-10",),
    ...     log=lambda *a: None)
    >>> sorted(summary["baseline"])
    ['jpeg-10', 'original']
    """
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        raise ValueError(
            f"`arms` must be a non-empty subset of {ARMS}. Received: {arms}"
        )
    (x_train, y_train), (x_test, y_test) = datasets.load_mnist()
    reports = {arm: [] for arm in arms}
    for seed in seeds:
        for arm in arms:
            start = time.perf_counter()
            log(f"[seed {seed}] training {arm} ({epochs} epochs)")
            model = train_arm(
                arm, x_train, y_train, seed, epochs, alpha, sigma, verbose=verbose
            )
            arm_plot_dir = None
            if plot_dir is not None and seed == seeds[0]:
                arm_plot_dir = os.path.join(plot_dir, arm)
            report = evaluation.robustness_report(
                model,
                x_test,
                y_test,
                distortions=distortions,
                seed=seed,
                plot_dir=arm_plot_dir,
                top_k=(1,),
            )
            reports[arm].append(report)
            top1 = report.row("original")["top1"]
            log(
                f"[seed {seed}] {arm}: clean top-1 {100 * top1:.1f}% "
                f"({time.perf_counter() - start:.0f} s)"
            )
    summary = summarize(reports)
    if plot_dir is not None:
        plot_summary(summary, os.path.join(plot_dir, "classification_accuracy.png"))
    return summary, reports
