"""Trains the same StabilityModel on one device and on two; prints the gap.

Run in a subprocess, since the device layout must be set before the backend
starts: `python _distributed_worker.py tensorflow|jax`.
"""

import os
import sys

BACKEND = sys.argv[1]
os.environ["KERAS_BACKEND"] = BACKEND
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_stability import StabilityModel  # noqa: E402

rng = np.random.default_rng(0)
X = rng.random((64, 6)).astype("float32")
Y = rng.integers(0, 3, 64)
INITIAL = [rng.normal(0, 0.5, (6, 3)), rng.normal(0, 0.1, 3)]


def train():
    base = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(3, activation="softmax")]
    )
    base.set_weights(INITIAL)
    # A deterministic perturbation: the two devices must see the same x'.
    model = StabilityModel(
        base, alpha=0.8, perturbation=keras.layers.Rescaling(0.7, offset=0.2)
    )
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    model.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return base.get_weights()


if BACKEND == "tensorflow":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    single = train()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        distributed = train()
else:
    single = train()
    devices = keras.distribution.list_devices()
    assert len(devices) == 2, devices
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    distributed = train()

gap = max(float(np.abs(a - b).max()) for a, b in zip(single, distributed))
moved = max(float(np.abs(a - b).max()) for a, b in zip(single, INITIAL))
print(f"GAP {gap:.3e} MOVED {moved:.3e}")
