import keras
import numpy as np
import pytest
from _helpers import FixedOffset

import keras_stability as ks


def _triplets(n=8, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.random((n, size, size, 3)).astype("float32") for _ in range(3))


def _normalised_linear(size=8, dim=4, seed=0):
    """f(x) = normalize(flatten(x) @ W): nonlinear, so distances differ per image."""
    model = keras.Sequential(
        [
            keras.Input((size, size, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(dim, use_bias=False),
            keras.layers.UnitNormalization(),
        ]
    )
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 1, (size * size * 3, dim))])
    return model


def _embed(kernel, x):
    z = x.reshape(len(x), -1) @ kernel
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def test_stability_term_covers_all_three_images():
    q, p, n = _triplets()
    f = _normalised_linear()
    kernel = f.get_weights()[0].astype("float64")
    offset = np.random.default_rng(1).normal(0, 0.5, (8, 8, 3))
    model = ks.StabilityModel(
        ks.TripletModel(f),
        alpha=0.1,
        stability_loss="l2",
        perturbation=FixedOffset(offset),
    )
    model.compile(keras.optimizers.SGD(0.0), ks.TripletRankingLoss(margin=0.2))
    history = model.fit(
        (q, p, n), batch_size=8, epochs=1, shuffle=False, verbose=0
    ).history
    distances = [
        np.linalg.norm(_embed(kernel, x) - _embed(kernel, x + offset), axis=-1)
        for x in (q, p, n)
    ]
    assert history["stability_loss"][0] == pytest.approx(np.mean(distances), rel=1e-4)
    # Perturbing the query alone would give a third of the value or less.
    assert np.mean(distances[0]) / 3 < 0.9 * np.mean(distances)


def test_triplet_loss_in_fit_matches_hand_computation():
    q, p, n = _triplets(seed=2)
    f = _normalised_linear(seed=3)
    kernel = f.get_weights()[0].astype("float64")
    model = ks.StabilityModel(ks.TripletModel(f), alpha=0.0, stability_loss="l2")
    model.compile(keras.optimizers.SGD(0.0), ks.TripletRankingLoss(margin=0.5))
    task = model.fit((q, p, n), batch_size=8, shuffle=False, verbose=0).history[
        "task_loss"
    ][0]
    eq, ep, en = (_embed(kernel, x) for x in (q, p, n))
    hinge = np.maximum(
        0.0, 0.5 + np.linalg.norm(eq - ep, axis=-1) - np.linalg.norm(eq - en, axis=-1)
    )
    assert task == pytest.approx(hinge.mean(), rel=1e-4)


def test_fit_evaluate_predict_save_load(tmp_path):
    q, p, n = _triplets(n=16, size=16)
    f = ks.embedding_model((16, 16, 3), dim=8, width=4)
    model = ks.StabilityModel(
        ks.TripletModel(f),
        alpha=0.1,
        stability_loss="l2",
        perturbation=ks.GaussianPerturbation(0.2, seed=0),
    )
    model.compile("adam", ks.TripletRankingLoss(margin=0.1))
    history = model.fit((q, p, n), batch_size=8, epochs=1, verbose=0).history
    assert {"loss", "task_loss", "stability_loss"} <= set(history)
    result = model.evaluate((q, p, n), verbose=0, return_dict=True)
    assert set(result) == {"loss", "task_loss"}
    embeddings = model.predict((q, p, n), verbose=0)
    assert embeddings.shape == (16, 3, 8)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5)
    path = str(tmp_path / "triplet.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(
        restored.predict((q, p, n), verbose=0), embeddings, atol=1e-6
    )
    # The embedding model alone is what gets deployed.
    inner = restored.model.embedding
    np.testing.assert_allclose(inner.predict(q, verbose=0), embeddings[:, 0], atol=1e-6)
    restored.fit((q, p, n), batch_size=8, epochs=1, verbose=0)


def test_dict_triplets_are_accepted():
    q, p, n = _triplets()
    model = ks.TripletModel(_normalised_linear())
    out = model({"query": q, "positive": p, "negative": n})
    assert tuple(out.shape) == (8, 3, 4)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda q, p, n: (q, p), "length 2"),
        (lambda q, p, n: q, r"shape \(8, 8, 8, 3\)"),
        (lambda q, p, n: {"query": q, "positive": p}, "negative"),
    ],
)
def test_wrong_triplet_structure_is_a_clear_error(bad, message):
    q, p, n = _triplets()
    with pytest.raises(ValueError, match=message):
        ks.TripletModel(_normalised_linear())(bad(q, p, n))


def test_bad_arguments():
    with pytest.raises(TypeError, match="embedding"):
        ks.TripletModel("cnn")
    with pytest.raises(ValueError, match="margin"):
        ks.TripletRankingLoss(margin=-1.0)
    with pytest.raises(ValueError, match="dim"):
        ks.embedding_model(dim=0)
