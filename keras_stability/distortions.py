"""Natural image distortions of the stability-training paper (§4.2).

Zheng et al. (CVPR 2016) evaluate stabilized networks on copies of the
evaluation images made by common, lossy image processing. This module makes
those copies with Pillow, named as in the paper:

- `jpeg-q`: JPEG encode/decode at quality `q` (`JPEG`).
- `thumb-A`: downscale to a thumbnail of about `A` pixels, keeping the aspect
  ratio, and resize back to the input size (`Thumbnail`).
- `crop-o`: crop a `(w - o) x (h - o)` window at a random position inside the
  image and resize it back to `w x h` (`Crop`).
- `gaussian-s`: additive `N(0, s^2)` noise, `s` in units of the normalised
  `[0, 1]` range, clipped to the range (`Gaussian`; eq. (5) of the paper).

`get("jpeg-50")` turns a name into a `Distortion`; `distort(images, "jpeg-50")`
distorts a batch, seeded and in parallel; `DistortedPyDataset` distorts
batches on the fly for `model.fit/evaluate/predict` on any backend.

Pillow works on 8-bit images: float inputs are mapped to `uint8` by rounding
`(x - lo) / (hi - lo) * 255`, distorted and mapped back, so the outputs of
`jpeg`, `thumb` and `crop` lie on a 256-level grid of the value range (an
error of at most `(hi - lo) / 510` on top of the distortion, the precision of
the 8-bit images the paper distorts). `gaussian` works in floating point and
does not quantise float inputs.

With tf.data, wrap `distort` in `tf.numpy_function` and pass the index of the
batch's first image as `start_index`, so each image gets the same random crop
or noise as in `distort(x_all, ...)`:

```python
ds = tf.data.Dataset.from_tensor_slices(x).batch(32).enumerate()
ds = ds.map(lambda i, xb: tf.numpy_function(
    lambda i, xb: distort(xb, "crop-10", seed=0, start_index=int(i) * 32),
    [i, xb], tf.uint8))
```
"""

import concurrent.futures
import hashlib
import io
import json
import math
import numbers
import os
import re
import tempfile

import keras
import numpy as np
from PIL import Image

__all__ = [
    "Crop",
    "DistortedPyDataset",
    "Distortion",
    "Gaussian",
    "JPEG",
    "Thumbnail",
    "crop_window",
    "distort",
    "get",
    "serialize",
    "thumbnail_size",
]

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# Starting and feeding a thread pool costs ~1 ms; with at least 8 images of
# 224x224 per thread (5-25 ms of Pillow work) that stays under ~10%.
_MIN_PIXELS_PER_WORKER = 8 * 224 * 224

# Bump when the output of a distortion changes, so stale caches are not used.
_CACHE_VERSION = 1


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def _check_int(name, value, minimum=None, maximum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer. Received: {name}={value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (
        maximum is not None and value > maximum
    ):
        bounds = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"`{name}` must be in {bounds}. Received: {name}={value}")
    return value


def _check_resample(resample):
    if resample not in _RESAMPLING:
        raise ValueError(
            f"`resample` must be one of {sorted(_RESAMPLING)}. "
            f"Received: resample={resample!r}"
        )
    return resample


def _check_image(image):
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(
            f"A single image must be uint8 (use `distort` for other dtypes). "
            f"Received: dtype={image.dtype}"
        )
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))):
        raise ValueError(
            "A single image must have shape (H, W) or (H, W, C) with C in {1, 3}. "
            f"Received: shape={image.shape}"
        )
    return image


def _as_rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


# ---------------------------------------------------------------------------
# Pillow round trips
# ---------------------------------------------------------------------------


def _to_pil(image):
    # Pillow has no (H, W, 1) mode: single-channel images are mode "L".
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return Image.fromarray(image)


def _from_pil(pil_image, shape):
    return np.asarray(pil_image).reshape(shape)


