"""Metrics for output stability and the robustness report.

Everything here works on NumPy arrays of predictions or embeddings, so it is
the same on every Keras backend:

- classification under distortion (paper §5.3): `top_k_accuracy`,
  `flip_rate` (share of samples whose top-1 class changes, as in ImageNet-P)
  and `mean_kl` between clean and distorted predictions;
- feature stability (§5.1, Fig. 7): `feature_distances`, `fraction_below`,
  `distance_cdf`;
- near-duplicate detection by thresholding `||f(a) - f(b)||_2 < T` (eq. 11,
  Fig. 6): `near_duplicate_pr_curve`, `recall_at_precision`,
  `precision_at_recall`;
- similar-image ranking (§5.2): `ranking_score_at_top_k` (eq. 12), computed in
  bounded memory for large query sets and galleries;
- `robustness_report`, which evaluates a model on clean and distorted copies of
  a dataset, and the `DistortedValidation` callback, which logs distorted
  accuracy and flip rate every epoch so `EarlyStopping`, `ModelCheckpoint` and
  keras-tuner can use them.

Matplotlib is imported only by the plotting helpers.
"""

import os
import re
import warnings

import keras
import numpy as np

from keras_stability import distortions as distortions_lib

DEFAULT_DISTORTIONS = ("jpeg-50", "jpeg-10", "thumb-30000", "crop-10")

_JPEG_NAME = re.compile(r"^jpeg-(\d+)$")


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _as_2d_float(name, value):
    """Returns `value` as a non-empty, finite 2-D float64 array."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-D array of shape (num_samples, num_columns). "
            f"Received: {name}.shape={array.shape}"
        )
    if array.shape[0] == 0:
        raise ValueError(
            f"`{name}` must not be empty. Received: {name}.shape={array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must contain only finite values (no NaN or inf).")
    return array


def _as_1d_distances(name, value):
    """Returns `value` as a non-empty, finite, non-negative 1-D float64 array."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(
            f"`{name}` must be a 1-D array of distances. "
            f"Received: {name}.shape={array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"`{name}` must not be empty. Received: {name}.shape=(0,)")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must contain only finite values (no NaN or inf).")
    if np.any(array < 0):
        raise ValueError(
            f"`{name}` must contain non-negative distances. "
            f"Received: min({name})={array.min()}"
        )
    return array


def _check_probabilities(name, array):
    # Only negativity is rejected: rows of a float32 softmax do not sum to 1
    # exactly, and rejecting them would make the metrics unusable in practice.
    if np.any(array < 0):
        raise ValueError(
            f"`{name}` must contain probabilities (>= 0). "
            f"Received: min({name})={array.min()}"
        )


def _check_same_shape(name_a, a, name_b, b):
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape. "
            f"Received: {name_a}.shape={a.shape}, {name_b}.shape={b.shape}"
        )


def _is_real(value):
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float, np.integer, np.floating))


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}"
        )
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}. Received: {name}={value}")
    return int(value)


def _check_fraction(name, value):
    if not _is_real(value):
        raise ValueError(
            f"`{name}` must be a number in [0, 1]. Received: {name}={value!r}"
        )
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1]. Received: {name}={value}")
    return float(value)


def _labels(y_true, num_classes, name="y_true"):
    """Integer labels from int labels, `(n, 1)` labels or one-hot rows."""
    y = np.asarray(y_true)
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        return np.argmax(y, axis=1)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            f"`{name}` must be integer labels of shape (n,) or one-hot of shape "
            f"(n, {num_classes}). Received: {name}.shape={y.shape}"
        )
    if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError(f"`{name}` must contain integer class labels.")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"`{name}` labels must be in [0, {num_classes - 1}] for {num_classes} "
            f"classes. Received: min={y.min()}, max={y.max()}"
        )
    return y


# ---------------------------------------------------------------------------
# Classification under distortion
# ---------------------------------------------------------------------------


def top_k_accuracy(y_true, y_prob, k=1):
    """Fraction of samples whose true class is among the `k` most probable.

    Exact ties in `y_prob` are broken towards the lower class index, as
    `np.argmax` does, so `top_k_accuracy(y, p, k=1)` equals
    `mean(argmax(p) == y)` and agrees with `flip_rate`. (Keras' top-k metrics
    count every tied class as inside the top k instead; the two differ only
    when probabilities tie exactly.)

    Args:
        y_true: integer labels of shape `(n,)` or `(n, 1)`, or one-hot labels
            of shape `(n, num_classes)`.
        y_prob: scores of shape `(n, num_classes)` (probabilities or logits;
            only their order matters).
        k: number of top classes that count as a hit, `1 <= k`.

    Returns:
        The accuracy as a Python float in `[0, 1]`.

    Example:

    >>> p = [[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]
    >>> top_k_accuracy([2, 0], p, k=1)
    0.5
    >>> top_k_accuracy([2, 0], p, k=2)
    1.0
    """
    y_prob = _as_2d_float("y_prob", y_prob)
    k = _check_int("k", k, minimum=1)
    labels = _labels(y_true, y_prob.shape[1])
    if labels.shape[0] != y_prob.shape[0]:
        raise ValueError(
            "`y_true` and `y_prob` must have the same number of samples. "
            f"Received: len(y_true)={labels.shape[0]}, len(y_prob)={y_prob.shape[0]}"
        )
    rows = np.arange(y_prob.shape[0])
    true_score = y_prob[rows, labels][:, None]
    class_index = np.arange(y_prob.shape[1])[None, :]
    # 0-based position of the true class in a stable descending sort.
    ahead = (y_prob > true_score) | (
        (y_prob == true_score) & (class_index < labels[:, None])
    )
    position = ahead.sum(axis=1)
    return float(np.mean(position < k))


