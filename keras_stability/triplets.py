"""Triplet sampling for the similar-image ranking setting of the paper (§3.3).

A ranking triplet `(q, p, n)` holds a query patch `q`, a positive `p` that is
a near-duplicate of `q` (the same region, shifted by a few pixels and
optionally slightly rescaled) and a negative `n` that is less similar to `q`
than `p` is: either a patch of another photograph, or a distant patch of the
same photograph. The latter mirrors the paper's dissimilar pairs, which come
from the same search query (§5.1) and so share content and style.

`TripletSampler` draws triplets (uint8, with metadata saying where each patch
came from); `TripletPyDataset` and `as_tf_dataset` feed them to
`Model.fit` as `x = (q, p, n)` float32 batches in [0, 1], without targets.

Split the photographs first (`datasets.split_photographs`) and build one
sampler per part: a sampler only ever reads the photographs it was given.
"""

from typing import NamedTuple

import keras
import numpy as np

from keras_stability.datasets import as_photographs, patch_std

# Redraws of queries (too flat) and of same-photograph negatives (too close)
# before giving up or falling back to a constructive draw.
_MAX_QUERY_ROUNDS = 100
_MAX_NEGATIVE_ROUNDS = 32


class Triplets(NamedTuple):
    """A batch of triplets: uint8 (n, size, size, 3) arrays plus metadata.

    `metadata` maps names to int arrays of shape (n,): `query_image`,
    `query_y`, `query_x`, `positive_image`, `positive_y`, `positive_x`,
    `positive_size` (side of the window the positive was resized from),
    `negative_image`, `negative_y`, `negative_x`, and the bool array
    `same_image_negative`. Image ids index `TripletSampler.names`; positions
    are top-left corners in pixels.
    """

    query: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    metadata: dict


