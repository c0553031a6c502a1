"""Stable embeddings on real photographs: near-duplicates and ranking (§5.1, §5.2).

Trains the same small embedding CNN (`ks.embedding_model`) on ranking
triplets cut from the *train* photographs in up to three ways, from the same
initial weights, on the same batches, for the same number of steps:

- `baseline`: the triplet hinge loss L0 (eq. 7) only;
- `stabilized`: L0 + alpha * ||f(x) - f(x')||_2 with x' = x + N(0, sigma^2)
  (eq. 8, stability training; paper defaults alpha=0.1, sigma=0.2);
- `augmented`: L0 on noisy inputs x' only (the data augmentation of Table 1,
  which the paper reports to underfit).

Each embedding is then evaluated on patches of the *held-out* photographs (the
split is by photograph, so no training pixel is ever evaluated on):

- near-duplicate detection (Fig. 6): a held-out patch and its distorted copy
  (jpeg-50, thumb-A, crop-o; A and o sized for 32x32 patches) are a positive
  pair, a patch and a distant patch of the same held-out photograph (the
  paper's "same search query" pairs) and/or of another held-out photograph
  are a negative pair; pairs are detected by thresholding the feature
  distance (eq. 11). Reported: recall at precision 98% and 99.5%.
- feature distance distribution (Fig. 7): the share of near-duplicate pairs
  with `||f(x) - f(x')||_2 < 0.1`, and the median distance of the dissimilar
  pairs for scale.
- ranking score @top-30 (eq. 12, Table 3) on held-out triplets, original and
  with every image of every triplet distorted.

Every metric is the mean ± sample std over `--seeds` training seeds (the
held-out evaluation set is the same for all seeds). It prints a markdown
table and writes P-R curves and distance CDFs (first seed) and all numbers
(`results.json`) to `--output-dir`.

Usage (the backend comes from KERAS_BACKEND, default tensorflow):

    python benchmarks/near_duplicate.py            # full run, ~3 min on 2 cores
    python benchmarks/near_duplicate.py --quick    # smoke run, < 1 min
    python benchmarks/near_duplicate.py --seeds 5 --epochs 4 --eval-patches 4000
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_stability as ks  # noqa: E402
from keras_stability.evaluation import (  # noqa: E402
    near_duplicate_pr_curve,
    recall_at_precision,
)

ARMS = ("baseline", "stabilized", "augmented")
# The paper's distortions resized to 32x32 patches: jpeg-50 as in Fig. 6/7;
# thumb-256 is a 16x16 thumbnail and crop-4 drops 4 of 32 pixels per side
# (the paper's thumb-30k / crop-10 change a 224x224 input far less, but on
# 32x32 patches that would be below the 8-bit quantisation).
DISTORTIONS = ("jpeg-50", "thumb-256", "crop-4")
PRECISIONS = (0.98, 0.995)
CDF_THRESHOLD = 0.1
PATCH_SIZE = 32
EVAL_SEED = 10_000  # the held-out triplets never depend on the training seed

QUICK = {
    "train_steps": 20,
    "epochs": 1,
    "eval_patches": 300,
    "seeds": 1,
    "width": 8,
}


def parse_args(argv=None):
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny smoke run (< 1 min)")
    add("--seeds", type=int, default=3, help="training seeds per arm")
    add("--train-steps", type=int, default=200, help="steps per epoch")
    add("--epochs", type=int, default=2)
    add("--batch-size", type=int, default=32, help="triplets per step")
    add("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    add("--margin", type=float, default=0.1, help="triplet margin g (eq. 7)")
    add("--alpha", type=float, default=0.1, help="stability weight (paper: 0.1)")
    add("--sigma", type=float, default=0.2, help="noise stddev (paper: 0.2)")
    add("--width", type=int, default=16, help="filters of the first conv block")
    add("--dim", type=int, default=64, help="embedding dimension (paper: 64)")
    add("--arms", default=",".join(ARMS), help="comma-separated subset of arms")
    add("--distortions", default=",".join(DISTORTIONS))
    add("--eval-patches", type=int, default=2000, help="held-out triplets")
    add(
        "--eval-same-image-negatives",
        type=float,
        default=0.5,
        help="share of held-out negatives from the query's own photograph",
    )
    add("--max-side", type=int, default=192, help="photographs are downscaled")
    add("--test-fraction", type=float, default=0.3, help="held-out photographs")
    add("--split-seed", type=int, default=0)
    add("--top-k", type=int, default=30, help="K of ranking score @top-K")
    add("--output-dir", default=os.path.join("artifacts", "near_duplicate"))
    add("--no-plots", action="store_true")
    add(
        "--run-eagerly",
        action="store_true",
        help="skip compiling the train step (faster for a few steps only)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.quick:
        # --quick sets defaults only: flags given explicitly still win.
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        for key, value in QUICK.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    args.arms = _check_names(args.arms, ARMS, "--arms")
    args.distortions = [ks.distortions.get(n).name for n in args.distortions.split(",")]
    return args


def _check_names(text, allowed, flag):
    """Splits a comma-separated list and rejects unknown names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown or not names:
        raise SystemExit(f"{flag}: unknown {unknown}; choose from {list(allowed)}")
    return names


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def load_split(max_side, test_fraction, split_seed):
    """Downscaled photographs split by photograph into train and held-out."""
    photos = ks.datasets.load_photographs()
    # Downscaled, a 32x32 patch covers an object part rather than a texel.
    photos = ks.datasets.resize_photographs(photos, max_side=max_side)
    photos = [p for p in photos if min(p.image.shape[:2]) >= 2 * PATCH_SIZE]
    return ks.datasets.split_photographs(photos, test_fraction, seed=split_seed)