def flip_rate(y_prob_clean, y_prob_distorted):
    """Fraction of samples whose top-1 class changes under the distortion.

    This is the ImageNet-P "flip probability" for one clean/distorted pair; it
    needs no labels.

    Args:
        y_prob_clean: scores on the clean inputs, shape `(n, num_classes)`.
        y_prob_distorted: scores on the distorted inputs, same shape.

    Returns:
        The flip rate as a Python float in `[0, 1]`.

    Example:

    >>> flip_rate([[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4], [0.7, 0.3]])
    0.5
    """
    clean = _as_2d_float("y_prob_clean", y_prob_clean)
    distorted = _as_2d_float("y_prob_distorted", y_prob_distorted)
    _check_same_shape("y_prob_clean", clean, "y_prob_distorted", distorted)
    return float(np.mean(np.argmax(clean, axis=1) != np.argmax(distorted, axis=1)))


def kl_divergence(y_prob_clean, y_prob_distorted, epsilon=1e-7):
    """Per-sample `KL(p_clean || p_distorted)`, finite at saturated outputs.

    Computes `sum_j p_j * (log max(p_j, eps) - log max(q_j, eps))`. Terms with
    `p_j = 0` are exactly 0 (the `0 log 0 = 0` convention) and `q_j = 0` is
    treated as `eps`, so one-hot predictions give a finite value; for
    probabilities above `eps` the result is the exact KL divergence.

    Args:
        y_prob_clean: probabilities `p` on the clean inputs, `(n, num_classes)`.
        y_prob_distorted: probabilities `q` on the distorted inputs, same shape.
        epsilon: floor for probabilities inside the logarithm, `> 0`.

    Returns:
        A float64 array of shape `(n,)`.

    Example:

    >>> kl_divergence([[1.0, 0.0]], [[0.5, 0.5]]).round(4)  # ln 2
    array([0.6931])
    """
    p = _as_2d_float("y_prob_clean", y_prob_clean)
    q = _as_2d_float("y_prob_distorted", y_prob_distorted)
    _check_same_shape("y_prob_clean", p, "y_prob_distorted", q)
    _check_probabilities("y_prob_clean", p)
    _check_probabilities("y_prob_distorted", q)
    if not _is_real(epsilon) or not 0 < epsilon < 1:
        raise ValueError(f"`epsilon` must be in (0, 1). Received: epsilon={epsilon!r}")
    log_ratio = np.log(np.maximum(p, epsilon)) - np.log(np.maximum(q, epsilon))
    return np.sum(p * log_ratio, axis=1)


def mean_kl(y_prob_clean, y_prob_distorted, epsilon=1e-7):
    """Mean `KL(p_clean || p_distorted)` over samples (see `kl_divergence`).

    Args:
        y_prob_clean: probabilities on the clean inputs, `(n, num_classes)`.
        y_prob_distorted: probabilities on the distorted inputs, same shape.
        epsilon: floor for probabilities inside the logarithm, `> 0`.

    Returns:
        The mean divergence as a Python float (`>= 0` for normalised rows).

    Example:

    >>> round(mean_kl([[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]), 4)
    0.3466
    """
    return float(np.mean(kl_divergence(y_prob_clean, y_prob_distorted, epsilon)))


# ---------------------------------------------------------------------------
# Feature stability (Fig. 7)
# ---------------------------------------------------------------------------


def feature_distances(f_a, f_b):
    """Row-wise Euclidean distances `||f(a_i) - f(b_i)||_2`.

    Args:
        f_a: features of shape `(n, ...)`; trailing axes are flattened.
        f_b: features of the same shape.

    Returns:
        A float64 array of shape `(n,)`.

    Example:

    >>> feature_distances([[0.0, 0.0], [1.0, 1.0]], [[3.0, 4.0], [1.0, 1.0]])
    array([5., 0.])
    """
    a = np.asarray(f_a, dtype=np.float64)
    b = np.asarray(f_b, dtype=np.float64)
    if a.ndim < 1 or a.shape[0] == 0:
        raise ValueError(
            f"`f_a` must have at least one row. Received: f_a.shape={a.shape}"
        )
    _check_same_shape("f_a", a, "f_b", b)
    diff = (a - b).reshape(a.shape[0], -1)
    return np.sqrt(np.sum(diff * diff, axis=1))


def fraction_below(distances, threshold=0.1):
    """Share of distances strictly below `threshold` (Fig. 7 uses 0.1).

    Args:
        distances: 1-D array of non-negative distances.
        threshold: the cut-off; a pair counts when `distance < threshold`, as
            in eq. (11).

    Returns:
        A Python float in `[0, 1]`.

    Example:

    >>> fraction_below([0.05, 0.1, 0.2, 0.01], threshold=0.1)
    0.5
    """
    distances = _as_1d_distances("distances", distances)
    if not _is_real(threshold) or np.isnan(threshold):
        raise ValueError(
            f"`threshold` must be a number. Received: threshold={threshold!r}"
        )
    return float(np.mean(distances < threshold))


