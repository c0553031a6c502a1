"""Tests for keras_stability.triplets: ranking triplets (paper §3.3)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_stability import datasets
from keras_stability.triplets import (
    TripletPyDataset,
    Triplets,
    TripletSampler,
    as_tf_dataset,
    to_model_inputs,
)

PATCH = 32


@pytest.fixture(scope="module")
def photographs():
    # Downscaled so that a patch covers a meaningful part of each scene.
    return datasets.resize_photographs(datasets.load_photographs(), max_side=160)


@pytest.fixture(scope="module")
def sampler(photographs):
    return TripletSampler(photographs, patch_size=PATCH, max_shift=4, seed=0)


@pytest.fixture(scope="module")
def triplets(sampler):
    return sampler.sample(400)


def _chebyshev(metadata, other):
    return np.maximum(
        np.abs(metadata[f"{other}_y"] - metadata["query_y"]),
        np.abs(metadata[f"{other}_x"] - metadata["query_x"]),
    )


def _crop(sampler, image_id, y, x, size=PATCH):
    return sampler.photographs[image_id].image[y : y + size, x : x + size]


# What the triplets claim to be ------------------------------------------------


def test_shapes_and_dtypes(triplets):
    assert isinstance(triplets, Triplets)
    for part in (triplets.query, triplets.positive, triplets.negative):
        assert part.shape == (400, PATCH, PATCH, 3) and part.dtype == np.uint8
    assert all(len(values) == 400 for values in triplets.metadata.values())


def test_positives_overlap_the_query(sampler, triplets):
    metadata = triplets.metadata
    np.testing.assert_array_equal(metadata["positive_image"], metadata["query_image"])
    assert _chebyshev(metadata, "positive").max() <= sampler.max_shift
    np.testing.assert_array_equal(metadata["positive_size"], PATCH)


def test_negatives_are_other_images_or_far_away(sampler, triplets):
    metadata = triplets.metadata
    same = metadata["same_image_negative"]
    assert 0 < same.sum() < len(same)
    np.testing.assert_array_equal(
        metadata["negative_image"][same], metadata["query_image"][same]
    )
    assert (metadata["negative_image"][~same] != metadata["query_image"][~same]).all()
    assert _chebyshev(metadata, "negative")[same].min() >= PATCH  # the default


def test_patches_are_the_crops_the_metadata_names(sampler, triplets):
    metadata = triplets.metadata
    for i in range(0, 400, 23):
        for part, name in ((triplets.query, "query"), (triplets.negative, "negative")):
            expected = _crop(
                sampler,
                metadata[f"{name}_image"][i],
                metadata[f"{name}_y"][i],
                metadata[f"{name}_x"][i],
            )
            np.testing.assert_array_equal(part[i], expected)
        expected = _crop(
            sampler,
            metadata["positive_image"][i],
            metadata["positive_y"][i],
            metadata["positive_x"][i],
        )
        np.testing.assert_array_equal(triplets.positive[i], expected)


def test_queries_are_not_flat(sampler, triplets):
    stds = datasets.patch_std(triplets.query)
    assert stds.min() >= sampler.min_std


def test_flat_regions_are_never_queries():
    photo = np.zeros((64, 128, 3), "uint8")
    photo[:, 64:] = np.random.default_rng(0).integers(0, 255, (64, 64, 3))
    sampler = TripletSampler([photo], same_image_negative_fraction=1.0, seed=0)
    metadata = sampler.sample(200).metadata
    assert metadata["query_x"].min() > 64 - PATCH


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_same_image_negative_fraction(photographs, fraction):
    sampler = TripletSampler(photographs, same_image_negative_fraction=fraction, seed=1)
    share = sampler.sample(1000).metadata["same_image_negative"].mean()
    assert abs(share - fraction) < 0.05


def test_far_negatives_in_a_narrow_photograph():
    # Far spots exist only near the ends: exercises the constructive fallback.
    photo = np.random.default_rng(0).integers(0, 255, (40, 200, 3), dtype="uint8")
    sampler = TripletSampler(
        [photo],
        max_shift=2,
        min_negative_distance=84,
        same_image_negative_fraction=1.0,
        seed=0,
    )
    metadata = sampler.sample(300).metadata
    assert _chebyshev(metadata, "negative").min() >= 84
    assert metadata["negative_x"].max() <= 200 - PATCH


def test_rescaled_positives_stay_inside_and_near(photographs):
    sampler = TripletSampler(
        photographs, max_shift=3, max_scale_change=0.25, min_std=0, seed=2
    )
    triplets = sampler.sample(300)
    metadata = triplets.metadata
    sizes = metadata["positive_size"]
    assert sizes.min() >= round(PATCH * 0.75) and sizes.max() <= round(PATCH * 1.25)
    assert len(np.unique(sizes)) > 5
    assert _chebyshev(metadata, "positive").max() <= 3
    shapes = np.array([p.image.shape[:2] for p in sampler.photographs])
    corner = np.stack([metadata["positive_y"], metadata["positive_x"]], axis=1)
    assert (corner + sizes[:, None] <= shapes[metadata["positive_image"]]).all()
    assert triplets.positive.shape == (300, PATCH, PATCH, 3)


# Reproducibility and splits ---------------------------------------------------


def _assert_same(a, b):
    for left, right in zip(a[:3], b[:3], strict=True):
        np.testing.assert_array_equal(left, right)


def test_seeded_reproducibility(photographs):
    first = TripletSampler(photographs, seed=5)
    second = TripletSampler(photographs, seed=5)
    _assert_same(first.sample(50), second.sample(50))
    _assert_same(first.sample(20, seed=(1, 2)), second.sample(20, seed=(1, 2)))
    other = TripletSampler(photographs, seed=6).sample(50)
    assert not np.array_equal(
        other.query, TripletSampler(photographs, seed=5).sample(50).query
    )


def test_train_sampler_never_touches_test_photographs(photographs):
    train, test = datasets.split_photographs(photographs, test_fraction=0.3, seed=0)
    sampler = TripletSampler(train, seed=0)
    metadata = sampler.sample(500).metadata
    test_names = {p.name for p in test}
    for key in ("query_image", "positive_image", "negative_image"):
        used = {sampler.names[i] for i in np.unique(metadata[key])}
        assert used.isdisjoint(test_names)
        assert used <= {p.name for p in train}


# Feeding Keras ------------------------------------------------------------------


def test_pydataset_batch_structure(sampler):
    dataset = TripletPyDataset(sampler, batch_size=8, steps_per_epoch=3, seed=0)
    assert len(dataset) == 3
    batch = dataset[1]
    assert isinstance(batch, tuple) and len(batch) == 1  # x only, no targets
    (x,) = batch
    assert isinstance(x, tuple) and len(x) == 3
    for part in x:
        assert part.shape == (8, PATCH, PATCH, 3) and part.dtype == np.float32
        assert 0.0 <= part.min() and part.max() <= 1.0
    with pytest.raises(IndexError):
        dataset[3]


def test_pydataset_is_deterministic_per_seed_epoch_and_index(sampler):
    dataset = TripletPyDataset(sampler, batch_size=4, steps_per_epoch=2, seed=3)
    again = TripletPyDataset(sampler, batch_size=4, steps_per_epoch=2, seed=3)
    _assert_same(dataset[1][0], again[1][0])
    assert not np.array_equal(dataset[0][0][0], dataset[1][0][0])
    first_epoch = dataset[0][0]
    dataset.on_epoch_end()
    assert not np.array_equal(first_epoch[0], dataset[0][0][0])
    fixed = TripletPyDataset(
        sampler, batch_size=4, steps_per_epoch=2, seed=3, resample_each_epoch=False
    )
    before = fixed[0][0]
    fixed.on_epoch_end()
    _assert_same(before, fixed[0][0])


def test_to_model_inputs_scales_to_unit_range(triplets):
    q, p, n = to_model_inputs(triplets)
    np.testing.assert_allclose(q * 255.0, triplets.query, atol=1e-3)
    assert p.dtype == n.dtype == np.float32


class TinyTripletModel(keras.Model):
    """Embeds (q, p, n) with one shared network; triplet hinge loss, no y."""

    def __init__(self):
        super().__init__(name="tiny_triplet_model")
        self.embed = keras.Sequential(
            [
                keras.layers.Conv2D(4, 3, strides=4),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(4),
            ]
        )

    def call(self, inputs):
        q, p, n = inputs
        return ops.stack([self.embed(q), self.embed(p), self.embed(n)], axis=1)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kw):
        assert y is None
        positive = ops.sum(ops.square(y_pred[:, 0] - y_pred[:, 1]), axis=-1)
        negative = ops.sum(ops.square(y_pred[:, 0] - y_pred[:, 2]), axis=-1)
        return ops.mean(ops.relu(1.0 + positive - negative))


def test_fit_accepts_the_pydataset(sampler):
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    dataset = TripletPyDataset(sampler, batch_size=8, steps_per_epoch=2, seed=0)
    model = TinyTripletModel()
    model.compile(optimizer="sgd")
    history = model.fit(dataset, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert np.isfinite(history.history["loss"]).all()
    # Keras calls on_epoch_end after each epoch (and once as fit starts).
    assert dataset.epoch >= 2


def test_as_tf_dataset_matches_pydataset(sampler):
    pytest.importorskip("tensorflow")
    dataset = as_tf_dataset(sampler, batch_size=4, steps_per_epoch=2, seed=7)
    batches = list(dataset.as_numpy_iterator())
    assert len(batches) == 2
    expected = TripletPyDataset(sampler, batch_size=4, steps_per_epoch=2, seed=7)
    _assert_same(batches[1][0], expected[1][0])
    next_epoch = next(iter(dataset))[0][0].numpy()
    assert not np.array_equal(next_epoch, batches[0][0][0])


# Bad inputs ----------------------------------------------------------------------


BAD_SAMPLER_ARGUMENTS = [
    ({"patch_size": 10_000}, "patch_size"),
    ({"patch_size": 0}, "patch_size"),
    ({"patch_size": 16.0}, "patch_size"),
    ({"max_shift": -1}, "max_shift"),
    ({"max_shift": PATCH}, "max_shift"),
    ({"min_negative_distance": 4}, "min_negative_distance"),
    ({"min_negative_distance": 10_000}, "min_negative_distance"),
    ({"same_image_negative_fraction": -0.1}, "same_image_negative_fraction"),
    ({"same_image_negative_fraction": 1.5}, "same_image_negative_fraction"),
    ({"max_scale_change": 1.0}, "max_scale_change"),
    ({"max_scale_change": -0.1}, "max_scale_change"),
    ({"min_std": -1.0}, "min_std"),
]


def test_sampler_rejects_bad_arguments(photographs):
    # One test, not a parametrization: conftest resets Keras before each test.
    for kwargs, argument in BAD_SAMPLER_ARGUMENTS:
        with pytest.raises(ValueError, match=argument):
            TripletSampler(photographs, **kwargs)


def test_sampler_rejects_bad_photographs(photographs):
    with pytest.raises(ValueError, match="photographs"):
        TripletSampler(photographs[:1])  # other-image negatives need two
    with pytest.raises(ValueError, match="photographs"):
        TripletSampler([np.zeros((64, 64, 3), "float32")] * 2)
    with pytest.raises(ValueError, match="photographs"):
        TripletSampler([])
    single = TripletSampler(photographs[:1], same_image_negative_fraction=1.0)
    assert single.sample(2).metadata["same_image_negative"].all()


def test_sample_and_pydataset_reject_bad_arguments(sampler):
    with pytest.raises(ValueError, match="`n`"):
        sampler.sample(0)
    with pytest.raises(ValueError, match="batch_size"):
        TripletPyDataset(sampler, batch_size=0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        TripletPyDataset(sampler, steps_per_epoch=0)
    with pytest.raises(ValueError, match="sampler"):
        TripletPyDataset("not a sampler")