def make_eval_set(photographs, num_triplets, same_image_fraction, distortions):
    """Held-out triplets (uint8) and their distorted copies, made once."""
    sampler = ks.triplets.TripletSampler(
        photographs,
        patch_size=PATCH_SIZE,
        same_image_negative_fraction=same_image_fraction,
        seed=EVAL_SEED,
    )
    triplets = sampler.sample(num_triplets)
    images = np.concatenate([triplets.query, triplets.positive, triplets.negative])
    distorted = {}
    for name in distortions:
        # One call for all 3n images: each gets its own crop position. The
        # first n are the distorted queries, i.e. the near-duplicate copies.
        distorted[name] = ks.distortions.distort(images, name, seed=EVAL_SEED)
    return {
        "original": images,
        "distorted": distorted,
        "n": num_triplets,
        "same_image": triplets.metadata["same_image_negative"],
    }


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def initial_weights(seed, width, dim):
    """Weights of a freshly initialised embedding, shared by all arms."""
    keras.utils.set_random_seed(seed)
    return ks.embedding_model((PATCH_SIZE, PATCH_SIZE, 3), dim, width).get_weights()


def build_arm(arm, embedding, args, seed):
    """The trainable model of one arm around the embedding `f`."""
    noise = ks.GaussianPerturbation(args.sigma, seed=seed)
    if arm == "baseline":
        return ks.TripletModel(embedding)
    if arm == "stabilized":
        return ks.StabilityModel(
            ks.TripletModel(embedding),
            alpha=args.alpha,
            perturbation=noise,
            stability_loss="l2",
        )
    # Data augmentation: the noise layer sits in front of f, so L0 sees x'
    # only; it is the identity at inference, and f is evaluated alone anyway.
    inputs = keras.Input((PATCH_SIZE, PATCH_SIZE, 3))
    noisy = keras.Model(inputs, embedding(noise(inputs)), name="noisy_embedding")
    return ks.TripletModel(noisy)