def distance_cdf(distances):
    """Empirical cumulative distribution of distances (for Fig. 7).

    Args:
        distances: 1-D array of non-negative distances.

    Returns:
        A tuple `(sorted_distances, cumulative_fraction)` of two float64 arrays
        of the same length; `cumulative_fraction[i] = (i + 1) / n` is the share
        of distances `<= sorted_distances[i]` (for distinct values).

    Example:

    >>> d, frac = distance_cdf([0.3, 0.1, 0.2, 0.4])
    >>> d.tolist(), frac.tolist()
    ([0.1, 0.2, 0.3, 0.4], [0.25, 0.5, 0.75, 1.0])
    """
    distances = np.sort(_as_1d_distances("distances", distances))
    return distances, np.arange(1, distances.size + 1) / distances.size


# ---------------------------------------------------------------------------
# Near-duplicate detection (eq. 11, Fig. 6)
# ---------------------------------------------------------------------------


def near_duplicate_pr_curve(positive_distances, negative_distances):
    """Precision and recall of `distance <= T` as a near-duplicate detector.

    Pairs are declared near-duplicates when their feature distance is at most
    the threshold (eq. 11 with `T` just above each threshold). Every distinct
    observed distance is one threshold, in increasing order, so recall never
    decreases along the curve. The values equal scikit-learn's
    `precision_recall_curve(labels, -distances)` read backwards, without its
    extra `(precision=1, recall=0)` end point.

    Args:
        positive_distances: 1-D distances of true near-duplicate pairs.
        negative_distances: 1-D distances of dissimilar pairs.

    Returns:
        A tuple `(precision, recall, thresholds)` of float64 arrays of equal
        length; `precision[i]` and `recall[i]` are those obtained by calling
        every pair with `distance <= thresholds[i]` a near-duplicate.

    Example:

    >>> p, r, t = near_duplicate_pr_curve([0.1, 0.2, 0.4], [0.3, 0.5])
    >>> t.tolist()
    [0.1, 0.2, 0.3, 0.4, 0.5]
    >>> p.round(3).tolist(), r.round(3).tolist()
    ([1.0, 1.0, 0.667, 0.75, 0.6], [0.333, 0.667, 0.667, 1.0, 1.0])
    """
    positive = _as_1d_distances("positive_distances", positive_distances)
    negative = _as_1d_distances("negative_distances", negative_distances)
    distances = np.concatenate([positive, negative])
    is_positive = np.concatenate([np.ones(positive.size), np.zeros(negative.size)])
    order = np.argsort(distances, kind="stable")
    distances = distances[order]
    true_pos = np.cumsum(is_positive[order])
    false_pos = np.cumsum(1.0 - is_positive[order])
    # Pairs at the same distance are accepted together: keep the last index
    # of each run of equal distances.
    last_of_run = np.append(distances[1:] != distances[:-1], True)
    true_pos = true_pos[last_of_run]
    false_pos = false_pos[last_of_run]
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / positive.size
    return precision, recall, distances[last_of_run]


def recall_at_precision(positive_distances, negative_distances, precision=0.98):
    """Best recall reachable with precision `>= precision` (paper §5.1.1).

    Args:
        positive_distances: 1-D distances of true near-duplicate pairs.
        negative_distances: 1-D distances of dissimilar pairs.
        precision: the required precision, in `[0, 1]`.

    Returns:
        The highest recall over all thresholds whose precision is at least
        `precision`, as a Python float; `0.0` when no threshold reaches it.

    Example:

    >>> recall_at_precision([0.1, 0.2, 0.4], [0.3, 0.5], precision=0.98)
    0.6666666666666666
    """
    precision = _check_fraction("precision", precision)
    curve_p, curve_r, _ = near_duplicate_pr_curve(
        positive_distances, negative_distances
    )
    return _best_where_reached(curve_r, curve_p, precision)


def precision_at_recall(positive_distances, negative_distances, recall=0.98):
    """Best precision reachable with recall `>= recall`.

    Args:
        positive_distances: 1-D distances of true near-duplicate pairs.
        negative_distances: 1-D distances of dissimilar pairs.
        recall: the required recall, in `[0, 1]`.

    Returns:
        The highest precision over all thresholds whose recall is at least
        `recall`, as a Python float; `0.0` when no threshold reaches it.

    Example:

    >>> precision_at_recall([0.1, 0.2, 0.4], [0.3, 0.5], recall=1.0)
    0.75
    """
    recall = _check_fraction("recall", recall)
    curve_p, curve_r, _ = near_duplicate_pr_curve(
        positive_distances, negative_distances
    )
    return _best_where_reached(curve_p, curve_r, recall)


def _best_where_reached(values, required, minimum):
    """Max of `values` over the thresholds where `required >= minimum`, or 0."""
    reached = required >= minimum
    return float(values[reached].max()) if reached.any() else 0.0


# ---------------------------------------------------------------------------
# Similar-image ranking (eq. 12)
# ---------------------------------------------------------------------------


def _row_squared_distances(a, b):
    # Direct difference, not the |a|^2 + |b|^2 - 2ab expansion: identical rows
    # give bit-identical results, so exact ties (p == n) are detected exactly.
    diff = a - b
    return np.sum(diff * diff, axis=1)