def _quantize(unit_image):
    return np.rint(np.clip(unit_image, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------
# Distortions
# ---------------------------------------------------------------------------


class Distortion:
    """Base class of the image distortions.

    A distortion maps one 8-bit image, `(H, W)` or `(H, W, C)` with `C` in
    `{1, 3}`, to an image of the same shape. Subclasses set `name` (the
    paper's string, e.g. `"jpeg-50"`), implement `call(image, rng)` on a
    validated `uint8` array (the result may be read-only) and `get_config()`,
    and set `is_random = True` when `call` draws from `rng`.

    Example:

    >>> class Invert(Distortion):
    ...     name = "invert"
    ...     def call(self, image, rng=None):
    ...         return 255 - image
    >>> Invert().apply(np.zeros((2, 2), "uint8"))[0, 0]
    np.uint8(255)
    """

    name = None
    is_random = False

    def call(self, image, rng=None):
        """Distorts one validated `uint8` image; implemented by subclasses."""
        raise NotImplementedError

    def apply(self, image, rng=None):
        """Distorts one `uint8` image.

        Args:
            image: `uint8` array of shape `(H, W)` or `(H, W, C)`, `C` in
                `{1, 3}`.
            rng: `np.random.Generator`, int seed or `None` (fresh entropy);
                used by random distortions (crop position, noise).

        Returns:
            A new, writable `uint8` array of the same shape.

        Example:

        >>> JPEG(90).apply(np.full((8, 8, 3), 128, "uint8")).shape
        (8, 8, 3)
        """
        image = _check_image(image)
        self.check_image_size(*image.shape[:2])
        rng = _as_rng(rng) if self.is_random else None
        return np.array(self.call(image, rng))

    def __call__(self, image, rng=None):
        return self.apply(image, rng)

    def check_image_size(self, height, width):
        """Raises `ValueError` if images of this size cannot be distorted.

        Args:
            height: image height in pixels.
            width: image width in pixels.

        Returns:
            None.

        Example:

        >>> JPEG(50).check_image_size(32, 32)
        """

    def _apply_unit(self, image, rng):
        # Pillow needs 8-bit images; subclasses that can work on floats
        # (Gaussian) override this to avoid the quantisation.
        distorted = self.call(_quantize(image), rng)
        return distorted.astype(image.dtype) * image.dtype.type(1.0 / 255.0)

    def get_config(self):
        """Returns the constructor arguments as a JSON-friendly dict.

        Returns:
            A dict such that `type(self).from_config(config)` equals `self`.

        Example:

        >>> JPEG(50).get_config()
        {'quality': 50}
        """
        return {}

    @classmethod
    def from_config(cls, config):
        """Creates a distortion from the output of `get_config()`.

        Args:
            config: dict of constructor arguments.

        Returns:
            A new distortion.

        Example:

        >>> JPEG.from_config({"quality": 50}).name
        'jpeg-50'
        """
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, json.dumps(self.get_config())))


class JPEG(Distortion):
    """`jpeg-q`: JPEG encode and decode with Pillow at quality `q`.

    Uses Pillow's defaults otherwise (libjpeg quantisation tables, 4:2:0
    chroma subsampling for RGB), like most encoders in the wild.

    Args:
        quality: JPEG quality, an integer in 1..100 (higher is closer to the
            input).

    Example:

    >>> image = np.tile(np.arange(64, dtype="uint8")[None] * 4, (64, 1))
    >>> JPEG(95).apply(image).shape
    (64, 64)
    """

    def __init__(self, quality):
        self.quality = _check_int("quality", quality, 1, 100)
        self.name = f"jpeg-{self.quality}"

    def call(self, image, rng=None):
        buffer = io.BytesIO()
        _to_pil(image).save(buffer, format="JPEG", quality=self.quality)
        buffer.seek(0)
        with Image.open(buffer, formats=("JPEG",)) as decoded:
            return _from_pil(decoded, image.shape)

    def get_config(self):
        return {"quality": self.quality}


