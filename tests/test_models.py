import keras
import numpy as np
import pytest
import tensorflow as tf
from _helpers import FixedOffset, classification_data, dense_classifier
from keras import ops

from keras_stability import GaussianPerturbation, StabilityL2, StabilityModel

# ----------------------------------------------------------------- reference


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _reference_loss(theta, x, y, offset, alpha, kind):
    """L0(x) + alpha * D(f(x), f(x + offset)) in float64 numpy (paper eq. 2)."""
    kernel, bias = theta
    if kind == "kl":
        p = _softmax(x @ kernel + bias)
        q = _softmax((x + offset) @ kernel + bias)
        task = -np.mean(np.log(p[np.arange(len(y)), y]))
        distance = np.mean(np.sum(p * np.log(p / q), axis=-1))
    else:
        out = x @ kernel + bias
        out_perturbed = (x + offset) @ kernel + bias
        task = np.mean((out - y) ** 2)
        distance = np.mean(np.linalg.norm(out - out_perturbed, axis=-1))
    return task + alpha * distance


def _numerical_gradient(theta, *args, h=1e-6):
    grads = []
    for i, param in enumerate(theta):
        grad = np.zeros_like(param)
        for index in np.ndindex(param.shape):
            plus = [t.copy() for t in theta]
            minus = [t.copy() for t in theta]
            plus[i][index] += h
            minus[i][index] -= h
            grad[index] = (
                _reference_loss(plus, *args) - _reference_loss(minus, *args)
            ) / (2 * h)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("kind", ["kl", "l2"])
def test_one_sgd_step_matches_reference_gradient(kind):
    rng = np.random.default_rng(42)
    x = rng.random((8, 4))
    offset = rng.normal(0, 0.3, (8, 4))
    alpha, lr = 0.7, 0.5
    if kind == "kl":
        base = dense_classifier()
        y = rng.integers(0, 3, 8)
        task_loss = "sparse_categorical_crossentropy"
    else:
        base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        base.set_weights([rng.normal(0, 0.5, (4, 3)), rng.normal(0, 0.1, 3)])
        y = rng.normal(0, 1, (8, 3))
        task_loss = "mse"
    theta = [w.astype("float64") for w in base.get_weights()]
    model = StabilityModel(
        base, alpha=alpha, perturbation=FixedOffset(offset), stability_loss=kind
    )
    model.compile(keras.optimizers.SGD(lr), task_loss)
    model.fit(x.astype("float32"), y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    grads = _numerical_gradient(theta, x, y, offset, alpha, kind)
    expected = [t - lr * g for t, g in zip(theta, grads)]
    for got, want in zip(base.get_weights(), expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # The stability term must matter at this alpha, or the test proves nothing.
    grads_plain = _numerical_gradient(theta, x, y, offset, 0.0, kind)
    assert max(np.abs(g - gp).max() for g, gp in zip(grads, grads_plain)) > 1e-3


def test_task_loss_never_sees_perturbed_inputs():
    x, y = classification_data(n=16)
    base = dense_classifier()
    clean_loss = base.compile(loss="sparse_categorical_crossentropy") or base.evaluate(
        x, y, batch_size=16, verbose=0
    )
    # A huge offset: if x' leaked into L0, task_loss would be far from clean.
    model = StabilityModel(base, alpha=1.0, perturbation=FixedOffset(np.full(4, 50.0)))
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert history["task_loss"][0] == pytest.approx(clean_loss, rel=1e-5)
    assert history["stability_loss"][0] > 0.1
    assert history["loss"][0] == pytest.approx(
        history["task_loss"][0] + history["stability_loss"][0], rel=1e-5
    )


def test_alpha_zero_reproduces_plain_fit():
    x, y = classification_data(n=32)
    plain, wrapped = dense_classifier(), dense_classifier()
    plain.compile(keras.optimizers.SGD(0.3), "sparse_categorical_crossentropy")
    plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    model = StabilityModel(
        wrapped, alpha=0.0, perturbation=GaussianPerturbation(0.3, seed=1)
    )
    model.compile(keras.optimizers.SGD(0.3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), wrapped.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)


def _stability_history(seed):
    x, y = classification_data(n=16)
    model = StabilityModel(
        dense_classifier(), alpha=0.1, perturbation=GaussianPerturbation(0.2, seed=seed)
    )
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    return model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0).history[
        "stability_loss"
    ]


def test_noise_is_fresh_each_step_and_reproducible_across_runs():
    first, again, other = (
        _stability_history(5),
        _stability_history(5),
        _stability_history(6),
    )
    # Weights are frozen (lr=0), so only fresh noise can change the distance.
    assert len(set(np.round(first, 7))) == 3
    np.testing.assert_allclose(first, again, rtol=1e-6)
    assert not np.allclose(first, other)


def test_evaluate_and_predict_behave_like_the_inner_model():
    x, y = classification_data(n=16)
    base = dense_classifier()
    model = StabilityModel(base, perturbation=GaussianPerturbation(0.5, seed=0))
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    np.testing.assert_allclose(model.predict(x, verbose=0), base.predict(x, verbose=0))
    np.testing.assert_allclose(
        ops.convert_to_numpy(model(x)), base.predict(x, verbose=0), atol=1e-6
    )
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(result) == {"loss", "task_loss", "accuracy"}
    base.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    expected = base.evaluate(x, y, verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert result["accuracy"] == pytest.approx(expected["accuracy"])


def test_epoch_logs_add_up_with_a_smaller_last_batch():
    x, y = classification_data(n=20)  # batches of 8, 8 and 4
    model = StabilityModel(dense_classifier(), alpha=0.5)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=8, validation_data=(x, y), verbose=0).history
    assert history["loss"][0] == pytest.approx(
        history["task_loss"][0] + 0.5 * history["stability_loss"][0], rel=1e-5
    )
    assert history["val_loss"][0] == pytest.approx(
        history["val_task_loss"][0], rel=1e-6
    )


def test_history_keys_with_validation():
    x, y = classification_data(n=32)
    model = StabilityModel(dense_classifier())
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, validation_split=0.25, epochs=1, verbose=0).history
    assert set(history) == {
        "loss",
        "task_loss",
        "stability_loss",
        "accuracy",
        "val_loss",
        "val_task_loss",
        "val_accuracy",
    }


