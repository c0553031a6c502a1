"""The README quickstart: stability training on the 5,000 offline MNIST digits."""

import keras

import keras_stability as ks

(x_train, y_train), (x_test, y_test) = ks.datasets.load_mnist()  # uint8, offline
base = keras.Sequential([
    keras.Input((28, 28, 1)),
    keras.layers.Rescaling(1 / 255),
    keras.layers.Conv2D(16, 3, activation="relu"),
    keras.layers.MaxPooling2D(),
    keras.layers.Flatten(),
    keras.layers.Dense(10, activation="softmax"),
])
model = ks.StabilityModel(  # L0(x) + alpha * KL(f(x) || f(x')), x' = x + N(0, sigma^2)
    base, alpha=0.01, perturbation=ks.GaussianPerturbation(0.04, value_range=(0, 255))
)
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(x_train, y_train, epochs=2, batch_size=64, validation_data=(x_test, y_test))
base.save("mnist_stable.keras")  # the wrapped model is a plain Keras model again