def thumbnail_size(width, height, pixels):
    """Size of a thumbnail with about `pixels` pixels and the same aspect ratio.

    The exact size is `(w * s, h * s)` with `s = sqrt(pixels / (w * h))`;
    each side is rounded to the nearest integer (at least 1). Images that
    already have at most `pixels` pixels are kept at their size.

    Args:
        width: image width `w`.
        height: image height `h`.
        pixels: target number of pixels `A` of the thumbnail.

    Returns:
        `(thumb_width, thumb_height)`.

    Example:

    >>> thumbnail_size(224, 224, 30000)
    (173, 173)
    """
    width = _check_int("width", width, 1)
    height = _check_int("height", height, 1)
    pixels = _check_int("pixels", pixels, 1)
    if pixels >= width * height:
        return width, height
    scale = math.sqrt(pixels / (width * height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class Thumbnail(Distortion):
    """`thumb-A`: downscale to a thumbnail of about `A` pixels and back.

    The thumbnail keeps the aspect ratio (`thumbnail_size`); it is resized
    back to the input size because a network has a fixed input size. Both
    resizes use `resample` (default bicubic, Pillow's own `Image.thumbnail`
    filter; Pillow antialiases when downscaling). If the image has at most
    `A` pixels it is returned unchanged.

    Args:
        pixels: number of pixels `A` of the thumbnail, >= 1.
        resample: Pillow filter name: `"nearest"`, `"box"`, `"bilinear"`,
            `"hamming"`, `"bicubic"` or `"lanczos"`.

    Example:

    >>> Thumbnail(30000).apply(np.zeros((224, 224, 3), "uint8")).shape
    (224, 224, 3)
    """

    def __init__(self, pixels, resample="bicubic"):
        self.pixels = _check_int("pixels", pixels, 1)
        self.resample = _check_resample(resample)
        self.name = f"thumb-{self.pixels}"

    def call(self, image, rng=None):
        height, width = image.shape[:2]
        size = thumbnail_size(width, height, self.pixels)
        if size == (width, height):
            return image
        filter_ = _RESAMPLING[self.resample]
        thumb = _to_pil(image).resize(size, filter_)
        return _from_pil(thumb.resize((width, height), filter_), image.shape)

    def get_config(self):
        return {"pixels": self.pixels, "resample": self.resample}


def _check_crop_offset(offset, height, width):
    if offset >= min(height, width):
        raise ValueError(
            f"crop offset {offset} must be smaller than the image size "
            f"min(height, width) = min({height}, {width}) = {min(height, width)}"
        )


def crop_window(width, height, offset, rng=None):
    """Draws a `(w - o) x (h - o)` crop window at a uniform random position.

    The window lies fully inside the image: its left and top edges are drawn
    uniformly from `0..o`.

    Args:
        width: image width `w`.
        height: image height `h`.
        offset: offset `o`, `0 < o < min(w, h)`.
        rng: `np.random.Generator`, int seed or `None`.

    Returns:
        `(left, top, right, bottom)` in pixels, right/bottom exclusive.

    Example:

    >>> left, top, right, bottom = crop_window(224, 224, 10, rng=0)
    >>> (right - left, bottom - top)
    (214, 214)
    """
    offset = _check_int("offset", offset, 1)
    _check_crop_offset(offset, height, width)
    left, top = _as_rng(rng).integers(0, offset + 1, size=2)
    return int(left), int(top), int(left) + width - offset, int(top) + height - offset


class Crop(Distortion):
    """`crop-o`: crop a `(w - o) x (h - o)` window and resize it to `w x h`.

    The window position is uniform over the positions inside the image
    (`crop_window`); the resize uses `resample` (default bicubic).

    Args:
        offset: offset `o` > 0; must be smaller than `min(h, w)` of the
            images it is applied to.
        resample: Pillow filter name, as in `Thumbnail`.

    Example:

    >>> Crop(10).apply(np.zeros((32, 32, 3), "uint8"), rng=0).shape
    (32, 32, 3)
    """

    is_random = True

    def __init__(self, offset, resample="bicubic"):
        self.offset = _check_int("offset", offset, 1)
        self.resample = _check_resample(resample)
        self.name = f"crop-{self.offset}"

    def check_image_size(self, height, width):
        _check_crop_offset(self.offset, height, width)

    def call(self, image, rng=None):
        height, width = image.shape[:2]
        box = crop_window(width, height, self.offset, rng)
        # Crop first (not `resize(box=...)`, which filters with pixels from
        # outside the window at its edges): a crop has only its own pixels.
        window = _to_pil(image).crop(box)
        resized = window.resize((width, height), _RESAMPLING[self.resample])
        return _from_pil(resized, image.shape)

    def get_config(self):
        return {"offset": self.offset, "resample": self.resample}


class Gaussian(Distortion):
    """`gaussian-s`: additive `N(0, s^2)` pixel noise, clipped to the range.

    `stddev` is in units of the normalised `[0, 1]` range, as the paper's
    sigma (eq. 5): on `uint8` images the noise has standard deviation
    `255 * stddev`, and the result is rounded.

    Args:
        stddev: noise standard deviation `s` >= 0.

    Example:

    >>> Gaussian(0.1).apply(np.full((4, 4), 128, "uint8"), rng=0).dtype
    dtype('uint8')
    """

    is_random = True

    def __init__(self, stddev):
        if isinstance(stddev, bool) or not isinstance(stddev, numbers.Real):
            raise ValueError(f"`stddev` must be a number. Received: stddev={stddev!r}")
        if not (math.isfinite(stddev) and stddev >= 0):
            raise ValueError(
                f"`stddev` must be finite and >= 0. Received: stddev={stddev}"
            )
        self.stddev = float(stddev)
        self.name = f"gaussian-{np.format_float_positional(self.stddev, trim='-')}"

    def call(self, image, rng=None):
        unit = image.astype(np.float32) * np.float32(1.0 / 255.0)
        return _quantize(self._apply_unit(unit, rng))

    def _apply_unit(self, image, rng):
        noisy = image + rng.standard_normal(image.shape, dtype=image.dtype) * (
            image.dtype.type(self.stddev)
        )
        return np.clip(noisy, 0.0, 1.0, out=noisy)

    def get_config(self):
        return {"stddev": self.stddev}


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

_FLOAT = r"(\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?"
_PARSERS = (
    (re.compile(r"jpeg-(\d+)"), lambda m: JPEG(int(m[1]))),
    (
        re.compile(r"thumb-(\d+)(k?)"),
        lambda m: Thumbnail(int(m[1]) * (1000 if m[2] else 1)),
    ),
    (re.compile(r"crop-(\d+)"), lambda m: Crop(int(m[1]))),
    (re.compile(rf"gaussian-({_FLOAT})"), lambda m: Gaussian(float(m[1]))),
)
_CLASSES = {cls.__name__: cls for cls in (JPEG, Thumbnail, Crop, Gaussian)}
_ACCEPTED = (
    "'jpeg-<quality 1..100>' (e.g. 'jpeg-50'), 'thumb-<pixels>' (e.g. "
    "'thumb-30000' or 'thumb-30k'), 'crop-<offset>' (e.g. 'crop-10'), "
    "'gaussian-<stddev>' (e.g. 'gaussian-0.1'), a Distortion instance, or a "
    "dict from `serialize`"
)


def get(identifier):
    """Returns the `Distortion` for a paper name, config dict or instance.

    Args:
        identifier: a name as in the paper (`"jpeg-50"`, `"thumb-30000"` or
            `"thumb-30k"`, `"crop-10"`, `"gaussian-0.1"`), a `Distortion`
            (returned as is), or a dict made by `serialize`.

    Returns:
        A `Distortion`.

    Raises:
        ValueError: for an unknown name or an invalid parameter.

    Example:

    >>> get("jpeg-50")
    JPEG(quality=50)
    >>> get("thumb-30k").name
    'thumb-30000'
    """
    if isinstance(identifier, Distortion):
        return identifier
    if isinstance(identifier, dict):
        return _from_dict(identifier)
    if isinstance(identifier, str):
        for pattern, build in _PARSERS:
            match = pattern.fullmatch(identifier.strip())
            if match:
                try:
                    return build(match)
                except ValueError as error:
                    raise ValueError(
                        f"Invalid distortion {identifier!r}: {error}"
                    ) from None
    raise ValueError(f"Unknown distortion {identifier!r}. Accepted forms: {_ACCEPTED}.")


def serialize(distortion):
    """Returns a JSON-friendly dict that `get` turns back into `distortion`.

    Args:
        distortion: a `Distortion` or anything `get` accepts.

    Returns:
        `{"class_name": ..., "config": ...}`.

    Example:

    >>> serialize("crop-10")
    {'class_name': 'Crop', 'config': {'offset': 10, 'resample': 'bicubic'}}
    """
    distortion = get(distortion)
    return {"class_name": type(distortion).__name__, "config": distortion.get_config()}


def _from_dict(config):
    cls = _CLASSES.get(config.get("class_name"))
    if cls is None or not isinstance(config.get("config"), dict):
        raise ValueError(f"Unknown distortion {config!r}. Accepted forms: {_ACCEPTED}.")
    return cls.from_config(config["config"])


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def _check_images(images):
    images = np.asarray(images)
    shape = images.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))):
        raise ValueError(
            "`images` must have shape (N, H, W, C) with C in {1, 3}, or "
            f"(N, H, W) for grayscale. Received: shape={shape}"
        )
    if not (
        np.issubdtype(images.dtype, np.integer)
        or np.issubdtype(images.dtype, np.floating)
    ):
        raise ValueError(
            f"`images` must have an integer or float dtype. "
            f"Received: dtype={images.dtype}"
        )
    return images


