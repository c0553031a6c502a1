import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_stability import StabilityKL, StabilityL2, TripletRankingLoss
from keras_stability.losses import get


def _np(x):
    return ops.convert_to_numpy(x)


def test_kl_matches_hand_computation():
    p = np.array([[0.5, 0.5], [0.2, 0.8]], "float32")
    q = np.array([[0.9, 0.1], [0.2, 0.8]], "float32")
    # Row 0: 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.510826; row 1: identical -> 0.
    expected = [0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), 0.0]
    loss = StabilityKL(reduction=None)
    np.testing.assert_allclose(_np(loss(p, q)), expected, atol=1e-6)
    np.testing.assert_allclose(_np(StabilityKL()(p, q)), np.mean(expected), atol=1e-6)


def test_cross_entropy_form_matches_paper_eq10():
    p = np.array([[0.5, 0.5], [0.2, 0.8]], "float32")
    q = np.array([[0.9, 0.1], [0.2, 0.8]], "float32")
    # -sum_j p_j log q_j
    expected = [
        -(0.5 * math.log(0.9) + 0.5 * math.log(0.1)),
        -(0.2 * math.log(0.2) + 0.8 * math.log(0.8)),
    ]
    loss = StabilityKL(form="cross_entropy", reduction=None)
    np.testing.assert_allclose(_np(loss(p, q)), expected, atol=1e-6)


def test_kl_from_logits_equals_kl_of_softmax():
    logits_a = np.array([[2.0, -1.0, 0.5]], "float32")
    logits_b = np.array([[0.0, 1.0, 0.5]], "float32")
    pa = np.exp(logits_a) / np.exp(logits_a).sum()
    pb = np.exp(logits_b) / np.exp(logits_b).sum()
    expected = float(np.sum(pa * np.log(pa / pb)))
    got = float(StabilityKL(from_logits=True)(logits_a, logits_b))
    assert got == pytest.approx(expected, abs=1e-6)


def test_l2_matches_hand_computation_per_vector():
    a = np.zeros((2, 2, 2), "float32")
    b = np.array([[[3, 4], [6, 8]], [[0, 0], [0, 1]]], "float32")
    loss = StabilityL2(reduction=None)
    # One distance per last-axis vector: 5, 10, sqrt(1e-12) floor, 1.
    np.testing.assert_allclose(_np(loss(a, b)), [[5.0, 10.0], [1e-6, 1.0]], atol=1e-6)
    assert float(StabilityL2()(a, b)) == pytest.approx((5 + 10 + 1e-6 + 1) / 4)


