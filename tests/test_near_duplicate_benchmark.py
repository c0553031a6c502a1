"""Smoke test of `benchmarks/near_duplicate.py` at a minimal size."""

import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmark():
    """Imports the benchmark script as a module (benchmarks/ is no package)."""
    path = os.path.join(ROOT, "benchmarks", "near_duplicate.py")
    spec = importlib.util.spec_from_file_location("near_duplicate_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benchmark():
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    return _load_benchmark()


def test_main_runs_and_writes_outputs(benchmark, tmp_path):
    # Two arms keep the test under ~20 s: most of it is tracing train steps.
    argv = ["--quick", "--train-steps", "2", "--eval-patches", "40", "--width", "4"]
    argv += ["--run-eagerly"]
    argv += ["--arms", "baseline,stabilized", "--output-dir", str(tmp_path)]
    out = benchmark.main(argv)
    summary = out["summary"]
    assert list(summary) == ["baseline", "stabilized"]
    metrics = summary["baseline"]
    for name in ("original", "jpeg-50", "thumb-256", "crop-4"):
        assert f"ranking/{name}" in metrics
    for key, (mean, std, runs) in metrics.items():
        assert runs == 1 and std is None
        if key.startswith(("recall@", "below")):
            assert 0.0 <= mean <= 1.0, key
    assert "| ranking score @top-30, original (of 40) |" in out["table"]
    names = sorted(os.listdir(tmp_path))
    assert "results.json" in names and "pr_jpeg-50.png" in names
    assert "distance_cdf_jpeg-50.png" in names
    with open(tmp_path / "results.json") as handle:
        assert len(json.load(handle)["results"]["stabilized"]) == 1


def test_augmented_arm_trains_f_on_noisy_inputs_only(benchmark):
    args = benchmark.parse_args(["--sigma", "0.2", "--width", "4"])
    embedding = benchmark.ks.embedding_model(width=4)
    model = benchmark.build_arm("augmented", embedding, args, seed=0)
    x = np.full((2, 32, 32, 3), 0.5, "float32")
    to_numpy = benchmark.keras.ops.convert_to_numpy
    clean = to_numpy(embedding(x))
    # The noise layer acts in training only, so inference gives f(x).
    np.testing.assert_allclose(to_numpy(model((x, x, x)))[:, 0], clean, atol=1e-6)
    noisy = to_numpy(model((x, x, x), training=True))[:, 0]
    assert np.abs(noisy - clean).max() > 1e-3


def test_eval_photographs_are_held_out(benchmark):
    train, test = benchmark.load_split(max_side=96, test_fraction=0.3, split_seed=0)
    assert {p.name for p in train}.isdisjoint(p.name for p in test)


def test_summary_uses_sample_std_and_formats_percentages(benchmark):
    runs = [{"recall@98.0%/jpeg-50": 0.5}, {"recall@98.0%/jpeg-50": 0.7}]
    summary = benchmark.summarize({"baseline": runs})
    mean, std, _ = summary["baseline"]["recall@98.0%/jpeg-50"]
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1414, abs=1e-4)
    table = benchmark.to_markdown(summary, n=10, top_k=30)
    assert "| jpeg-50: recall @ precision 98.0% | 60.0 ± 14.1 |" in table