def _resolve_value_range(dtype, value_range):
    if value_range is None:
        return (0, 255) if np.issubdtype(dtype, np.integer) else (0.0, 1.0)
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(
            "`value_range` must be (lo, hi) with finite lo < hi. "
            f"Received: value_range={value_range!r}"
        )
    return lo, hi


def _resolve_workers(workers):
    if workers is None:
        # The CPUs this process may run on, which a container can limit.
        if hasattr(os, "sched_getaffinity"):
            return max(1, len(os.sched_getaffinity(0)))
        return os.cpu_count() or 1
    return _check_int("workers", workers, 1)


def _num_threads(shape, workers):
    by_size = math.prod(shape[:3]) // _MIN_PIXELS_PER_WORKER
    return max(1, min(workers, shape[0], by_size))


def _to_unit(image, lo, hi):
    dtype = np.result_type(image.dtype, np.float32)
    return (image.astype(dtype) - dtype.type(lo)) * dtype.type(1.0 / (hi - lo))


def _from_unit(unit, lo, hi, dtype):
    values = unit * (hi - lo) + lo
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(dtype)


def _distort_into(out, images, distortion, value_range, seed, start_index, indices):
    lo, hi = value_range
    native = images.dtype == np.uint8 and (lo, hi) == (0, 255)
    for i in indices:
        rng = None
        if distortion.is_random:
            # Per-image streams: the result does not depend on the chunking.
            rng = np.random.default_rng([seed, start_index + i])
        if native:
            out[i] = distortion.call(images[i], rng)
        else:
            unit = distortion._apply_unit(_to_unit(images[i], lo, hi), rng)
            out[i] = _from_unit(unit, lo, hi, images.dtype)


