"""The paper's fine-tuning recipe (§4.3): stability-train only the last layers."""

import keras


def _layers_in_order(model):
    return [layer for layer in model.layers if layer.weights]


def freeze_all_but(model, last=None, names=None):
    """Freezes every layer of `model` except the last `last` ones or `names`.

    The paper first trains on the task loss alone, then fine-tunes with the
    stability term while "only the final fully-connected layers" train
    (§4.3), which halves nothing in the forward pass but shrinks the backward
    pass and keeps the learned features. Counting `last` skips layers without
    weights (Flatten, Dropout, activations), so `last=1` means the final
    Dense layer. Recompile the model after calling this, as for any change of
    `trainable` in Keras.

    Args:
        model: a Keras model whose direct sub-layers are frozen or not.
        last: number of final weighted layers to keep trainable.
        names: names of the layers to keep trainable.

    Returns:
        The list of layers left trainable.

    Example:

    >>> import keras
    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                          keras.layers.Dense(3, name="head")])
    >>> [layer.name for layer in freeze_all_but(base, last=1)]
    ['head']
    >>> len(base.trainable_weights)
    2
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: {model!r}")
    if (last is None) == (names is None):
        raise ValueError(
            "Pass exactly one of `last` (a positive int) or `names` (a list of "
            f"layer names). Received: last={last!r}, names={names!r}"
        )
    weighted = _layers_in_order(model)
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        known = {layer.name for layer in model.layers}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(
                f"`names` contains layers that are not in the model: {unknown}. "
                f"Layers of the model: {sorted(known)}"
            )
        keep = [layer for layer in model.layers if layer.name in names]
    else:
        if isinstance(last, bool) or not isinstance(last, int) or last < 1:
            raise ValueError(f"`last` must be a positive int. Received: last={last!r}")
        if last > len(weighted):
            raise ValueError(
                f"`last={last}` exceeds the {len(weighted)} layers with weights "
                "in the model."
            )
        keep = weighted[-last:]
    for layer in model.layers:
        layer.trainable = layer in keep
    return keep