def _gradient(loss, a, b):
    """Gradient of loss(a, b) wrt both arguments with the active backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        a, b = tf.Variable(a), tf.Variable(b)
        with tf.GradientTape() as tape:
            value = loss(a, b)
        return [g.numpy() for g in tape.gradient(value, [a, b])]
    if backend == "jax":
        import jax

        return [np.asarray(g) for g in jax.grad(lambda x, y: loss(x, y), (0, 1))(a, b)]
    import torch

    a = torch.tensor(a, requires_grad=True)
    b = torch.tensor(b, requires_grad=True)
    loss(a, b).backward()
    return [a.grad.numpy(), b.grad.numpy()]


@pytest.mark.parametrize(
    "loss",
    [
        StabilityKL(),
        StabilityKL(form="cross_entropy"),
        StabilityKL(from_logits=True),
        StabilityL2(),
    ],
    ids=["kl", "cross_entropy", "kl_logits", "l2"],
)
def test_no_nan_at_identical_outputs(loss):
    p = np.array([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]], "float32")
    value = float(loss(p, p.copy()))
    grads = _gradient(loss, p, p.copy())
    assert math.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in grads)
    if isinstance(loss, StabilityL2):
        assert value == pytest.approx(1e-6, abs=1e-7)
        np.testing.assert_allclose(grads[0], 0.0)


def test_kl_is_zero_at_identical_outputs():
    p = np.array([[0.7, 0.2, 0.1]], "float32")
    assert float(StabilityKL()(p, p)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("form", ["kl", "cross_entropy"])
def test_kl_finite_at_saturated_probabilities(form):
    p = np.array([[1.0, 0.0]], "float32")
    q = np.array([[0.0, 1.0]], "float32")
    loss = StabilityKL(form=form)
    value = float(loss(p, q))
    # Clipping at epsilon=1e-7 bounds the loss by -ln(1e-7) = 16.12.
    assert value == pytest.approx(-math.log(1e-7), rel=1e-3)
    assert all(np.all(np.isfinite(g)) for g in _gradient(loss, p, q))


@pytest.mark.parametrize("loss", [StabilityKL(), StabilityL2()], ids=["kl", "l2"])
def test_float16_inputs_stay_finite(loss):
    p = np.array([[0.999, 0.001], [0.5, 0.5]], "float16")
    q = np.array([[0.001, 0.999], [0.5, 0.5]], "float16")
    half = type(loss)(dtype="float16")
    assert math.isfinite(float(half(p, q)))
    assert math.isfinite(float(half(p, p)))
    assert math.isfinite(float(loss(p, q)))


def test_sample_weight_weights_per_sample_distance():
    a = np.zeros((2, 2), "float32")
    b = np.array([[3, 4], [6, 8]], "float32")  # distances 5 and 10
    loss = StabilityL2()
    # sum_over_batch_size: (1*5 + 0*10) / 2
    assert float(loss(a, b, sample_weight=np.array([1.0, 0.0]))) == pytest.approx(2.5)


def test_triplet_loss_hand_computation_and_hinge():
    q, p, n = [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]
    d_qp, d_qn = math.sqrt(0.16 + 0.64), math.sqrt(2.0)
    y = np.array([[q, p, n], [q, q, n]], "float32")
    loss = TripletRankingLoss(margin=0.5, reduction=None)
    # Row 0: 0.5 + 0.894 - 1.414 < 0 -> hinge gives 0.
    # Row 1: positive equals query: 0.5 + 0 - 1.414 < 0 -> 0.
    np.testing.assert_allclose(_np(loss(None, y)), [0.0, 0.0], atol=1e-6)
    loss = TripletRankingLoss(margin=1.0, reduction=None)
    np.testing.assert_allclose(
        _np(loss(None, y)), [1.0 + d_qp - d_qn, max(0.0, 1.0 + 0.0 - d_qn)], atol=1e-5
    )


def test_triplet_loss_margin_zero_and_swapped_triplet():
    q, p, n = [1.0, 0.0], [0.0, 1.0], [0.8, 0.6]
    y = np.array([[q, p, n]], "float32")
    d_qp, d_qn = math.sqrt(2.0), math.sqrt(0.04 + 0.36)
    assert float(TripletRankingLoss(margin=0.0)(None, y)) == pytest.approx(
        d_qp - d_qn, abs=1e-5
    )


def test_triplet_loss_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(batch, 3, dim\)"):
        TripletRankingLoss()(None, np.zeros((4, 2, 8), "float32"))


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: StabilityKL(form="js"), "form"),
        (lambda: StabilityKL(from_logits="yes"), "from_logits"),
        (lambda: StabilityKL(epsilon=0), "epsilon"),
        (lambda: StabilityL2(epsilon=-1.0), "epsilon"),
        (lambda: TripletRankingLoss(margin=-0.1), "margin"),
        (lambda: TripletRankingLoss(margin="big"), "margin"),
        (lambda: get("cosine"), "stability_loss"),
    ],
)
def test_bad_arguments_name_the_argument(factory, message):
    with pytest.raises((TypeError, ValueError), match=message):
        factory()


@pytest.mark.parametrize(
    "loss",
    [
        StabilityKL(from_logits=True, form="cross_entropy"),
        StabilityL2(epsilon=1e-8),
        TripletRankingLoss(0.3),
    ],
)
def test_get_config_round_trip(loss):
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
