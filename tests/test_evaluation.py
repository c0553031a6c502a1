import math
import tracemalloc
import warnings

import keras
import numpy as np
import pytest

from keras_stability import distortions
from keras_stability import evaluation as ev


@pytest.fixture
def keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)
    yield


# ---------------------------------------------------------------------------
# Classification metrics
# ---------------------------------------------------------------------------

# 4 samples, 5 classes. Position of the true class in descending order:
# s0 -> 1st, s1 -> 3rd, s2 -> 5th (last), s3 -> 1st.
Y_PROB = np.array(
    [
        [0.10, 0.50, 0.20, 0.15, 0.05],
        [0.30, 0.25, 0.20, 0.15, 0.10],
        [0.05, 0.10, 0.15, 0.30, 0.40],
        [0.60, 0.10, 0.10, 0.10, 0.10],
    ]
)
Y_TRUE = np.array([1, 2, 0, 0])


@pytest.mark.parametrize("k, expected", [(1, 0.5), (2, 0.5), (3, 0.75), (5, 1.0)])
def test_top_k_accuracy_hand_example(k, expected):
    assert ev.top_k_accuracy(Y_TRUE, Y_PROB, k=k) == expected
    one_hot = np.eye(5)[Y_TRUE]
    assert ev.top_k_accuracy(one_hot, Y_PROB, k=k) == expected
    assert ev.top_k_accuracy(Y_TRUE[:, None], Y_PROB, k=k) == expected


def test_top_k_accuracy_ties_break_towards_lower_index_like_argmax():
    prob = np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2]])
    # argmax picks class 0 for both rows: label 0 is a hit, label 1 is not.
    assert ev.top_k_accuracy([0, 1], prob, k=1) == 0.5
    assert ev.top_k_accuracy([0, 1], prob, k=2) == 1.0


def test_flip_rate_hand_example():
    clean = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0, 0, 1], [0.6, 0.3, 0.1]])
    distorted = np.array([[0.8, 0.2, 0], [0.1, 0.4, 0.5], [0, 0, 1], [0.4, 0.5, 0.1]])
    # top-1: clean [0, 1, 2, 0], distorted [0, 2, 2, 1] -> 2 of 4 change.
    assert ev.flip_rate(clean, distorted) == 0.5
    assert ev.flip_rate(clean, clean) == 0.0


def test_kl_hand_example():
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = np.array([[0.25, 0.75, 0.0], [0.5, 0.25, 0.25]])
    # Row 0: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3) = 0.1438410362
    #        (the 0 * log(0/0) term is 0).
    # Row 1: 1 * ln(1/0.5) = ln 2 = 0.6931471806.
    expected = [0.1438410362258904, 0.6931471805599453]
    np.testing.assert_allclose(ev.kl_divergence(p, q), expected, rtol=1e-12)
    assert ev.mean_kl(p, q) == pytest.approx(0.4184941083929179, rel=1e-12)
    assert ev.mean_kl(p, p) == 0.0


def test_kl_is_finite_at_saturated_probabilities():
    p = np.array([[1.0, 0.0], [0.0, 1.0]])
    q = np.array([[0.0, 1.0], [0.0, 1.0]])
    # Row 0: 1 * (ln 1 - ln 1e-7) = 7 ln 10 = 16.11809565; row 1: identical, 0.
    np.testing.assert_allclose(
        ev.kl_divergence(p, q), [16.11809565095832, 0.0], rtol=1e-12
    )
    assert math.isfinite(ev.mean_kl(p, q))
    assert ev.mean_kl(p, q, epsilon=1e-3) == pytest.approx(
        0.5 * 3 * math.log(10), rel=1e-12
    )


# ---------------------------------------------------------------------------
# Feature distances
# ---------------------------------------------------------------------------


def test_feature_distances_hand_example():
    a = [[0.0, 0.0], [1.0, 1.0], [1.0, 2.0]]
    b = [[3.0, 4.0], [1.0, 1.0], [2.0, 2.0]]
    np.testing.assert_array_equal(ev.feature_distances(a, b), [5.0, 0.0, 1.0])
    # Trailing axes are flattened: sqrt(1 + 1 + 1 + 1) = 2.
    np.testing.assert_array_equal(
        ev.feature_distances(np.ones((1, 2, 2)), np.zeros((1, 2, 2))), [2.0]
    )


