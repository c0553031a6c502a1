import os

# Quiet TensorFlow's start-up logging in the test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    # Seeds only: keras.backend.clear_session() costs ~0.5 s a test and no
    # test depends on fresh layer-name counters.
    keras.utils.set_random_seed(1234)
    yield