def _count_strictly_closer(query, reference, gallery, k, chunk_size):
    """Per query, the number of gallery items strictly closer than the squared
    distance `reference`, counted up to at least `k` (then it stops), in
    `chunk_size x chunk_size` blocks."""
    dim = query.shape[1]
    # The matrix-product distances differ from the direct ones by rounding,
    # at most about dim * eps * (|q|^2 + |g|^2). A gallery item counts as
    # closer only if it is closer by more than a multiple of that bound, so a
    # copy of the reference itself (e.g. the positive in the default gallery)
    # is a tie, never "closer".
    rtol = 8.0 * (dim + 2) * np.finfo(np.float64).eps
    query_sq = np.sum(query * query, axis=1)
    gallery_sq = np.sum(gallery * gallery, axis=1)
    # closer  <=>  |q|^2 + |g|^2 - 2 q.g < ref - rtol (|q|^2 + |g|^2)
    #         <=>  q.g - (1 + rtol) |g|^2 / 2 > ((1 + rtol) |q|^2 - ref) / 2
    # so each block costs one matrix product, one subtraction, one compare.
    gallery_offset = 0.5 * (1.0 + rtol) * gallery_sq
    query_bound = 0.5 * ((1.0 + rtol) * query_sq - reference)
    counts = np.zeros(query.shape[0], dtype=np.int64)
    for q_start in range(0, query.shape[0], chunk_size):
        # Indices of the queries in this chunk still below k; a query that
        # reached k is out of the top-K test, so the rest of the gallery is
        # skipped for it.
        active = np.arange(q_start, min(q_start + chunk_size, query.shape[0]))
        q_block, bound = query[active], query_bound[active, None]
        for g_start in range(0, gallery.shape[0], chunk_size):
            g_stop = g_start + chunk_size
            scores = q_block @ gallery[g_start:g_stop].T
            scores -= gallery_offset[None, g_start:g_stop]
            counts[active] += np.count_nonzero(scores > bound, axis=1)
            still_below = counts[active] < k
            if not still_below.all():
                active = active[still_below]
                if active.size == 0:
                    break
                q_block, bound = query[active], query_bound[active, None]
    return counts


def ranking_counts_at_top_k(
    query, positive, negative, gallery=None, k=30, chunk_size=1024
):
    """Counts behind the ranking score @top-K (eq. 12); see
    `ranking_score_at_top_k` for the definition and the tie rules.

    Args:
        query: query embeddings, shape `(n, d)`.
        positive: embeddings of the positive (more similar) image of each
            triplet, shape `(n, d)`.
        negative: embeddings of the negative image of each triplet, `(n, d)`.
        gallery: embeddings `(m, d)` the queries are ranked against; defaults
            to all positives and negatives stacked (`m = 2n`).
        k: the K of top-K, `>= 1`.
        chunk_size: block size for queries and gallery items; memory use is a
            few `chunk_size x chunk_size` float64 blocks.

    Returns:
        A dict with int counts: `"correct"`, `"incorrect"`, `"tied"` (triplets
        considered but with `D(q, p) == D(q, n)`), `"considered"` (their sum),
        `"total"` (all triplets) and `"score"` (`correct - incorrect`).

    Example:

    >>> q, p, n = [[0.0]], [[1.0]], [[2.0]]
    >>> ranking_counts_at_top_k(q, p, n, k=1)["correct"]
    1
    """
    query = _as_2d_float("query", query)
    positive = _as_2d_float("positive", positive)
    negative = _as_2d_float("negative", negative)
    _check_same_shape("query", query, "positive", positive)
    _check_same_shape("query", query, "negative", negative)
    if gallery is None:
        gallery = np.concatenate([positive, negative], axis=0)
    else:
        gallery = _as_2d_float("gallery", gallery)
        if gallery.shape[1] != query.shape[1]:
            raise ValueError(
                "`gallery` must have the same embedding size as `query`. "
                f"Received: gallery.shape={gallery.shape}, query.shape={query.shape}"
            )
    k = _check_int("k", k, minimum=1)
    chunk_size = _check_int("chunk_size", chunk_size, minimum=1)

    dist_pos = _row_squared_distances(query, positive)
    dist_neg = _row_squared_distances(query, negative)
    # Centring leaves distances unchanged and shrinks the norms, which the
    # rounding error of the blocked distances scales with. (The p-vs-n test
    # above uses the raw values, so exact ties there stay exact.)
    center = gallery.mean(axis=0)
    # Rank grows with distance, so "p or n among the K closest" is "the closer
    # of the two has rank <= K", i.e. fewer than K items strictly closer.
    closer = _count_strictly_closer(
        query - center, np.minimum(dist_pos, dist_neg), gallery - center, k, chunk_size
    )
    considered = closer < k
    correct = int(np.count_nonzero(considered & (dist_pos < dist_neg)))
    incorrect = int(np.count_nonzero(considered & (dist_pos > dist_neg)))
    num_considered = int(np.count_nonzero(considered))
    return {
        "correct": correct,
        "incorrect": incorrect,
        "tied": num_considered - correct - incorrect,
        "considered": num_considered,
        "total": int(query.shape[0]),
        "score": correct - incorrect,
    }