def _distort_batch(images, distortion, value_range, seed, start_index, workers):
    out = np.empty_like(images)
    num_threads = _num_threads(images.shape, workers)
    args = (out, images, distortion, value_range, seed, start_index)
    if num_threads == 1:
        _distort_into(*args, range(len(images)))
        return out
    # Threads, not processes: Pillow releases the GIL while encoding,
    # decoding and resizing, and threads need no copies of the batch.
    chunks = np.array_split(np.arange(len(images)), num_threads * 4)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for future in [pool.submit(_distort_into, *args, c) for c in chunks]:
            future.result()
    return out


def _cache_path(cache_dir, images, distortion, value_range, seed, start_index):
    digest = hashlib.sha256()
    header = {
        "version": _CACHE_VERSION,
        "shape": images.shape,
        "dtype": images.dtype.str,
        "distortion": serialize(distortion),
        "value_range": [float(v) for v in value_range],
        "seed": seed,
        "start_index": start_index,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(images).data)
    return os.path.join(
        os.fspath(cache_dir), f"{distortion.name}-{digest.hexdigest()[:24]}.npy"
    )


def _load_cached(path, images):
    try:
        cached = np.load(path)
    except (OSError, ValueError):
        return None
    if cached.shape != images.shape or cached.dtype != images.dtype:
        return None
    return cached