class TripletSampler:
    """Draws ranking triplets `(q, p, n)` of patches from photographs.

    Every triplet is drawn as follows. With probability
    `same_image_negative_fraction` the negative comes from the query's own
    photograph, at a Chebyshev distance `max(|dy|, |dx|)` of at least
    `min_negative_distance` pixels between top-left corners; otherwise it is
    a uniformly placed patch of another photograph. The query's photograph is
    chosen uniformly (among those large enough for a same-photograph negative
    when one is needed) and its position uniformly, redrawn while the patch
    is flatter than `min_std`. The positive's top-left corner is within
    `max_shift` pixels of the query's on each axis; with
    `max_scale_change > 0` its window side is also scaled by a factor in
    `[1 - max_scale_change, 1 + max_scale_change]` and resized back to
    `patch_size` with Pillow (a thumbnailing-like near-duplicate).

    Args:
        photographs: List of `Photograph` / `(name, image)` tuples or uint8
            (H, W, 3) arrays, e.g. from `datasets.load_photographs()`.
            Downscale them first (`datasets.resize_photographs`) for patches
            that cover more of each scene.
        patch_size: Side of the square patches, at most the smallest
            photograph side.
        max_shift: Largest shift in pixels between query and positive, per
            axis, in `[0, patch_size)` so that they always overlap.
        min_negative_distance: Smallest Chebyshev distance in pixels between
            a query and a same-photograph negative; must exceed `max_shift`.
            Defaults to `patch_size` (the two patches do not overlap).
        same_image_negative_fraction: Fraction in [0, 1] of triplets whose
            negative comes from the query's photograph.
        max_scale_change: Largest relative change of the positive's window
            side, in [0, 1); 0 means positives are pure shifts.
        min_std: Queries whose pixel standard deviation (0-255 scale) is
            below this are redrawn: a flat patch (black border, clear sky)
            cannot be told apart from a flat negative.
        seed: Seed of the sampler's own random generator, or None.

    Example:

    >>> from keras_stability.datasets import load_photographs
    >>> sampler = TripletSampler(load_photographs(), patch_size=32, seed=0)
    >>> q, p, n, metadata = sampler.sample(8)
    >>> q.shape, q.dtype
    ((8, 32, 32, 3), dtype('uint8'))
    """

    def __init__(
        self,
        photographs,
        patch_size=32,
        max_shift=4,
        min_negative_distance=None,
        same_image_negative_fraction=0.5,
        max_scale_change=0.0,
        min_std=2.0,
        seed=0,
    ):
        self.photographs = as_photographs(photographs)
        self.patch_size = patch_size
        self.max_shift = max_shift
        self.min_negative_distance = (
            patch_size if min_negative_distance is None else min_negative_distance
        )
        self.same_image_negative_fraction = same_image_negative_fraction
        self.max_scale_change = max_scale_change
        self.min_std = min_std
        self.seed = seed
        self._validate()
        self._shapes = np.array([image.shape[:2] for _, image in self.photographs])
        # Number of valid top-left positions per axis, for each photograph.
        self._grid = self._shapes - patch_size + 1
        self._same_image_ok = np.flatnonzero(
            self._grid.max(axis=1) - 1 >= self.min_negative_distance
        )
        self._check_negative_sources()
        self._rng = np.random.default_rng(seed)

    @property
    def names(self):
        """Names of the photographs, indexed by the metadata's image ids."""
        return [name for name, _ in self.photographs]

    def _validate(self):
        """Raises ValueError naming the first invalid argument."""
        smallest = min(min(image.shape[:2]) for _, image in self.photographs)
        if not _is_int(self.patch_size) or not 1 <= self.patch_size <= smallest:
            raise ValueError(
                f"`patch_size` must be an integer in [1, {smallest}] (the "
                "smallest photograph side; resize or drop small photographs). "
                f"Received: patch_size={self.patch_size}"
            )
        if not _is_int(self.max_shift) or not 0 <= self.max_shift < self.patch_size:
            raise ValueError(
                f"`max_shift` must be an integer in [0, patch_size={self.patch_size})"
                f" so that positives overlap queries. Received: "
                f"max_shift={self.max_shift}"
            )
        if (
            not _is_int(self.min_negative_distance)
            or self.min_negative_distance <= self.max_shift
        ):
            raise ValueError(
                "`min_negative_distance` must be an integer > max_shift="
                f"{self.max_shift}, so that negatives lie farther than positives."
                f" Received: min_negative_distance={self.min_negative_distance}"
            )
        _check_fraction(
            self.same_image_negative_fraction, "same_image_negative_fraction"
        )
        if not 0.0 <= self.max_scale_change < 1.0:
            raise ValueError(
                "`max_scale_change` must be in [0, 1). Received: "
                f"max_scale_change={self.max_scale_change}"
            )
        if not self.min_std >= 0.0:
            raise ValueError(
                f"`min_std` must be >= 0. Received: min_std={self.min_std}"
            )

    def _check_negative_sources(self):
        """Raises ValueError when a requested kind of negative cannot exist."""
        fraction = self.same_image_negative_fraction
        if fraction < 1.0 and len(self.photographs) < 2:
            raise ValueError(
                "Negatives from other photographs need at least 2 `photographs`; "
                "got 1. Pass more photographs or same_image_negative_fraction=1."
            )
        if fraction > 0.0 and len(self._same_image_ok) == 0:
            raise ValueError(
                f"`min_negative_distance`={self.min_negative_distance} is too large:"
                " no photograph fits two patches that far apart. Lower it, use "
                "larger photographs or same_image_negative_fraction=0."
            )

    def sample(self, n, seed=None):
        """Draws `n` triplets.

        Args:
            n: Number of triplets, >= 1.
            seed: Optional seed (int or sequence of ints) for this draw only;
                by default the sampler's own generator is used and advanced.

        Returns:
            A `Triplets(query, positive, negative, metadata)` tuple.

        Example:

        >>> from keras_stability.datasets import load_photographs
        >>> sampler = TripletSampler(load_photographs(), seed=0)
        >>> triplets = sampler.sample(4, seed=1)
        >>> triplets.negative.shape
        (4, 32, 32, 3)
        """
        if not _is_int(n) or n < 1:
            raise ValueError(f"`n` must be an integer >= 1. Received: n={n}")
        rng = self._rng if seed is None else np.random.default_rng(seed)
        same = rng.random(n) < self.same_image_negative_fraction
        q_img, q_y, q_x = self._sample_queries(rng, same)
        p_y, p_x, p_size = self._sample_positives(rng, q_img, q_y, q_x)
        n_img, n_y, n_x = self._sample_negatives(rng, same, q_img, q_y, q_x)
        metadata = {
            "query_image": q_img,
            "query_y": q_y,
            "query_x": q_x,
            "positive_image": q_img.copy(),
            "positive_y": p_y,
            "positive_x": p_x,
            "positive_size": p_size,
            "negative_image": n_img,
            "negative_y": n_y,
            "negative_x": n_x,
            "same_image_negative": same,
        }
        return Triplets(
            self._crop(q_img, q_y, q_x),
            self._crop(q_img, p_y, p_x, p_size),
            self._crop(n_img, n_y, n_x),
            metadata,
        )

    def _sample_queries(self, rng, same):
        """Draws query photographs and positions, redrawing flat patches."""
        n = len(same)
        images = np.empty(n, dtype="int64")
        ys, xs = np.empty(n, dtype="int64"), np.empty(n, dtype="int64")
        todo = np.arange(n)
        for _ in range(_MAX_QUERY_ROUNDS):
            images[todo] = self._sample_query_images(rng, same[todo])
            ys[todo], xs[todo] = self._uniform_positions(rng, images[todo])
            todo = todo[~self._query_ok(images[todo], ys[todo], xs[todo], same[todo])]
            if len(todo) == 0:
                return images, ys, xs
        raise RuntimeError(
            f"Could not draw queries with min_std={self.min_std} after "
            f"{_MAX_QUERY_ROUNDS} rounds; the photographs are too flat. Lower "
            "`min_std`."
        )

    def _sample_query_images(self, rng, same):
        """Chooses query photographs uniformly among those that qualify."""
        any_image = rng.integers(0, len(self.photographs), size=len(same))
        if len(self._same_image_ok) == 0:
            return any_image
        eligible = self._same_image_ok[
            rng.integers(0, len(self._same_image_ok), size=len(same))
        ]
        return np.where(same, eligible, any_image)

    def _uniform_positions(self, rng, images):
        """Draws uniform top-left corners of patches in the given photographs."""
        grid = self._grid[images]
        return _uniform_below(rng, grid[:, 0]), _uniform_below(rng, grid[:, 1])

    def _query_ok(self, images, ys, xs, same):
        """Whether each query is textured enough and, if needed, has a far spot."""
        ok = patch_std(self._crop(images, ys, xs)) >= self.min_std
        # Same-photograph queries also need room for a negative that far away.
        return ok & (~same | self._has_far_position(images, ys, xs))

    def _has_far_position(self, images, ys, xs):
        """Whether some position is at least min_negative_distance away."""
        d = self.min_negative_distance
        last = self._grid[images] - 1
        far_y = np.maximum(ys, last[:, 0] - ys) >= d
        far_x = np.maximum(xs, last[:, 1] - xs) >= d
        return far_y | far_x

    def _sample_positives(self, rng, images, q_y, q_x):
        """Draws positive windows near the queries (shifted, maybe rescaled)."""
        size = np.full(len(images), self.patch_size, dtype="int64")
        if self.max_scale_change > 0:
            factor = rng.uniform(
                1 - self.max_scale_change, 1 + self.max_scale_change, len(images)
            )
            size = np.maximum(1, np.round(self.patch_size * factor)).astype("int64")
            # Keep the window inside the photograph while its corner stays
            # within max_shift of the query's corner.
            heights, widths = self._shapes[images].T
            limit = np.minimum(heights - q_y, widths - q_x) + self.max_shift
            size = np.minimum(size, np.minimum(limit, np.minimum(heights, widths)))
        heights, widths = self._shapes[images].T
        p_y = self._near(rng, q_y, heights - size)
        p_x = self._near(rng, q_x, widths - size)
        return p_y, p_x, size

    def _near(self, rng, centre, upper):
        """Uniform integers within max_shift of `centre`, clipped to [0, upper]."""
        low = np.maximum(0, centre - self.max_shift)
        high = np.minimum(upper, centre + self.max_shift)
        return low + _uniform_below(rng, high - low + 1)

    def _sample_negatives(self, rng, same, q_img, q_y, q_x):
        """Draws negatives: far in the same photograph, or another photograph."""
        n_img = self._other_images(rng, q_img)
        n_img[same] = q_img[same]
        n_y, n_x = self._uniform_positions(rng, n_img)
        todo = np.flatnonzero(same)
        for _ in range(_MAX_NEGATIVE_ROUNDS):
            todo = todo[~self._far_enough(n_y[todo], n_x[todo], q_y[todo], q_x[todo])]
            if len(todo) == 0:
                return n_img, n_y, n_x
            n_y[todo], n_x[todo] = self._uniform_positions(rng, n_img[todo])
        # Rare: the only far positions are a thin margin; construct them.
        n_y[todo], n_x[todo] = self._construct_far(
            rng, n_img[todo], q_y[todo], q_x[todo]
        )
        return n_img, n_y, n_x

    def _other_images(self, rng, images):
        """Draws, for each image id, a uniformly chosen different image id."""
        if len(self.photographs) < 2:
            return images.copy()
        offset = rng.integers(1, len(self.photographs), size=len(images))
        return (images + offset) % len(self.photographs)

    def _far_enough(self, n_y, n_x, q_y, q_x):
        """Whether negatives are at least min_negative_distance from queries."""
        distance = np.maximum(np.abs(n_y - q_y), np.abs(n_x - q_x))
        return distance >= self.min_negative_distance

    def _construct_far(self, rng, images, q_y, q_x):
        """Places negatives far along one feasible axis, uniform on the other."""
        last = self._grid[images] - 1
        n_y, n_x = self._uniform_positions(rng, images)
        far_y = np.maximum(q_y, last[:, 0] - q_y) >= self.min_negative_distance
        along_y = far_y & ((rng.random(len(images)) < 0.5) | ~self._far_x(q_x, last))
        n_y[along_y] = self._far_coordinate(rng, q_y[along_y], last[along_y, 0])
        n_x[~along_y] = self._far_coordinate(rng, q_x[~along_y], last[~along_y, 1])
        return n_y, n_x

    def _far_x(self, q_x, last):
        """Whether a far position exists along x."""
        return np.maximum(q_x, last[:, 1] - q_x) >= self.min_negative_distance

    def _far_coordinate(self, rng, centre, last):
        """Uniform integers in [0, last] at least min_negative_distance from centre."""
        d = self.min_negative_distance
        below = np.maximum(0, centre - d + 1)  # count of values <= centre - d
        above = np.maximum(0, last - (centre + d) + 1)  # values >= centre + d
        pick = _uniform_below(rng, below + above)
        return np.where(pick < below, pick, centre + d + (pick - below))

    def _crop(self, images, ys, xs, sizes=None):
        """Crops patches, resizing windows of another size to patch_size."""
        size = self.patch_size
        sizes = np.full(len(images), size) if sizes is None else sizes
        out = np.empty((len(images), size, size, 3), dtype="uint8")
        for i, (image, y, x, s) in enumerate(zip(images, ys, xs, sizes, strict=True)):
            window = self.photographs[image].image[y : y + s, x : x + s]
            out[i] = window if s == size else _resize_patch(window, size)
        return out