def ranking_score_at_top_k(
    query, positive, negative, gallery=None, k=30, chunk_size=1024
):
    """Triplet ranking score @top-K (paper eq. 12).

    `#correctly ranked - #incorrectly ranked` over the triplets `(q, p, n)`
    whose positive or negative is among the K gallery items closest to `q`
    under the Euclidean distance `D`:

    - a triplet is correctly ranked when `D(q, p) < D(q, n)` and incorrectly
      ranked when `D(q, p) > D(q, n)`; an exact tie `D(q, p) == D(q, n)`
      counts as neither (it adds 0);
    - the rank of an item is `1 +` the number of gallery items strictly
      closer to `q` than it, so items at equal distance share the best rank
      ("1224" competition ranking) and an item tied at place K is inside the
      top K. `p` and `n` need not be in the gallery; their rank is the one
      they would have if inserted. A copy of the query in the gallery counts
      as a closer item.
    - Gallery distances come from a blocked matrix product; differences
      within its floating-point rounding (about `8 (d + 2) eps (|q|^2 + |g|^2)`
      in squared distance, after centring on the gallery mean) count as ties,
      so duplicates of `p` or `n` never push them down.

    Memory stays bounded: queries and gallery are processed in
    `chunk_size x chunk_size` blocks, so 100k queries against a 100k gallery
    never build a 100k x 100k matrix.

    Args:
        query: query embeddings, shape `(n, d)`.
        positive: positive embeddings, shape `(n, d)`.
        negative: negative embeddings, shape `(n, d)`.
        gallery: embeddings `(m, d)` to rank against; defaults to all
            positives and negatives stacked.
        k: the K of top-K (the paper uses 30), `>= 1`.
        chunk_size: block size, `>= 1`.

    Returns:
        The score as a Python int (between `-n` and `n`).

    Example:

    >>> q = [[0.0], [0.0]]
    >>> p = [[1.0], [3.0]]
    >>> n = [[2.0], [2.5]]
    >>> ranking_score_at_top_k(q, p, n, k=30)  # one right, one wrong
    0
    """
    counts = ranking_counts_at_top_k(
        query, positive, negative, gallery=gallery, k=k, chunk_size=chunk_size
    )
    return counts["score"]


# ---------------------------------------------------------------------------
# Robustness report
# ---------------------------------------------------------------------------


def _resolve_distortions(distortions):
    """Distortion objects from names/instances; unknown names -> ValueError."""
    if isinstance(distortions, str) or not hasattr(distortions, "__iter__"):
        distortions = [distortions]
    distortions = list(distortions)
    if not distortions:
        raise ValueError(
            "`distortions` must name at least one distortion. Received: []"
        )
    resolved = []
    for identifier in distortions:
        try:
            resolved.append(distortions_lib.get(identifier))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"`distortions` contains an invalid distortion {identifier!r}: {error}"
            ) from None
    names = [d.name for d in resolved]
    if len(set(names)) != len(names):
        raise ValueError(
            f"`distortions` must not repeat a distortion. Received: {names}"
        )
    return resolved


def _check_xy(x, y):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(
            f"`x` must contain at least one sample. Received: x.shape={x.shape}"
        )
    y = np.asarray(y)
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(
            "`x` and `y` must have the same number of samples. "
            f"Received: len(x)={x.shape[0]}, len(y)={y.shape[0] if y.ndim else y!r}"
        )
    return x, y


def _predict_probabilities(model, x, batch_size, from_logits=False):
    """`model.predict` as a float64 `(n, num_classes)` probability array."""
    prob = np.asarray(
        model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64
    )
    if prob.ndim == 1:
        prob = prob[:, None]
    if prob.ndim != 2:
        raise ValueError(
            "The model must output class scores of shape (n, num_classes). "
            f"Received output shape {prob.shape}"
        )
    if from_logits:
        if prob.shape[1] == 1:
            prob = 1.0 / (1.0 + np.exp(-prob))
        else:
            prob = np.exp(prob - prob.max(axis=1, keepdims=True))
            prob /= prob.sum(axis=1, keepdims=True)
    # A single sigmoid unit becomes the two-class distribution [1 - p, p].
    if prob.shape[1] == 1:
        prob = np.concatenate([1.0 - prob, prob], axis=1)
    return prob


def _report_row(name, labels, prob, clean_prob, top_k):
    row = {"distortion": name}
    for k in top_k:
        row[f"top{k}"] = top_k_accuracy(labels, prob, k=k)
    row["flip_rate"] = flip_rate(clean_prob, prob)
    row["mean_kl"] = mean_kl(clean_prob, prob)
    return row