def _save_atomic(path, array):
    # Write then rename, so a concurrent or interrupted run never leaves a
    # half-written file that a later run would load.
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def distort(
    images,
    distortion,
    value_range=None,
    seed=0,
    workers=None,
    cache_dir=None,
    start_index=0,
):
    """Distorts a batch of images, seeded and in parallel.

    Image `k` is distorted with randomness drawn from
    `np.random.default_rng([seed, start_index + k])`, so the output depends
    only on the inputs, the distortion, `seed` and `start_index`, never on
    `workers`. Float images are quantised to 8 bits for the Pillow
    distortions (see the module docstring).

    Args:
        images: array of shape `(N, H, W, C)` with `C` in `{1, 3}`, or
            `(N, H, W)` for grayscale; integer or float dtype.
        distortion: a name such as `"jpeg-50"` or a `Distortion` (see `get`).
        value_range: `(lo, hi)`, the range of the input values. Defaults to
            `(0, 255)` for integer dtypes and `(0.0, 1.0)` for floats. Values
            outside it are clipped.
        seed: non-negative int seed of the random distortions.
        workers: number of threads; `None` uses all CPUs available to the
            process. Small batches always run on one thread.
        cache_dir: optional directory; the result is saved there as `.npy`,
            keyed by a hash of the input bytes, distortion config, seed,
            `value_range` and `start_index`, and reloaded by later calls.
        start_index: index of `images[0]` in a larger set, so that
            distorting the set batch by batch equals distorting it at once.

    Returns:
        The distorted images: same shape, dtype and value range as `images`.

    Raises:
        ValueError: for an unknown distortion, a bad shape, dtype or
            argument, or a crop offset not smaller than the images.

    Example:

    >>> x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), "uint8")
    >>> y = distort(x, "jpeg-50")
    >>> y.shape, y.dtype
    ((4, 32, 32, 3), dtype('uint8'))
    >>> np.array_equal(distort(x, "crop-4", workers=1), distort(x, "crop-4"))
    True
    """
    distortion = get(distortion)
    images = _check_images(images)
    value_range = _resolve_value_range(images.dtype, value_range)
    seed = _check_int("seed", seed, 0)
    start_index = _check_int("start_index", start_index, 0)
    workers = _resolve_workers(workers)
    distortion.check_image_size(*images.shape[1:3])
    if cache_dir is None:
        return _distort_batch(
            images, distortion, value_range, seed, start_index, workers
        )
    path = _cache_path(cache_dir, images, distortion, value_range, seed, start_index)
    cached = _load_cached(path, images) if os.path.exists(path) else None
    if cached is not None:
        return cached
    out = _distort_batch(images, distortion, value_range, seed, start_index, workers)
    _save_atomic(path, out)
    return out


class DistortedPyDataset(keras.utils.PyDataset):
    """A `keras.utils.PyDataset` of distorted batches `(x', y)`.

    Batch `b` holds images `b * batch_size ...` of `x`, distorted as by
    `distort(x, distortion, value_range, seed)`: the same batch index always
    gives the same images, and all batches together equal `distort` of the
    whole `x`. Works with `fit`, `evaluate` and `predict` on every backend.

    Args:
        x: images, as for `distort`.
        y: targets (array, or nested structure of arrays, with `len(x)`
            rows), or `None` to yield `(x',)` only.
        distortion: a name such as `"jpeg-50"` or a `Distortion`.
        batch_size: images per batch.
        value_range: range of `x`, as for `distort`.
        seed: non-negative int seed of the random distortions.
        distortion_workers: threads used inside each batch; `None` uses all
            CPUs. Set it to 1 when the PyDataset's own `workers` > 1.
        **kwargs: `workers`, `use_multiprocessing`, `max_queue_size` of
            `keras.utils.PyDataset`.

    Example:

    >>> x = np.zeros((10, 16, 16, 3), "uint8")
    >>> ds = DistortedPyDataset(x, np.arange(10), "crop-2", batch_size=4)
    >>> len(ds), ds[2][0].shape
    (3, (2, 16, 16, 3))
    """

    def __init__(
        self,
        x,
        y,
        distortion,
        batch_size=32,
        value_range=None,
        seed=0,
        distortion_workers=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.x = _check_images(x)
        self.distortion = get(distortion)
        self.distortion.check_image_size(*self.x.shape[1:3])
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.value_range = _resolve_value_range(self.x.dtype, value_range)
        self.seed = _check_int("seed", seed, 0)
        self.distortion_workers = _resolve_workers(distortion_workers)
        self.y = y
        if y is not None:
            for leaf in keras.tree.flatten(y):
                if len(leaf) != len(self.x):
                    raise ValueError(
                        "`x` and `y` must have the same number of rows. "
                        f"Received: len(x)={len(self.x)}, len(y)={len(leaf)}"
                    )

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"Batch index {index} out of range [0, {len(self)})")
        start = index * self.batch_size
        stop = start + self.batch_size
        x_batch = distort(
            self.x[start:stop],
            self.distortion,
            value_range=self.value_range,
            seed=self.seed,
            workers=self.distortion_workers,
            start_index=start,
        )
        if self.y is None:
            return (x_batch,)
        return x_batch, keras.tree.map_structure(lambda a: a[start:stop], self.y)
