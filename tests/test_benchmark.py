import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_stability import benchmark
from keras_stability.__main__ import main
from keras_stability.evaluation import RobustnessReport
from keras_stability.models import StabilityModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(clean, jpeg, flip):
    return RobustnessReport(
        [
            {"distortion": "original", "top1": clean, "flip_rate": 0.0, "mean_kl": 0.0},
            {"distortion": "jpeg-10", "top1": jpeg, "flip_rate": flip, "mean_kl": 0.5},
        ]
    )


def test_summary_is_mean_and_sample_std_over_seeds():
    reports = {"baseline": [_report(0.9, 0.8, 0.1), _report(0.8, 0.6, 0.3)]}
    summary = benchmark.summarize(reports)
    mean, std = summary["baseline"]["jpeg-10"]["top1"]
    assert mean == pytest.approx(0.7)
    assert std == pytest.approx(np.std([0.8, 0.6], ddof=1))
    table = benchmark.to_markdown(summary)
    assert "| jpeg-10 | 70.0 ± 14.1 | 20.0 ± 14.1 |" in table


def test_single_seed_prints_no_spread():
    summary = benchmark.summarize({"stability": [_report(0.9, 0.8, 0.1)]})
    assert "| jpeg-10 | 80.0 | 10.0 |" in benchmark.to_markdown(summary)
    assert "| jpeg-10 | 0.500 |" in benchmark.kl_markdown(summary)


def test_arms_train_what_they_claim():
    base = benchmark.mnist_cnn()
    assert benchmark._trainable("baseline", base, 0.1, 0.2, 0) is base
    stable = benchmark._trainable("stability", base, 0.1, 0.2, 0)
    assert isinstance(stable, StabilityModel) and stable.alpha == pytest.approx(0.1)
    augmented = benchmark._trainable("augmentation", base, 0.1, 0.2, 0)
    x = np.full((2, 28, 28, 1), 128, "uint8")
    # Noise only in training: inference is the bare classifier.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(augmented(x)), keras.ops.convert_to_numpy(base(x))
    )
    with pytest.raises(ValueError, match="arm"):
        benchmark._trainable("dropout", base, 0.1, 0.2, 0)


def test_unknown_arm_is_rejected_before_training():
    with pytest.raises(ValueError, match="arms"):
        benchmark.run_classification_benchmark(arms=("baseline", "mixup"))


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--epochs", "1", "--distortions", "jpeg-10", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| jpeg-10 |" in printed and "stability top-1 %" in printed
    assert (out / "classification_accuracy.png").stat().st_size > 1000


def test_readme_quickstart_is_the_example_and_runs(tmp_path):
    with open(os.path.join(ROOT, "examples", "quickstart.py")) as f:
        example = f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    body = example.split('"""', 2)[2].strip()
    assert body in readme, "README quickstart differs from examples/quickstart.py"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "quickstart.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "mnist_stable.keras").exists()