def train_arm(arm, weights, train_photos, args, seed):
    """Trains one arm from `weights`; returns the embedding and its history."""
    keras.utils.set_random_seed(seed)
    embedding = ks.embedding_model((PATCH_SIZE, PATCH_SIZE, 3), args.dim, args.width)
    embedding.set_weights(weights)
    model = build_arm(arm, embedding, args, seed)
    model.compile(
        keras.optimizers.Adam(args.learning_rate),
        ks.TripletRankingLoss(margin=args.margin),
        run_eagerly=args.run_eagerly,
    )
    sampler = ks.triplets.TripletSampler(train_photos, patch_size=PATCH_SIZE, seed=seed)
    # Same seed for every arm: all arms see exactly the same batches.
    dataset = ks.triplets.TripletPyDataset(
        sampler, batch_size=args.batch_size, steps_per_epoch=args.train_steps, seed=seed
    )
    history = model.fit(dataset, epochs=args.epochs, verbose=0)
    return embedding, history.history


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def embed(embedding, images, batch_size=500):
    """Embeddings of uint8 images, as float64 numpy."""
    # Plain calls, not `predict`: nothing to compile per model and per
    # backend, and large batches keep the per-call overhead negligible.
    chunks = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].astype("float32") / np.float32(255.0)
        chunks.append(keras.ops.convert_to_numpy(embedding(x, training=False)))
    return np.concatenate(chunks).astype("float64")


def evaluate(embedding, eval_set, distortions, top_k):
    """All metrics of one embedding, plus the distances behind the plots."""
    n = eval_set["n"]
    clean = embed(embedding, eval_set["original"])
    q, p, neg = clean[:n], clean[n : 2 * n], clean[2 * n :]
    negative_d = ks.evaluation.feature_distances(q, neg)
    ranking = {"original": ks.evaluation.ranking_score_at_top_k(q, p, neg, k=top_k)}
    positive_d = {}
    for name in distortions:
        distorted = embed(embedding, eval_set["distorted"][name])
        dq, dp, dn = distorted[:n], distorted[n : 2 * n], distorted[2 * n :]
        # Table 3: every image of every held-out triplet is distorted.
        ranking[name] = ks.evaluation.ranking_score_at_top_k(dq, dp, dn, k=top_k)
        # Near-duplicate pair: a held-out patch and its distorted copy.
        positive_d[name] = ks.evaluation.feature_distances(q, dq)
    # Keys in table order: ranking, then detection, then distances.
    metrics = {f"ranking/{name}": score for name, score in ranking.items()}
    for precision in PRECISIONS:
        for name in distortions:
            metrics[f"recall@{precision:.1%}/{name}"] = recall_at_precision(
                positive_d[name], negative_d, precision
            )
    for name in distortions:
        metrics[f"below{CDF_THRESHOLD:g}/{name}"] = ks.evaluation.fraction_below(
            positive_d[name], CDF_THRESHOLD
        )
    # Shares below a fixed threshold shrink with the whole embedding; the
    # dissimilar distances tell whether near-duplicates really got closer.
    metrics["dissimilar/median_distance"] = float(np.median(negative_d))
    return metrics, {"positive": positive_d, "negative": negative_d}


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def summarize(results):
    """Mean and sample std over seeds: {arm: {metric: (mean, std, n)}}."""
    summary = {}
    for arm, runs in results.items():
        summary[arm] = {}
        for key in runs[0]:
            values = np.array([run[key] for run in runs], "float64")
            std = float(values.std(ddof=1)) if len(values) > 1 else None
            summary[arm][key] = (float(values.mean()), std, len(values))
    return summary


def _row_label(key, n):
    """Human-readable name of a metric key."""
    kind, _, name = key.partition("/")
    if kind == "ranking":
        return f"ranking score @top-K, {name} (of {n})"
    if kind.startswith("recall@"):
        return f"{name}: recall @ precision {kind[len('recall@') :]}"
    if kind.startswith("below"):
        return f"{name}: share of near-dup distances < {kind[len('below') :]}"
    if kind == "dissimilar":
        return "dissimilar pairs: median distance"
    if kind == "train":
        return f"train {name} (last epoch)"
    return key


def _cell(key, mean, std):
    """Formats one mean ± std; shares and recalls as percentages."""
    percent = key.startswith(("recall@", "below"))
    scale, fmt = (100.0, "{:.1f}") if percent else (1.0, "{:.3f}")
    if key.startswith("ranking"):
        fmt = "{:.0f}"
    text = fmt.format(mean * scale)
    if std is not None:
        text += " ± " + fmt.format(std * scale)
    return text