def test_sample_weight_scales_both_terms():
    x, y = classification_data(n=16)

    def run(weight):
        model = StabilityModel(
            dense_classifier(), alpha=0.5, perturbation=FixedOffset(np.full(4, 0.3))
        )
        model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
        return model.fit(
            x, y, sample_weight=np.full(16, weight), batch_size=16, verbose=0
        ).history

    one, two = run(1.0), run(2.0)
    assert two["task_loss"][0] == pytest.approx(2 * one["task_loss"][0], rel=1e-5)
    assert two["stability_loss"][0] == pytest.approx(
        2 * one["stability_loss"][0], rel=1e-5
    )


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, index):
        s = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[s], self.y[s]


def _weights_after(data_kind, **compile_kwargs):
    x, y = classification_data(n=32)
    base = dense_classifier()
    model = StabilityModel(
        base, alpha=0.5, perturbation=keras.layers.Rescaling(0.8, offset=0.1)
    )
    model.compile(
        keras.optimizers.SGD(0.3), "sparse_categorical_crossentropy", **compile_kwargs
    )
    if data_kind == "numpy":
        model.fit(x, y, batch_size=8, shuffle=False, epochs=2, verbose=0)
    elif data_kind == "tf.data":
        model.fit(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(8),
            shuffle=False,
            epochs=2,
            verbose=0,
        )
    else:
        model.fit(_Batches(x, y, 8), shuffle=False, epochs=2, verbose=0)
    return base.get_weights()