def _resize_patch(window, size):
    """Resizes a uint8 window to (size, size) with Pillow."""
    from PIL import Image

    image = Image.fromarray(window).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _uniform_below(rng, upper):
    """Uniform integers in [0, upper) for an array of positive bounds."""
    return np.minimum(
        (rng.random(np.shape(upper)) * upper).astype("int64"), np.asarray(upper) - 1
    )


def _is_int(value):
    """Whether `value` is an integer (and not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_fraction(value, name):
    """Raises ValueError unless `value` is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ValueError(f"`{name}` must be a number in [0, 1]. Received: {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1]. Received: {name}={value}")


def to_model_inputs(triplets):
    """Converts `Triplets` to the model input `(q, p, n)` of float32 in [0, 1].

    Args:
        triplets: A `Triplets` tuple from `TripletSampler.sample`.

    Returns:
        A tuple of three float32 arrays of shape (n, size, size, 3).

    Example:

    >>> from keras_stability.datasets import load_photographs
    >>> sampler = TripletSampler(load_photographs())
    >>> q, p, n = to_model_inputs(sampler.sample(8))
    >>> float(q.max()) <= 1.0
    True
    """
    return tuple(
        part.astype("float32") / np.float32(255.0)
        for part in (triplets.query, triplets.positive, triplets.negative)
    )


