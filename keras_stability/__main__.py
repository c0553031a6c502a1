"""Command line: `python -m keras_stability demo` (also `keras-stability demo`)."""

import argparse
import os
import sys
import time


def demo(args):
    """Short classification benchmark on the offline MNIST digits."""
    import keras

    from keras_stability import benchmark

    print(
        "keras-stability demo: baseline vs Gaussian data augmentation vs "
        f"stability training (alpha={args.alpha}, sigma={args.sigma}) on 5,000 "
        f"offline MNIST digits, {args.epochs} epochs each, "
        f"backend={keras.backend.backend()}\n"
    )
    start = time.perf_counter()
    summary, _ = benchmark.run_classification_benchmark(
        seeds=tuple(range(args.seeds)),
        epochs=args.epochs,
        alpha=args.alpha,
        sigma=args.sigma,
        distortions=args.distortions,
        verbose=1,
        plot_dir=args.out,
    )
    print("\nTop-1 accuracy and flip rate on clean and distorted test digits:\n")
    print(benchmark.to_markdown(summary))
    print("\nMean KL(clean || distorted) of the predictions:\n")
    print(benchmark.kl_markdown(summary))
    print(f"\nPlots written to {os.path.abspath(args.out)}/")
    print(f"Done in {time.perf_counter() - start:.0f} s.")


def main(argv=None):
    """Entry point of `python -m keras_stability` and `keras-stability`."""
    parser = argparse.ArgumentParser(prog="keras-stability")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help=demo.__doc__)
    run.add_argument("--epochs", type=int, default=3)
    run.add_argument("--seeds", type=int, default=1)
    run.add_argument("--alpha", type=float, default=1.0)
    run.add_argument("--sigma", type=float, default=0.4)
    run.add_argument(
        "--distortions",
        nargs="+",
        default=["jpeg-10", "thumb-64", "crop-2", "crop-4", "gaussian-0.3"],
    )
    run.add_argument("--out", default="demo_output")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