def test_fraction_below_is_strict():
    assert ev.fraction_below([0.05, 0.1, 0.2, 0.01]) == 0.5
    assert ev.fraction_below([0.05, 0.1, 0.2, 0.01], threshold=0.15) == 0.75


def test_distance_cdf():
    d, frac = ev.distance_cdf([0.3, 0.1, 0.2, 0.4])
    np.testing.assert_array_equal(d, [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_array_equal(frac, [0.25, 0.5, 0.75, 1.0])


# ---------------------------------------------------------------------------
# Near-duplicate precision / recall
# ---------------------------------------------------------------------------

POS = [0.1, 0.2, 0.4]
NEG = [0.3, 0.5]


def test_pr_curve_at_known_thresholds():
    precision, recall, thresholds = ev.near_duplicate_pr_curve(POS, NEG)
    # T=0.1: 1 TP, 0 FP; 0.2: 2, 0; 0.3: 2, 1; 0.4: 3, 1; 0.5: 3, 2.
    np.testing.assert_array_equal(thresholds, [0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_allclose(precision, [1, 1, 2 / 3, 3 / 4, 3 / 5])
    np.testing.assert_allclose(recall, [1 / 3, 2 / 3, 2 / 3, 1, 1])


def test_pr_curve_accepts_tied_positive_and_negative_together():
    precision, recall, thresholds = ev.near_duplicate_pr_curve([0.1, 0.2], [0.2])
    np.testing.assert_array_equal(thresholds, [0.1, 0.2])
    np.testing.assert_allclose(precision, [1, 2 / 3])
    np.testing.assert_allclose(recall, [0.5, 1])


def test_pr_curve_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pos = np.round(rng.uniform(0, 1, 50), 2)  # rounded: many ties
    neg = np.round(rng.uniform(0.3, 2, 70), 2)
    labels = np.r_[np.ones(50), np.zeros(70)]
    sk_p, sk_r, sk_t = metrics.precision_recall_curve(labels, -np.r_[pos, neg])
    precision, recall, thresholds = ev.near_duplicate_pr_curve(pos, neg)
    np.testing.assert_allclose(thresholds, -sk_t[::-1])
    np.testing.assert_allclose(precision, sk_p[:-1][::-1])
    np.testing.assert_allclose(recall, sk_r[:-1][::-1])


def test_recall_at_precision_and_precision_at_recall():
    assert ev.recall_at_precision(POS, NEG, precision=0.98) == pytest.approx(2 / 3)
    assert ev.recall_at_precision(POS, NEG, precision=0.75) == 1.0
    assert ev.recall_at_precision(POS, NEG, precision=0.76) == pytest.approx(2 / 3)
    assert ev.precision_at_recall(POS, NEG, recall=1.0) == 0.75
    assert ev.precision_at_recall(POS, NEG, recall=0.5) == 1.0


def test_recall_at_precision_unattainable_is_zero():
    # Best precision is 2/3 (T=0.6): 0.98 is out of reach.
    assert ev.recall_at_precision([0.5, 0.6], [0.1], precision=0.98) == 0.0


# ---------------------------------------------------------------------------
# Ranking score @top-K (eq. 12)
# ---------------------------------------------------------------------------

# 1-D embeddings; default gallery = positives + negatives
# = [1, 3, -1, 0, 2, 2.5, 1, 1].
Q = [[0.0], [0.0], [0.0], [10.0]]
P = [[1.0], [3.0], [-1.0], [0.0]]
N = [[2.0], [2.5], [1.0], [1.0]]
# t0: D(q,p)=1 < D(q,n)=2: correct. Closer item p: 1 gallery item (0) strictly
#     closer -> rank 2.
# t1: 3 > 2.5: incorrect. Closer item n at 2.5: 6 strictly closer -> rank 7.
# t2: 1 == 1: tie. Both at distance 1, shared with 2 other items: only 0 is
#     strictly closer -> rank 2 (competition ranking).
# t3: 10 > 9: incorrect. Closer n at 9: 7, 7.5, 8 strictly closer -> rank 4.


@pytest.mark.parametrize(
    "k, correct, incorrect, tied",
    [
        (1, 0, 0, 0),  # every closer item has rank >= 2
        (2, 1, 0, 1),  # t0 and t2 (rank tie at place 2 is inside)
        (3, 1, 0, 1),
        (4, 1, 1, 1),  # + t3
        (7, 1, 2, 1),  # + t1
        (30, 1, 2, 1),
    ],
)
def test_ranking_score_hand_example(k, correct, incorrect, tied):
    counts = ev.ranking_counts_at_top_k(Q, P, N, k=k)
    assert counts["correct"] == correct
    assert counts["incorrect"] == incorrect
    assert counts["tied"] == tied
    assert counts["considered"] == correct + incorrect + tied
    assert counts["total"] == 4
    assert ev.ranking_score_at_top_k(Q, P, N, k=k) == correct - incorrect
    assert ev.ranking_score_at_top_k(Q, P, N, k=k, chunk_size=1) == correct - incorrect


def test_ranking_score_with_custom_gallery_not_containing_p_or_n():
    # p at distance 1 has 2 gallery items strictly closer (0.5, 0.5): rank 3.
    q, p, n, gallery = [[0.0]], [[1.0]], [[2.0]], [[0.5], [-0.5], [3.0]]
    assert ev.ranking_score_at_top_k(q, p, n, gallery=gallery, k=2) == 0
    assert ev.ranking_score_at_top_k(q, p, n, gallery=gallery, k=3) == 1


def _brute_force_ranking_score(query, positive, negative, gallery, k):
    score = 0
    for q, p, n in zip(query, positive, negative, strict=True):
        gallery_dist = np.sqrt(np.sum((gallery - q) ** 2, axis=1))
        d_p = np.sqrt(np.sum((q - p) ** 2))
        d_n = np.sqrt(np.sum((q - n) ** 2))
        rank_p = 1 + np.sum(gallery_dist < d_p)
        rank_n = 1 + np.sum(gallery_dist < d_n)
        if rank_p <= k or rank_n <= k:
            score += int(d_p < d_n) - int(d_p > d_n)
    return score


@pytest.mark.parametrize("seed", range(4))
def test_ranking_score_chunked_matches_unchunked_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    q, p, n = (rng.normal(size=(60, 5)).astype("float32") for _ in range(3))
    q += 100.0  # a far-off centre must not break the rank of p's own copy
    p += 100.0
    n += 100.0
    gallery = np.concatenate([p, n]).astype("float64")
    for k in (1, 5, 30, 200):
        chunked = ev.ranking_score_at_top_k(q, p, n, k=k, chunk_size=7)
        unchunked = ev.ranking_score_at_top_k(q, p, n, k=k, chunk_size=100_000)
        expected = _brute_force_ranking_score(
            q.astype("float64"), p.astype("float64"), n.astype("float64"), gallery, k
        )
        assert chunked == unchunked == expected


@pytest.mark.parametrize("seed", range(4))
def test_ranking_score_matches_brute_force_with_many_ties(seed):
    # Small integer coordinates: many exact distance ties and duplicates.
    rng = np.random.default_rng(seed)
    q, p, n = (rng.integers(-2, 3, size=(40, 2)).astype("float64") for _ in range(3))
    gallery = np.concatenate([p, n])
    for k in (1, 2, 3, 10):
        expected = _brute_force_ranking_score(q, p, n, gallery, k)
        assert ev.ranking_score_at_top_k(q, p, n, k=k, chunk_size=3) == expected


def test_ranking_score_memory_is_bounded_by_chunks():
    rng = np.random.default_rng(0)
    q, p, n = (rng.normal(size=(2000, 16)) for _ in range(3))
    gallery = rng.normal(size=(4000, 16))
    tracemalloc.start()
    try:
        # k larger than the gallery: no early exit, every block is computed.
        ev.ranking_score_at_top_k(q, p, n, gallery=gallery, k=10**6, chunk_size=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A full 2000 x 4000 float64 distance matrix alone would be 64 MB.
    assert peak < 8 * 2**20


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ev.top_k_accuracy([0, 1], Y_PROB, k=1), "len\\(y_true\\)=2"),
        (lambda: ev.top_k_accuracy(Y_TRUE, Y_PROB, k=0), "k=0"),
        (lambda: ev.top_k_accuracy([0, 1, 2, 7], Y_PROB), "max=7"),
        (lambda: ev.top_k_accuracy(Y_TRUE, Y_PROB[0]), "y_prob.shape=\\(5,\\)"),
        (lambda: ev.flip_rate(Y_PROB, Y_PROB[:2]), "y_prob_distorted.shape=\\(2, 5\\)"),
        (lambda: ev.mean_kl([[0.5, np.nan]], [[0.5, 0.5]]), "y_prob_clean"),
        (lambda: ev.mean_kl([[-0.5, 1.5]], [[0.5, 0.5]]), "-0.5"),
        (lambda: ev.mean_kl([[1.0]], [[1.0]], epsilon=0), "epsilon=0"),
        (lambda: ev.feature_distances([[1.0, 2.0]], [[1.0]]), "f_b.shape=\\(1, 1\\)"),
        (lambda: ev.fraction_below([]), "distances"),
        (lambda: ev.fraction_below([0.1], threshold="a"), "threshold='a'"),
        (lambda: ev.near_duplicate_pr_curve([-0.1], [0.2]), "-0.1"),
        (lambda: ev.near_duplicate_pr_curve([0.1], []), "negative_distances"),
        (lambda: ev.recall_at_precision(POS, NEG, precision=1.5), "precision=1.5"),
        (lambda: ev.precision_at_recall(POS, NEG, recall=-1), "recall=-1"),
        (lambda: ev.ranking_score_at_top_k(Q, P, N, k=0), "k=0"),
        (lambda: ev.ranking_score_at_top_k(Q, P, N, chunk_size=0), "chunk_size=0"),
        (lambda: ev.ranking_score_at_top_k(Q, P[:2], N), "positive.shape=\\(2, 1\\)"),
        (
            lambda: ev.ranking_score_at_top_k(Q, P, N, gallery=[[1.0, 2.0]]),
            "gallery.shape=\\(1, 2\\)",
        ),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------
# Robustness report and plots (use the real distortions)
# ---------------------------------------------------------------------------


def _tiny_classifier(num_classes=10):
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Rescaling(1.0 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(num_classes, activation="softmax"),
        ]
    )


def _tiny_images(num=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(num, 8, 8, 1), dtype="uint8")
    return x, np.arange(num) % 10


def test_robustness_report_rows(tmp_path, keras_state):
    model = _tiny_classifier()
    x, y = _tiny_images()
    report = ev.robustness_report(
        model, x, y, distortions=["jpeg-50", "jpeg-10"], batch_size=8, plot_dir=tmp_path
    )
    assert [row["distortion"] for row in report.rows] == [
        "original",
        "jpeg-50",
        "jpeg-10",
    ]
    for row in report.rows:
        assert list(row) == ["distortion", "top1", "top5", "flip_rate", "mean_kl"]
        assert 0.0 <= row["top1"] <= row["top5"] <= 1.0
        assert 0.0 <= row["flip_rate"] <= 1.0
        assert row["mean_kl"] >= 0.0
    assert report.rows[0]["flip_rate"] == 0.0
    assert report.rows[0]["mean_kl"] == 0.0

    # The row equals the metrics computed by hand from the same predictions.
    x_jpeg = distortions.distort(x, "jpeg-10", seed=0)
    clean = model.predict(x, verbose=0)
    distorted = model.predict(x_jpeg, verbose=0)
    row = report.row("jpeg-10")
    assert row["top1"] == pytest.approx(ev.top_k_accuracy(y, distorted))
    assert row["flip_rate"] == pytest.approx(ev.flip_rate(clean, distorted))
    assert row["mean_kl"] == pytest.approx(ev.mean_kl(clean, distorted), abs=1e-6)

    text_lines = report.to_text().splitlines()
    assert text_lines[0].split()[:2] == ["distortion", "top-1"]
    assert text_lines[2].startswith("original")
    assert report.to_markdown().splitlines()[2].startswith("| original |")

    assert report.plots
    for path in report.plots:
        assert path.endswith(".png")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_robustness_report_skips_top5_below_five_classes(keras_state):
    model = _tiny_classifier(num_classes=3)
    x, _ = _tiny_images(num=6)
    report = ev.robustness_report(model, x, np.arange(6) % 3, distortions="jpeg-50")
    assert "top5" not in report.rows[0]
    assert "top1" in report.rows[0]


def test_robustness_report_bad_arguments(keras_state):
    model = _tiny_classifier()
    x, y = _tiny_images()
    with pytest.raises(ValueError, match="not-a-distortion"):
        ev.robustness_report(model, x, y, distortions=["not-a-distortion"])
    with pytest.raises(ValueError, match="len\\(x\\)=16, len\\(y\\)=15"):
        ev.robustness_report(model, x, y[:15], distortions=["jpeg-50"])


def test_plot_helpers_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    cdf_path = ev.plot_distance_cdf(
        {"baseline": [0.05, 0.2, 0.3], "stabilized": [0.01, 0.05, 0.2]},
        tmp_path / "cdf.png",
    )
    curves = {"baseline": ev.near_duplicate_pr_curve(POS, NEG)}
    pr_path = ev.plot_pr_curves(curves, tmp_path / "sub" / "pr.png", title="jpeg-50")
    for path in (cdf_path, pr_path):
        with open(path, "rb") as f:
            assert f.read(4) == b"\x89PNG"


# ---------------------------------------------------------------------------
# DistortedValidation callback
# ---------------------------------------------------------------------------


def test_distorted_validation_logs_metrics_for_early_stopping(monkeypatch, keras_state):
    x, y = _tiny_images()
    calls = []
    real_distort = ev.distortions_lib.distort

    def counting_distort(*args, **kwargs):
        calls.append(1)
        return real_distort(*args, **kwargs)

    monkeypatch.setattr(ev.distortions_lib, "distort", counting_distort)
    callback = ev.DistortedValidation(x, y, ["jpeg-50"], batch_size=8)
    assert callback.metric_names == ["val_jpeg-50_accuracy", "val_jpeg-50_flip_rate"]

    model = _tiny_classifier()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    assert callback.metric_directions == {
        "val_jpeg-50_accuracy": "max",
        "val_jpeg-50_flip_rate": "min",
    }
    # mode="auto" cannot infer a direction for a name Keras does not know.
    stop = keras.callbacks.EarlyStopping(
        monitor="val_jpeg-50_accuracy", mode="max", patience=5
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, epochs=2, batch_size=8, verbose=0, callbacks=[callback, stop]
        )
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "not available" in m], messages

    assert len(calls) == 1  # distorted once, not every epoch
    for name in callback.metric_names:
        values = history.history[name]
        assert len(values) == 2
        assert all(0.0 <= v <= 1.0 for v in values)

    # The last logged accuracy is that of the final weights.
    prob = model.predict(callback.x_distorted["jpeg-50"], verbose=0)
    assert history.history["val_jpeg-50_accuracy"][-1] == pytest.approx(
        ev.top_k_accuracy(y, prob)
    )


def test_distorted_validation_metric_names_without_data():
    assert ev.DistortedValidation.metric_names_for(
        ["jpeg-10", "crop-2"], prefix="test_"
    ) == [
        "test_jpeg-10_accuracy",
        "test_jpeg-10_flip_rate",
        "test_crop-2_accuracy",
        "test_crop-2_flip_rate",
    ]


def test_distorted_validation_bad_arguments():
    x, y = _tiny_images()
    with pytest.raises(ValueError, match="jpeg-fifty"):
        ev.DistortedValidation(x, y, ["jpeg-fifty"])
    with pytest.raises(ValueError, match="x.shape=\\(0, 8, 8, 1\\)"):
        ev.DistortedValidation(x[:0], y[:0], ["jpeg-50"])
    with pytest.raises(ValueError, match="len\\(x\\)=16, len\\(y\\)=12"):
        ev.DistortedValidation(x, y[:12], ["jpeg-50"])
    with pytest.raises(ValueError, match="distortions"):
        ev.DistortedValidation(x, y, [])
