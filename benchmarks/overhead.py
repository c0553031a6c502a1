"""Training-time overhead of stability training, as a ratio to plain `fit`.

Trains the same small CNN on 32x32x3 inputs several ways, one epoch of each in
turn (interleaved, so machine load hits all of them alike), after one warm-up
epoch each that absorbs tracing and compilation:

- `plain fit`: `model.fit` on L0 only (the floor every method is compared to);
- `StabilityModel`: `StabilityModel(model).fit`, L0 + alpha * KL on x';
- `hand loop`: the loop Keras users write today for the same two passes, on
  the active backend (`tf.GradientTape` in a `tf.function` on TensorFlow,
  with and without XLA, `jax.value_and_grad` over `stateless_call` in
  `jax.jit` on JAX, autograd on PyTorch);
- `hand loop, L0 only`: the same loop without the perturbed pass, so that
  `plain fit` minus it is what Keras' `fit` machinery costs by itself.

The perturbed pass doubles forward and backward, so about 2.0x plain `fit` is
the floor for the two stability methods.

    KERAS_BACKEND=tensorflow python benchmarks/overhead.py --epochs 10
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_stability as ks  # noqa: E402

ALPHA, SIGMA = 0.01, 0.04


def small_cnn(num_classes=10):
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(num_classes, activation="softmax"),
        ]
    )


def make_plain(x, y, batch_size):
    model = small_cnn()
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    return lambda: model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)


def make_stability(x, y, batch_size):
    model = ks.StabilityModel(
        small_cnn(), alpha=ALPHA, perturbation=ks.GaussianPerturbation(SIGMA, seed=0)
    )
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    return lambda: model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)


def _batches(x, y, batch_size):
    for start in range(0, len(x) - batch_size + 1, batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def _tf_hand_loop(x, y, batch_size, jit_compile=False, stability=True):
    import tensorflow as tf

    model = small_cnn()
    optimizer = keras.optimizers.SGD(0.01)
    task_loss = keras.losses.SparseCategoricalCrossentropy()
    kl = keras.losses.KLDivergence()

    @tf.function(jit_compile=jit_compile)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            p_clean = model(xb, training=True)
            loss = task_loss(yb, p_clean)
            if stability:
                noise = tf.random.normal(tf.shape(xb), stddev=SIGMA)
                p_noisy = model(xb + noise, training=True)
                loss += ALPHA * kl(p_clean, p_noisy)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        batch_size, drop_remainder=True
    )

    def epoch():
        for xb, yb in dataset:
            step(xb, yb)

    epoch.model = model
    return epoch


def _jax_hand_loop(x, y, batch_size, stability=True):
    import jax

    model = small_cnn()
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(model.trainable_variables)
    task_loss = keras.losses.SparseCategoricalCrossentropy()
    kl = keras.losses.KLDivergence()

    def loss_fn(trainable, non_trainable, xb, yb, key):
        p_clean, non_trainable = model.stateless_call(
            trainable, non_trainable, xb, training=True
        )
        loss = task_loss(yb, p_clean)
        if stability:
            noise = SIGMA * jax.random.normal(key, xb.shape)
            p_noisy, non_trainable = model.stateless_call(
                trainable, non_trainable, xb + noise, training=True
            )
            loss += ALPHA * kl(p_clean, p_noisy)
        return loss, non_trainable

    @jax.jit
    def step(state, xb, yb, key):
        trainable, non_trainable, opt_vars = state
        (_, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable, xb, yb, key
        )
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return trainable, non_trainable, opt_vars

    state = [
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    ]
    key = jax.random.PRNGKey(0)

    def epoch():
        nonlocal state, key
        for xb, yb in _batches(x, y, batch_size):
            key, sub = jax.random.split(key)
            state = step(state, xb, yb, sub)
        jax.block_until_ready(state)
        # Once per epoch, so the model holds what the loop trained.
        for variable, value in zip(model.trainable_variables, state[0]):
            variable.assign(value)

    epoch.model = model
    return epoch


def _torch_hand_loop(x, y, batch_size, stability=True):
    import torch

    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()

    def epoch():
        for start in range(0, len(xt) - batch_size + 1, batch_size):
            xb, yb = xt[start : start + batch_size], yt[start : start + batch_size]
            p_clean = model(xb, training=True)
            loss = torch.nn.functional.nll_loss(torch.log(p_clean.clamp_min(1e-7)), yb)
            if stability:
                p_noisy = model(xb + SIGMA * torch.randn_like(xb), training=True)
                log_p = p_clean.clamp_min(1e-7).log()
                log_q = p_noisy.clamp_min(1e-7).log()
                loss = loss + ALPHA * (p_clean * (log_p - log_q)).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    epoch.model = model
    return epoch


HAND_LOOPS = {
    "tensorflow": _tf_hand_loop,
    "jax": _jax_hand_loop,
    "torch": _torch_hand_loop,
}


def time_epochs(methods, epochs):
    """Runs one warm-up epoch per method, then `epochs` interleaved rounds."""
    times = {name: [] for name in methods}
    for run in methods.values():
        run()
    for _ in range(epochs):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=10, help="timed epochs per method"
    )
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.random((args.samples, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, args.samples).astype("int32")
    backend = keras.backend.backend()
    methods = {
        "plain fit": make_plain(x, y, args.batch_size),
        "StabilityModel": make_stability(x, y, args.batch_size),
        "hand loop": HAND_LOOPS[backend](x, y, args.batch_size),
        # What the bare loop costs without the second pass: the gap to
        # "plain fit" is the cost of fit's own machinery.
        "hand loop, L0 only": HAND_LOOPS[backend](
            x, y, args.batch_size, stability=False
        ),
    }
    if backend == "tensorflow":
        # fit's jit_compile="auto" uses XLA on TensorFlow only with a GPU; a
        # hand loop gets it only when asked: time both, XLA on CPU is slower.
        methods["hand loop (XLA)"] = _tf_hand_loop(
            x, y, args.batch_size, jit_compile=True
        )
    times = time_epochs(methods, args.epochs)
    print(
        f"backend={backend} samples={args.samples} batch={args.batch_size} "
        f"timed epochs={args.epochs}"
    )
    print(markdown_table(times))


def markdown_table(times):
    """Min and median s/epoch per method and their ratios to plain `fit`.

    The minimum is the least disturbed by other load on the machine (on a
    shared 2-core machine single epochs vary by up to 1.5x); the median shows
    the typical epoch.
    """
    floor_min = min(times["plain fit"])
    floor_median = statistics.median(times["plain fit"])
    lines = [
        "| method | min s/epoch | median s/epoch | ratio (min) | ratio (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in times.items():
        low, median = min(values), statistics.median(values)
        lines.append(
            f"| {name} | {low:.3f} | {median:.3f} | {low / floor_min:.2f}x "
            f"| {median / floor_median:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
