"""Paper Tables 1 and 4 on MNIST: baseline vs augmentation vs stability training.

Same CNN, seeds and epochs for every arm; evaluated on the clean test split
and on jpeg-q / thumb-A / crop-o / gaussian-sigma copies of it. Prints top-1
accuracy and flip rate (mean ± std over seeds) and the mean KL between clean
and distorted predictions, and writes a bar plot.

    KERAS_BACKEND=tensorflow python benchmarks/classification.py --seeds 5 \
        --alpha 1.0 --sigma 0.4
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from keras_stability import benchmark  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--sigma", type=float, default=0.04)
    parser.add_argument(
        "--distortions", nargs="+", default=list(benchmark.MNIST_DISTORTIONS)
    )
    parser.add_argument("--out", default="artifacts/classification")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    summary, _ = benchmark.run_classification_benchmark(
        seeds=tuple(range(args.seeds)),
        epochs=args.epochs,
        alpha=args.alpha,
        sigma=args.sigma,
        distortions=args.distortions,
        plot_dir=args.out,
    )
    print(
        f"\nbackend={keras.backend.backend()} seeds={args.seeds} "
        f"epochs={args.epochs} alpha={args.alpha} sigma={args.sigma} "
        f"({time.perf_counter() - start:.0f} s)\n"
    )
    print(benchmark.to_markdown(summary))
    print()
    print(benchmark.kl_markdown(summary))
    print(f"\nplots in {args.out}/")


if __name__ == "__main__":
    main()
