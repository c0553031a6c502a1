"""Throughput of building distorted image sets (`keras_stability.distortions`).

For each distortion (default: the paper's jpeg-50, thumb-30000 and crop-10)
this times, on the same images and interleaved so that load changes hit all
variants alike:

- a bare Pillow loop on one core doing the same work (the yardstick),
- `distort(..., workers=w)` for each `w` in `--workers`,
- optionally (`--processes`) a `ProcessPoolExecutor` over chunks, the
  alternative to the threads `distort` uses.

It prints a markdown table of images per second and the ratio to the bare
loop. Images are 224x224 RGB patches cut from the photographs bundled with
scikit-image (random smooth images if it is missing).

Usage:

    python benchmarks/distortions.py --num-images 256 --size 224
"""

import argparse
import concurrent.futures
import io
import multiprocessing
import os
import time

import numpy as np
from PIL import Image

from keras_stability import distortions

BICUBIC = Image.Resampling.BICUBIC
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def _photos():
    try:
        from skimage import data
    except ImportError:
        return []
    return [getattr(data, name)() for name in _PHOTOS]


def make_images(num_images, size, seed=0):
    """Cuts `num_images` RGB patches of `size` x `size` from real photos."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    images = np.empty((num_images, size, size, 3), np.uint8)
    for i in range(num_images):
        if not photos:
            # Smooth random image: upsampled low-resolution noise.
            low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            images[i] = np.asarray(Image.fromarray(low).resize((size, size), BICUBIC))
            continue
        photo = photos[i % len(photos)]
        # A random window of 0.5-1x the short side, resized to `size`.
        short = min(photo.shape[:2])
        side = int(rng.integers(short // 2, short + 1))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        patch = Image.fromarray(photo[top : top + side, left : left + side])
        images[i] = np.asarray(patch.resize((size, size), BICUBIC))
    return images


# ---------------------------------------------------------------------------
# Bare Pillow loops: the same work as each distortion, with no library code
# ---------------------------------------------------------------------------


def _bare_jpeg(images, quality):
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer))
    return out


def _bare_thumb(images, pixels):
    out = np.empty_like(images)
    height, width = images.shape[1:3]
    scale = (pixels / (width * height)) ** 0.5
    small = (round(width * scale), round(height * scale))
    for i, image in enumerate(images):
        thumb = Image.fromarray(image).resize(small, BICUBIC)
        out[i] = np.asarray(thumb.resize((width, height), BICUBIC))
    return out


def _bare_crop(images, offset):
    out = np.empty_like(images)
    height, width = images.shape[1:3]
    rng = np.random.default_rng(0)
    for i, image in enumerate(images):
        left, top = rng.integers(0, offset + 1, size=2)
        box = (left, top, left + width - offset, top + height - offset)
        window = Image.fromarray(image).crop(box)
        out[i] = np.asarray(window.resize((width, height), BICUBIC))
    return out


def bare_loop(distortion):
    """A plain one-core Pillow loop doing the work of `distortion`."""
    if isinstance(distortion, distortions.JPEG):
        return lambda x: _bare_jpeg(x, distortion.quality)
    if isinstance(distortion, distortions.Thumbnail):
        return lambda x: _bare_thumb(x, distortion.pixels)
    if isinstance(distortion, distortions.Crop):
        return lambda x: _bare_crop(x, distortion.offset)
    raise ValueError(f"No bare Pillow loop for {distortion.name!r}")


# ---------------------------------------------------------------------------
# Process pool alternative
# ---------------------------------------------------------------------------


def _distort_chunk(args):
    images, name, start = args
    return distortions.distort(images, name, workers=1, start_index=start)


def process_distort(pool, num_processes, name):
    """`distort` split over a process pool (images are pickled both ways)."""

    def run(images):
        starts = np.linspace(0, len(images), num_processes * 4 + 1).astype(int)
        bounds = zip(starts[:-1], starts[1:], strict=True)
        jobs = [(images[a:b], name, a) for a, b in bounds]
        return np.concatenate(list(pool.map(_distort_chunk, jobs)))

    return run


def thread_distort(distortion, workers):
    """`distort` with `workers` threads."""
    return lambda images: distortions.distort(images, distortion, workers=workers)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def best_rates(variants, images, repeats):
    """Best images/s of each `(key, fn)` over `repeats` interleaved rounds."""
    best = {key: 0.0 for key, _ in variants}
    for _ in range(repeats):
        for key, fn in variants:
            start = time.perf_counter()
            fn(images)
            rate = len(images) / (time.perf_counter() - start)
            best[key] = max(best[key], rate)
    return best


def benchmark(images, names, workers, repeats, pool=None, num_processes=0):
    """Rows `(distortion, how, workers, images/s, ratio)` of the table."""
    rows = []
    for name in names:
        distortion = distortions.get(name)
        variants = [(("bare Pillow loop", 1), bare_loop(distortion))]
        for w in workers:
            variants.append((("distort (threads)", w), thread_distort(distortion, w)))
        if pool is not None:
            run = process_distort(pool, num_processes, name)
            variants.append((("distort chunks (processes)", num_processes), run))
        # Warm up imports, caches and thread start-up outside the timing.
        for _, fn in variants:
            fn(images[:8])
        rates = best_rates(variants, images, repeats)
        bare = rates[("bare Pillow loop", 1)]
        for (how, w), rate in rates.items():
            rows.append((name, how, w, rate, rate / bare))
    return rows


def markdown_table(rows):
    lines = [
        "| distortion | how | workers | images/s | ratio to bare Pillow loop |",
        "|---|---|---:|---:|---:|",
    ]
    for name, how, w, rate, ratio in rows:
        lines.append(f"| {name} | {how} | {w} | {rate:,.0f} | {ratio:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--distortions", nargs="+", default=["jpeg-50", "thumb-30000", "crop-10"]
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="thread counts for `distort` (default: 1 and all CPUs)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--processes",
        action="store_true",
        help="also time a process pool over chunks (threads' alternative)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    workers = args.workers or sorted({1, cpus})
    pool = None
    if args.processes:
        # Fork before any thread exists: forking a threaded process can hang.
        context = multiprocessing.get_context("fork")
        pool = concurrent.futures.ProcessPoolExecutor(max(workers), mp_context=context)
        list(pool.map(abs, range(max(workers))))
    try:
        images = make_images(args.num_images, args.size)
        rows = benchmark(
            images, args.distortions, workers, args.repeats, pool, max(workers)
        )
    finally:
        if pool is not None:
            pool.shutdown()
    print(
        f"{args.num_images} images of {args.size}x{args.size} RGB, {cpus} CPUs, "
        f"best of {args.repeats}\n"
    )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