def to_markdown(summary, n, top_k):
    """The summary as a markdown table, one column per arm."""
    arms = list(summary)
    keys = list(summary[arms[0]])
    runs = summary[arms[0]][keys[0]][2]
    lines = [
        f"| metric (mean ± std over {runs} seed{'s' * (runs > 1)}) | "
        + " | ".join(arms)
        + " |",
        "|---" * (len(arms) + 1) + "|",
    ]
    for key in keys:
        label = _row_label(key, n).replace("@top-K", f"@top-{top_k}")
        cells = [_cell(key, *summary[arm][key][:2]) for arm in arms]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plots(distances, distortions, output_dir):
    """P-R curves (Fig. 6) and distance CDFs (Fig. 7) of the first seed."""
    paths = []
    for name in distortions:
        curves = {
            arm: near_duplicate_pr_curve(d["positive"][name], d["negative"])
            for arm, d in distances.items()
        }
        paths.append(
            ks.evaluation.plot_pr_curves(
                curves,
                os.path.join(output_dir, f"pr_{name}.png"),
                title=f"near-duplicates: {name} (held-out photographs)",
            )
        )
        paths.append(
            ks.evaluation.plot_distance_cdf(
                {arm: d["positive"][name] for arm, d in distances.items()},
                os.path.join(output_dir, f"distance_cdf_{name}.png"),
                threshold=CDF_THRESHOLD,
            )
        )
    return paths


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(argv=None):
    """Runs the benchmark; returns the summary, the table and the plot paths."""
    args = parse_args(argv)
    start = time.perf_counter()
    train_photos, test_photos = load_split(
        args.max_side, args.test_fraction, args.split_seed
    )
    print(
        f"backend={keras.backend.backend()}  train photographs: "
        f"{[p.name for p in train_photos]}\n  held-out photographs: "
        f"{[p.name for p in test_photos]}"
    )
    eval_set = make_eval_set(
        test_photos, args.eval_patches, args.eval_same_image_negatives, args.distortions
    )
    results = {arm: [] for arm in args.arms}
    first_distances = {}
    train_seconds = {arm: 0.0 for arm in args.arms}
    for seed in range(args.seeds):
        weights = initial_weights(seed, args.width, args.dim)
        for arm in args.arms:
            tick = time.perf_counter()
            embedding, history = train_arm(arm, weights, train_photos, args, seed)
            train_seconds[arm] += time.perf_counter() - tick
            metrics, distances = evaluate(
                embedding, eval_set, args.distortions, args.top_k
            )
            task_loss = history.get("task_loss", history["loss"])
            metrics["train/L0"] = float(task_loss[-1])
            results[arm].append(metrics)
            if seed == 0:
                first_distances[arm] = distances
            print(
                f"seed {seed} {arm:>10}: "
                f"ranking original {metrics['ranking/original']}, "
                f"jpeg-50 share<0.1 "
                f"{metrics.get(f'below{CDF_THRESHOLD:g}/jpeg-50', float('nan')):.3f}"
                f"  ({time.perf_counter() - tick:.0f} s)",
                flush=True,
            )

    summary = summarize(results)
    table = to_markdown(summary, args.eval_patches, args.top_k)
    same = float(np.mean(eval_set["same_image"]))
    print(
        f"\nHeld-out: {args.eval_patches} triplets / near-duplicate pairs from "
        f"{len(test_photos)} photographs ({same:.0%} of negatives from the "
        f"query's own photograph); alpha={args.alpha}, sigma={args.sigma}, "
        f"{args.epochs} x {args.train_steps} steps of {args.batch_size} triplets.\n"
    )
    print(table)
    paths = []
    os.makedirs(args.output_dir, exist_ok=True)
    if not args.no_plots:
        paths = write_plots(first_distances, args.distortions, args.output_dir)
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump(
            {"args": vars(args), "results": results, "train_seconds": train_seconds},
            handle,
            indent=2,
        )
    seconds = {arm: round(s / args.seeds, 1) for arm, s in train_seconds.items()}
    print(f"\ntraining seconds per seed: {seconds}")
    print(f"total {time.perf_counter() - start:.0f} s; outputs in {args.output_dir}")
    return {"summary": summary, "table": table, "plots": paths}


if __name__ == "__main__":
    main()