@pytest.mark.parametrize("data_kind", ["tf.data", "PyDataset"])
def test_tf_data_and_pydataset_match_numpy(data_kind):
    for a, b in zip(_weights_after("numpy"), _weights_after(data_kind)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_jit_compile_on_and_off_agree():
    on, off = (_weights_after("numpy", jit_compile=j) for j in (True, False))
    for a, b in zip(on, off):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_run_eagerly_matches_compiled():
    eager, compiled = (_weights_after("numpy", run_eagerly=e) for e in (True, False))
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_callbacks_see_stability_logs(tmp_path):
    x, y = classification_data(n=32)
    model = StabilityModel(dense_classifier())
    model.compile("adam", "sparse_categorical_crossentropy")
    path = str(tmp_path / "best.keras")
    seen = []
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="stability_loss", mode="min", patience=1),
        keras.callbacks.ModelCheckpoint(
            path, monitor="task_loss", mode="min", save_best_only=True
        ),
        keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: seen.append(dict(logs))
        ),
    ]
    model.fit(x, y, epochs=3, verbose=0, callbacks=callbacks)
    assert seen and {"task_loss", "stability_loss", "loss"} <= set(seen[0])
    restored = keras.models.load_model(path)
    assert isinstance(restored, StabilityModel)


def _conv_bn_dropout_model():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