class TripletPyDataset(keras.utils.PyDataset):
    """Feeds ranking triplets to `Model.fit` as batches `((q, p, n),)`.

    Each batch is `x = (q, p, n)`, three float32 arrays of shape
    (batch_size, patch_size, patch_size, 3) with values in [0, 1] (the range
    the paper's noise σ is defined on), and no targets: a triplet model
    computes its loss from `x` alone. A batch is a pure function of
    `(seed, epoch, index)`, so runs are reproducible with any number of
    workers; with `resample_each_epoch=False` every epoch (e.g. a validation
    set) sees the same batches.

    Args:
        sampler: A `TripletSampler`.
        batch_size: Triplets per batch.
        steps_per_epoch: Batches per epoch (`len(dataset)`).
        seed: Integer seed; defaults to the sampler's seed (0 if None).
        resample_each_epoch: Draw new triplets every epoch.
        **kwargs: `workers`, `use_multiprocessing`, `max_queue_size` of
            `keras.utils.PyDataset`.

    Example:

    >>> from keras_stability.datasets import load_photographs
    >>> sampler = TripletSampler(load_photographs(), patch_size=32)
    >>> dataset = TripletPyDataset(sampler, batch_size=16, steps_per_epoch=50)
    >>> ((q, p, n),) = dataset[0]
    >>> q.shape, q.dtype
    ((16, 32, 32, 3), dtype('float32'))
    >>> triplet_model.fit(dataset, epochs=2)  # doctest: +SKIP
    """

    def __init__(
        self,
        sampler,
        batch_size=32,
        steps_per_epoch=100,
        seed=None,
        resample_each_epoch=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(sampler, TripletSampler):
            raise ValueError(
                "`sampler` must be a TripletSampler. "
                f"Received: {type(sampler).__name__}"
            )
        for value, name in (
            (batch_size, "batch_size"),
            (steps_per_epoch, "steps_per_epoch"),
        ):
            if not _is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1. Received: {value}")
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise ValueError(f"`seed` must be an integer >= 0. Received: seed={seed}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.seed = (sampler.seed or 0) if seed is None else seed
        self.resample_each_epoch = resample_each_epoch
        self.epoch = 0

    def __len__(self):
        """Number of batches per epoch."""
        return self.steps_per_epoch

    def __getitem__(self, index):
        """Returns batch `index` of the current epoch as `((q, p, n),)`."""
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"Batch index {index} out of range [0, {len(self)}).")
        epoch = self.epoch if self.resample_each_epoch else 0
        triplets = self.sampler.sample(self.batch_size, seed=(self.seed, epoch, index))
        return (to_model_inputs(triplets),)

    def on_epoch_end(self):
        """Moves to the next epoch's triplets."""
        # `epoch` counts these calls; Keras also makes one as `fit` starts,
        # which shifts every epoch by one but keeps runs reproducible.
        self.epoch += 1


def as_tf_dataset(
    sampler, batch_size=32, steps_per_epoch=100, seed=None, resample_each_epoch=True
):
    """Wraps a `TripletSampler` as a `tf.data.Dataset` of `((q, p, n),)`.

    Same batches as `TripletPyDataset` with the same arguments; each new
    iteration over the dataset (epoch) draws the next epoch's triplets.
    Needs TensorFlow.

    Args:
        sampler: A `TripletSampler`.
        batch_size: Triplets per batch.
        steps_per_epoch: Batches per iteration over the dataset.
        seed: Integer seed; defaults to the sampler's seed (0 if None).
        resample_each_epoch: Draw new triplets every iteration.

    Returns:
        A finite `tf.data.Dataset` of `steps_per_epoch` batches.

    Example:

    >>> from keras_stability.datasets import load_photographs
    >>> sampler = TripletSampler(load_photographs())
    >>> dataset = as_tf_dataset(sampler, batch_size=16, steps_per_epoch=10)
    >>> triplet_model.fit(dataset, epochs=2)  # doctest: +SKIP
    """
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            "`as_tf_dataset` needs TensorFlow; use `TripletPyDataset` instead."
        ) from error
    source = TripletPyDataset(
        sampler, batch_size, steps_per_epoch, seed, resample_each_epoch
    )
    epochs = iter(range(2**62))

    def generate():
        # Called once per iteration over the dataset, i.e. once per epoch.
        source.epoch = next(epochs)
        for index in range(len(source)):
            yield source[index]

    size = sampler.patch_size
    spec = tf.TensorSpec((None, size, size, 3), tf.float32)
    return tf.data.Dataset.from_generator(
        generate, output_signature=((spec, spec, spec),)
    ).prefetch(tf.data.AUTOTUNE)