class RobustnessReport:
    """Accuracy and stability of one model on clean and distorted data.

    Returned by `robustness_report`; not usually built by hand.

    Args:
        rows: list of dicts, one per dataset version with the clean
            (`"original"`) row first. Keys: `"distortion"`, `"top<k>"` for
            each reported k, `"flip_rate"` and `"mean_kl"` (both relative to
            the clean predictions, so 0 on the original row).
        plots: paths of the PNG files written, if any.

    Example:

    >>> report = RobustnessReport(
    ...     [{"distortion": "original", "top1": 0.9, "flip_rate": 0.0,
    ...       "mean_kl": 0.0}])
    >>> report.rows[0]["top1"]
    0.9
    """

    def __init__(self, rows, plots=()):
        self.rows = list(rows)
        self.plots = list(plots)

    @property
    def columns(self):
        """Column keys of the rows, in table order."""
        return list(self.rows[0].keys()) if self.rows else []

    def row(self, distortion):
        """The row dict for `distortion` (e.g. `"jpeg-50"` or `"original"`)."""
        for row in self.rows:
            if row["distortion"] == distortion:
                return row
        names = [row["distortion"] for row in self.rows]
        raise KeyError(f"No row for distortion {distortion!r}. Available: {names}")

    def _cells(self):
        header = [_COLUMN_TITLES.get(c, _top_k_title(c)) for c in self.columns]
        body = [[_format_cell(c, row[c]) for c in self.columns] for row in self.rows]
        return header, body

    def to_text(self):
        """The report as an aligned plain-text table, original row first."""
        header, body = self._cells()
        widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

        def line(cells):
            first = cells[0].ljust(widths[0])
            rest = [
                cell.rjust(width)
                for cell, width in zip(cells[1:], widths[1:], strict=True)
            ]
            return "  ".join([first] + rest).rstrip()

        rule = "  ".join("-" * width for width in widths)
        return "\n".join([line(header), rule] + [line(r) for r in body])

    def to_markdown(self):
        """The report as a GitHub-flavoured Markdown table."""
        header, body = self._cells()
        lines = ["| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)

    def __str__(self):
        return self.to_text()

    def __repr__(self):
        names = [row["distortion"] for row in self.rows]
        return f"RobustnessReport(distortions={names}, plots={self.plots})"


_COLUMN_TITLES = {
    "distortion": "distortion",
    "flip_rate": "flip rate",
    "mean_kl": "mean KL",
}


def _top_k_title(column):
    return f"top-{column[3:]}" if column.startswith("top") else column


def _format_cell(column, value):
    if column == "distortion":
        return str(value)
    if column == "mean_kl":
        return f"{value:.4f}"
    return f"{100.0 * value:.2f}%"


def robustness_report(
    model,
    x,
    y,
    distortions=DEFAULT_DISTORTIONS,
    value_range=None,
    batch_size=256,
    seed=0,
    plot_dir=None,
    top_k=(1, 5),
    from_logits=False,
):
    """Evaluates a classifier on clean and distorted copies of `(x, y)`.

    Each distortion (paper §4.2: `jpeg-q`, `thumb-A`, `crop-o`, ...) is applied
    to `x` with `keras_stability.distortions.distort`, then `model.predict`
    runs on the clean and on every distorted copy. Per version the report
    holds top-k accuracy, the flip rate and the mean KL divergence against the
    clean predictions (paper §5.3, Table 4).

    Args:
        model: a Keras classifier taking `x` and returning `(n, num_classes)`
            probabilities (or logits with `from_logits=True`).
        x: images of shape `(n, height, width, channels)`, in the same dtype
            and range the model is fed with.
        y: integer labels `(n,)` or one-hot labels `(n, num_classes)`.
        distortions: distortion names (e.g. `"jpeg-50"`) or objects. The
            default is the paper's set; note that `thumb-30000` leaves images
            of at most 30000 pixels unchanged and `crop-o` needs images larger
            than `o`, so pick sizes that fit your images (e.g. `"thumb-200"`,
            `"crop-4"` for 28 x 28 digits).
        value_range: pixel range of `x`; default `(0, 255)` for integer
            images and `(0, 1)` for float images.
        batch_size: batch size for `model.predict`.
        seed: seed of the random distortions (e.g. crop positions).
        plot_dir: if given and matplotlib is installed, PNG plots are written
            there: top-1 accuracy per distortion and, when there are `jpeg-q`
            distortions, accuracy versus JPEG quality (paper Fig. 9).
        top_k: the k of the top-k accuracies; values above the number of
            classes are skipped.
        from_logits: whether the model outputs logits (softmax is applied).

    Returns:
        A `RobustnessReport`.

    Example:

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
    ...                           keras.layers.Dense(10, activation="softmax")])
    >>> x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), "uint8")
    >>> report = robustness_report(model, x, np.arange(16) % 10,
    ...                            distortions=["jpeg-50"])
    >>> [row["distortion"] for row in report.rows]
    ['original', 'jpeg-50']
    """
    resolved = _resolve_distortions(distortions)
    x, y = _check_xy(x, y)
    batch_size = _check_int("batch_size", batch_size, minimum=1)
    if isinstance(top_k, int):
        top_k = (top_k,)
    top_k = sorted({_check_int("top_k", k, minimum=1) for k in top_k})

    clean_prob = _predict_probabilities(model, x, batch_size, from_logits)
    labels = _labels(y, clean_prob.shape[1], name="y")
    top_k = [k for k in top_k if k <= clean_prob.shape[1]] or [1]

    rows = [_report_row("original", labels, clean_prob, clean_prob, top_k)]
    for distortion in resolved:
        x_distorted = distortions_lib.distort(
            x, distortion, value_range=value_range, seed=seed
        )
        prob = _predict_probabilities(model, x_distorted, batch_size, from_logits)
        rows.append(_report_row(distortion.name, labels, prob, clean_prob, top_k))

    plots = []
    if plot_dir is not None:
        plots = _write_report_plots(rows, top_k, plot_dir)
    return RobustnessReport(rows, plots)


# ---------------------------------------------------------------------------
# Plots (matplotlib is optional and imported lazily)
# ---------------------------------------------------------------------------


def _pyplot():
    """`matplotlib.pyplot` on the Agg backend, or None if not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    # Agg renders to files without a display (CI, servers, worker threads).
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _require_pyplot():
    plt = _pyplot()
    if plt is None:
        raise ImportError("Plotting needs matplotlib: `pip install matplotlib`.")
    return plt


def _save(fig, path):
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _write_report_plots(rows, top_k, plot_dir):
    plt = _pyplot()
    if plt is None:
        warnings.warn(
            "`plot_dir` was given but matplotlib is not installed; no plots written.",
            stacklevel=3,
        )
        return []
    os.makedirs(plot_dir, exist_ok=True)
    paths = [_plot_accuracy_by_distortion(plt, rows, plot_dir)]
    jpeg_rows = [row for row in rows if _JPEG_NAME.match(row["distortion"])]
    if jpeg_rows:
        paths.append(_plot_accuracy_vs_jpeg(plt, rows[0], jpeg_rows, top_k, plot_dir))
    return paths


def _plot_accuracy_by_distortion(plt, rows, plot_dir):
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.5))
    names = [row["distortion"] for row in rows]
    ax.bar(names, [100.0 * row["top1"] for row in rows], color="tab:blue")
    ax.set_ylabel("precision @ top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy under distortion")
    ax.tick_params(axis="x", rotation=30)
    return _save(fig, os.path.join(plot_dir, "accuracy_by_distortion.png"))


def _plot_accuracy_vs_jpeg(plt, original, jpeg_rows, top_k, plot_dir):
    # Like paper Fig. 9: quality decreases to the right.
    jpeg_rows = sorted(
        jpeg_rows, key=lambda r: -int(_JPEG_NAME.match(r["distortion"]).group(1))
    )
    qualities = [int(_JPEG_NAME.match(r["distortion"]).group(1)) for r in jpeg_rows]
    fig, ax = plt.subplots(figsize=(5.0, 3.5))
    for i, k in enumerate(top_k):
        color = f"C{i}"
        key = f"top{k}"
        ax.plot(
            qualities,
            [100.0 * r[key] for r in jpeg_rows],
            "o-",
            color=color,
            label=f"top-{k}",
        )
        ax.axhline(
            100.0 * original[key],
            linestyle="--",
            color=color,
            alpha=0.6,
            label=f"top-{k}, original",
        )
    ax.invert_xaxis()
    ax.set_xlabel("JPEG quality")
    ax.set_ylabel("precision (%)")
    ax.set_title("Accuracy vs JPEG quality")
    ax.legend(fontsize="small")
    return _save(fig, os.path.join(plot_dir, "accuracy_vs_jpeg_quality.png"))


def plot_distance_cdf(distances_by_model, path, threshold=0.1):
    """Plots the CDF of near-duplicate feature distances (paper Fig. 7).

    Args:
        distances_by_model: dict mapping a model name (legend label) to a 1-D
            array of `||f(x) - f(x')||_2` for near-duplicate pairs.
        path: where to write the PNG; parent directories are created.
        threshold: position of the vertical reference line; the legend shows
            each model's share of distances below it.

    Returns:
        `path` as a string.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "cdf.png")
    >>> plot_distance_cdf({"baseline": [0.05, 0.2], "stabilized": [0.01, 0.05]},
    ...                   path) == path
    True
    """
    if not distances_by_model:
        raise ValueError("`distances_by_model` must not be empty. Received: {}")
    plt = _require_pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.5))
    for name, distances in distances_by_model.items():
        sorted_d, fraction = distance_cdf(distances)
        share = fraction_below(sorted_d, threshold)
        ax.step(
            sorted_d,
            fraction,
            where="post",
            label=f"{name} ({100.0 * share:.0f}% < {threshold:g})",
        )
    ax.axvline(threshold, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("feature distance ||f(x) - f(x')||_2")
    ax.set_ylabel("cumulative fraction of pairs")
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def plot_pr_curves(curves_by_model, path, title=None):
    """Plots near-duplicate precision-recall curves (paper Fig. 6).

    Args:
        curves_by_model: dict mapping a model name to the
            `(precision, recall, thresholds)` tuple of
            `near_duplicate_pr_curve` (or just `(precision, recall)`).
        path: where to write the PNG; parent directories are created.
        title: optional title, e.g. the distortion (`"jpeg-50"`).

    Returns:
        `path` as a string.

    Example:

    >>> import os, tempfile
    >>> curve = near_duplicate_pr_curve([0.1, 0.2], [0.3, 0.15])
    >>> path = os.path.join(tempfile.mkdtemp(), "pr.png")
    >>> plot_pr_curves({"baseline": curve}, path) == path
    True
    """
    if not curves_by_model:
        raise ValueError("`curves_by_model` must not be empty. Received: {}")
    plt = _require_pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.5))
    for name, curve in curves_by_model.items():
        if not isinstance(curve, (tuple, list)) or len(curve) not in (2, 3):
            raise ValueError(
                f"Each curve must be (precision, recall[, thresholds]). "
                f"Received for {name!r}: {type(curve).__name__}"
            )
        precision, recall = np.asarray(curve[0]), np.asarray(curve[1])
        ax.plot(recall, precision, label=str(name))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small", loc="lower left")
    return _save(fig, path)


# ---------------------------------------------------------------------------
# Callback
# ---------------------------------------------------------------------------


class DistortedValidation(keras.callbacks.Callback):
    """Logs accuracy and flip rate on distorted validation data every epoch.

    The distorted copies of `x` are computed once, in `__init__`. At the end
    of each epoch the model predicts (inference mode) on the clean and the
    distorted data and the callback writes, for every distortion `d`,
    `logs[f"{prefix}{d}_accuracy"]` (top-1 accuracy on the distorted data) and
    `logs[f"{prefix}{d}_flip_rate"]` (share of top-1 predictions that differ
    from the clean ones), e.g. `val_jpeg-10_accuracy`. They land in
    `History`, and `EarlyStopping`, `ModelCheckpoint` or a keras-tuner
    objective can monitor them, provided this callback comes *before* them in
    the `callbacks` list (Keras calls callbacks in list order).

    Keras cannot infer the direction of these names, so pass it: e.g.
    `EarlyStopping(monitor="val_jpeg-10_accuracy", mode="max")` (mode
    `"auto"` raises a ValueError) or
    `keras_tuner.Objective("val_jpeg-10_accuracy", direction="max")`;
    `metric_directions` gives `"max"`/`"min"` for every name.

    Args:
        x: validation images `(n, height, width, channels)`, as fed to the
            model.
        y: integer labels `(n,)` or one-hot labels `(n, num_classes)`.
        distortions: a distortion name/object or a list of them.
        value_range: pixel range of `x`; default `(0, 255)` for integer
            images and `(0, 1)` for float images.
        batch_size: batch size for `model.predict`.
        seed: seed of the random distortions.
        prefix: prefix of the logged names.

    Example:

    >>> import keras, numpy as np
    >>> x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), "uint8")
    >>> y = np.arange(16) % 10
    >>> callback = DistortedValidation(x, y, ["jpeg-50"])
    >>> callback.metric_names
    ['val_jpeg-50_accuracy', 'val_jpeg-50_flip_rate']
    """

    def __init__(
        self,
        x,
        y,
        distortions,
        value_range=None,
        batch_size=256,
        seed=0,
        prefix="val_",
    ):
        super().__init__()
        self._distortions = _resolve_distortions(distortions)
        self.x, self.y = _check_xy(x, y)
        self.batch_size = _check_int("batch_size", batch_size, minimum=1)
        if not isinstance(prefix, str):
            raise ValueError(f"`prefix` must be a string. Received: prefix={prefix!r}")
        self.prefix = prefix
        self.value_range = value_range
        self.seed = seed
        self.distortion_names = [d.name for d in self._distortions]
        # Distorting (JPEG encode/decode, resizing) is far slower than
        # predicting, and the copies do not change between epochs.
        self.x_distorted = {
            d.name: distortions_lib.distort(
                self.x, d, value_range=value_range, seed=seed
            )
            for d in self._distortions
        }

    @classmethod
    def metric_directions_for(cls, distortions, prefix="val_"):
        """The log keys the callback would produce and their directions.

        Needs no data, so a tuner can validate an objective before any trial.

        Args:
            distortions: a distortion name/object or a list of them.
            prefix: prefix of the logged names.

        Returns:
            A dict mapping each key to `"max"` (accuracy) or `"min"` (flip
            rate), two keys per distortion, in order.

        Example:

        >>> DistortedValidation.metric_directions_for("jpeg-10")
        {'val_jpeg-10_accuracy': 'max', 'val_jpeg-10_flip_rate': 'min'}
        """
        directions = {}
        for distortion in _resolve_distortions(distortions):
            directions[f"{prefix}{distortion.name}_accuracy"] = "max"
            directions[f"{prefix}{distortion.name}_flip_rate"] = "min"
        return directions

    @classmethod
    def metric_names_for(cls, distortions, prefix="val_"):
        """The log keys the callback would produce, without any data.

        Args:
            distortions: a distortion name/object or a list of them.
            prefix: prefix of the logged names.

        Returns:
            A list of strings, two per distortion.

        Example:

        >>> DistortedValidation.metric_names_for(["jpeg-10"])
        ['val_jpeg-10_accuracy', 'val_jpeg-10_flip_rate']
        """
        return list(cls.metric_directions_for(distortions, prefix=prefix))

    @property
    def metric_names(self):
        """The log keys this callback adds at the end of each epoch."""
        return self.metric_names_for(self._distortions, prefix=self.prefix)

    @property
    def metric_directions(self):
        """Dict of log key -> `"max"` or `"min"` (for `mode` / objectives)."""
        return self.metric_directions_for(self._distortions, prefix=self.prefix)

    def compute_metrics(self):
        """Predicts on clean and distorted data and returns the log entries.

        Returns:
            A dict mapping every name in `metric_names` to a Python float.
        """
        clean = _predict_probabilities(self.model, self.x, self.batch_size)
        labels = _labels(self.y, clean.shape[1], name="y")
        results = {}
        for name in self.distortion_names:
            prob = _predict_probabilities(
                self.model, self.x_distorted[name], self.batch_size
            )
            results[f"{self.prefix}{name}_accuracy"] = top_k_accuracy(labels, prob, k=1)
            results[f"{self.prefix}{name}_flip_rate"] = flip_rate(clean, prob)
        return results

    def on_epoch_end(self, epoch, logs=None):
        results = self.compute_metrics()
        # Updated in place: Keras passes the same dict to every later callback.
        if logs is not None:
            logs.update(results)