@pytest.mark.parametrize("perturbed_pass_training", [True, False])
def test_batchnorm_and_dropout_models_train(perturbed_pass_training):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 8, 8, 1)).astype("uint8")
    y = rng.integers(0, 3, 32)
    base = _conv_bn_dropout_model()
    model = StabilityModel(
        base,
        perturbation=GaussianPerturbation(0.1, value_range=(0, 255), seed=0),
        perturbed_pass_training=perturbed_pass_training,
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    moving_mean = base.layers[1].moving_mean
    assert np.abs(ops.convert_to_numpy(moving_mean)).max() > 0


def test_save_load_round_trip_and_continue_training(tmp_path):
    x, y = classification_data(n=32)
    model = StabilityModel(
        dense_classifier(),
        alpha=0.05,
        perturbation=GaussianPerturbation(0.1, seed=3),
        stability_loss="cross_entropy",
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)  # safe_mode=True by default
    assert isinstance(restored, StabilityModel)
    assert restored.alpha == pytest.approx(0.05)
    assert restored.stability_loss.form == "cross_entropy"
    assert restored.perturbation.get_config() == model.perturbation.get_config()
    np.testing.assert_array_equal(
        restored.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    history = restored.fit(x, y, epochs=1, verbose=0).history
    assert {"task_loss", "stability_loss"} <= set(history)


def test_subclassed_model_and_other_perturbation_layers():
    class TwoLayer(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(8, activation="relu")
            self.out = keras.layers.Dense(3, activation="softmax")

        def call(self, inputs):
            return self.out(self.hidden(inputs))

    x = np.random.default_rng(0).random((16, 6, 6, 1)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, 16)
    flat = keras.Sequential(
        [keras.Input((6, 6, 1)), keras.layers.Flatten(), TwoLayer()]
    )
    model = StabilityModel(
        flat, perturbation=keras.layers.RandomTranslation(0.2, 0.2, seed=0)
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    history = model.fit(x, y, epochs=1, verbose=0).history
    assert history["stability_loss"][0] > 0


def test_alpha_can_change_after_compile():
    x, y = classification_data(n=16)
    model = StabilityModel(
        dense_classifier(), alpha=0.0, perturbation=FixedOffset(np.full(4, 0.5))
    )
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    first = model.fit(x, y, batch_size=16, verbose=0).history
    model.alpha = 2.0
    second = model.fit(x, y, batch_size=16, verbose=0).history
    assert first["loss"][0] == pytest.approx(first["task_loss"][0])
    assert second["loss"][0] == pytest.approx(
        second["task_loss"][0] + 2.0 * second["stability_loss"][0], rel=1e-5
    )


def test_stddev_can_change_after_compile():
    # sigma is a variable too: a callback can schedule the noise.
    x, y = classification_data(n=16)
    noise = GaussianPerturbation(0.3, seed=0)
    model = StabilityModel(dense_classifier(), alpha=0.1, perturbation=noise)
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    model.make_train_function()
    train_function = model.train_function
    first = model.fit(x, y, batch_size=16, verbose=0).history["stability_loss"][0]
    noise.stddev = 0.0
    second = model.fit(x, y, batch_size=16, verbose=0).history["stability_loss"][0]
    assert model.train_function is train_function  # the same compiled step
    assert first > 1e-3
    assert second == pytest.approx(0.0, abs=1e-7)


def test_alpha_and_stddev_follow_loaded_weights(tmp_path):
    # Both read their variables, so load_weights (e.g. a tuner's checkpoint)
    # cannot leave a stale value in get_config.
    trained = StabilityModel(
        dense_classifier(), alpha=0.5, perturbation=GaussianPerturbation(0.3)
    )
    trained.build((None, 4))
    path = str(tmp_path / "m.weights.h5")
    trained.save_weights(path)
    fresh = StabilityModel(
        dense_classifier(), alpha=0.01, perturbation=GaussianPerturbation(0.04)
    )
    fresh.build((None, 4))
    fresh.load_weights(path)
    assert (fresh.alpha, fresh.perturbation.stddev) == (0.5, 0.3)
    assert fresh.get_config()["alpha"] == 0.5


def _two_output_model():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(hidden)
    reg = keras.layers.Dense(1, name="reg")(hidden)
    return keras.Model(inputs, [cls, reg])


@pytest.mark.parametrize("stability_output", ["cls", 0])
def test_multi_output_model_with_named_output(stability_output):
    x, y = classification_data(n=16)
    model = StabilityModel(_two_output_model(), stability_output=stability_output)
    model.compile("adam", ["sparse_categorical_crossentropy", "mse"])
    history = model.fit(x, [y, x[:, :1]], epochs=1, verbose=0).history
    assert np.isfinite(history["stability_loss"][0])


def test_multi_output_model_without_stability_output_is_an_error():
    with pytest.raises(ValueError, match="stability_output"):
        StabilityModel(_two_output_model())
    with pytest.raises(ValueError, match="stability_output='nope'"):
        StabilityModel(_two_output_model(), stability_output="nope")


def test_l2_distance_on_embeddings():
    base = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5), keras.layers.UnitNormalization()]
    )
    x, _ = classification_data(n=16)
    model = StabilityModel(
        base,
        stability_loss=StabilityL2(),
        perturbation=GaussianPerturbation(0.2, seed=0),
    )
    model.compile("adam", "mse")
    history = model.fit(x, np.zeros((16, 5)), epochs=1, verbose=0).history
    assert history["stability_loss"][0] > 0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"alpha": "0.1"}, TypeError, "alpha"),
        ({"stability_loss": "cosine"}, ValueError, "'kl', 'cross_entropy', 'l2'"),
        ({"perturbation": "gaussian"}, TypeError, "perturbation"),
        ({"perturbed_pass_training": 1}, TypeError, "perturbed_pass_training"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        StabilityModel(dense_classifier(), **kwargs)


def test_model_must_be_a_keras_model():
    with pytest.raises(TypeError, match="model"):
        StabilityModel(lambda x: x)


def test_kl_needs_a_distribution_output():
    regression = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="stability_loss='l2'"):
        StabilityModel(regression)
    logits = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="from_logits=True"):
        StabilityModel(logits)
    StabilityModel(logits, from_logits=True)  # accepted


def test_alpha_setter_validates():
    model = StabilityModel(dense_classifier())
    with pytest.raises(ValueError, match="alpha"):
        model.alpha = -0.5


def test_empty_data_is_a_clear_error():
    model = StabilityModel(dense_classifier())
    model.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="empty|no samples|0 samples"):
        model.fit(np.zeros((0, 4), "float32"), np.zeros((0,), "int64"), verbose=0)
    empty = tf.data.Dataset.from_tensor_slices((np.zeros((0, 4)), np.zeros(0))).batch(4)
    with pytest.raises(ValueError, match="empty"):
        model.fit(empty, verbose=0)
