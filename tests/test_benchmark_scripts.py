"""Smoke tests of `benchmarks/overhead.py` and `benchmarks/distortions.py`.

Run at a minimal size on the active backend, so that the scripts whose
tables the README quotes keep working on TensorFlow, JAX and PyTorch.
"""

import importlib.util
import os

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    """Imports a benchmark script as a module (benchmarks/ is no package)."""
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(printed):
    return [line for line in printed.splitlines() if line.startswith("| ")][1:]


def test_overhead_prints_a_ratio_for_every_method(capsys):
    overhead = _load("overhead")
    overhead.main(["--epochs", "1", "--samples", "128", "--batch-size", "64"])
    rows = _table_rows(capsys.readouterr().out)
    methods = [row.split("|")[1].strip() for row in rows]
    expected = ["plain fit", "StabilityModel", "hand loop", "hand loop, L0 only"]
    if keras.backend.backend() == "tensorflow":
        expected.append("hand loop (XLA)")
    assert methods == expected
    for column in (4, 5):  # ratio of the min and of the median epoch
        ratios = [float(row.split("|")[column].strip().rstrip("x")) for row in rows]
        assert ratios[0] == 1.0 and all(r > 0 for r in ratios)


def test_overhead_hand_loop_trains_the_model():
    # The yardstick must do real work: its weights change in one epoch.
    overhead = _load("overhead")
    rng = np.random.default_rng(0)
    x = rng.random((128, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 128).astype("int32")
    epoch = overhead.HAND_LOOPS[keras.backend.backend()](x, y, 64)
    before = [keras.ops.convert_to_numpy(v) for v in epoch.model.weights]
    epoch()
    after = [keras.ops.convert_to_numpy(v) for v in epoch.model.weights]
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_distortions_benchmark_table(capsys):
    pytest.importorskip("skimage")
    bench = _load("distortions")
    bench.main(
        ["--num-images", "8", "--size", "64", "--repeats", "1", "--workers", "1", "2"]
        + ["--distortions", "jpeg-50", "crop-10"]
    )
    rows = _table_rows(capsys.readouterr().out)
    names = {row.split("|")[1].strip() for row in rows}
    assert names == {"jpeg-50", "crop-10"}
    rates = [float(row.split("|")[4].strip().replace(",", "")) for row in rows]
    assert all(rate > 0 for rate in rates)
