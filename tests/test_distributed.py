import os
import re
import subprocess
import sys

import keras
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "_distributed_worker.py")


def _run_worker(backend):
    result = subprocess.run(
        [sys.executable, WORKER, backend],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"GAP (\S+) MOVED (\S+)", result.stdout)
    assert match, result.stdout + result.stderr[-2000:]
    return float(match.group(1)), float(match.group(2))


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute is TensorFlow's"
)
def test_mirrored_strategy_matches_single_device():
    gap, moved = _run_worker("tensorflow")
    assert moved > 1e-2  # training really changed the weights
    assert gap < 1e-5


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution.DataParallel is JAX-only in Keras 3",
)
def test_jax_data_parallel_matches_single_device():
    gap, moved = _run_worker("jax")
    assert moved > 1e-2
    assert gap < 1e-5
