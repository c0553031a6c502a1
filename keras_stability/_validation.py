"""Argument checks shared by the public classes (clear, named errors)."""

import math
import numbers

import numpy as np
from keras import ops


def is_number(value):
    """True for finite-or-infinite real numbers that are not bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(name, value, minimum=None, maximum=None, exclusive_minimum=False):
    """Returns `float(value)` or raises a TypeError/ValueError naming `name`."""
    if not is_number(value):
        raise TypeError(
            f"`{name}` must be a real number. Received: {name}={value!r} "
            f"of type {type(value).__name__}"
        )
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"`{name}` must not be NaN. Received: {name}={value}")
    if minimum is not None:
        too_small = value <= minimum if exclusive_minimum else value < minimum
        if too_small:
            bound = ">" if exclusive_minimum else ">="
            raise ValueError(
                f"`{name}` must be {bound} {minimum}. Received: {name}={value}"
            )
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}. Received: {name}={value}")
    return value


def check_value_range(value_range):
    """Returns `(lo, hi)` as floats with `lo < hi`, or raises ValueError."""
    try:
        lo, hi = value_range
    except (TypeError, ValueError):
        raise ValueError(
            "`value_range` must be a pair (low, high), e.g. (0.0, 1.0) or "
            f"(0, 255). Received: value_range={value_range!r}"
        ) from None
    if not (is_number(lo) and is_number(hi)) or not lo < hi:
        raise ValueError(
            "`value_range` must be two numbers with low < high. "
            f"Received: value_range={value_range!r}"
        )
    return float(lo), float(hi)


def float_value(variable):
    """The Python float a float32 scalar `variable` holds, as it was given.

    Read from the variable, so it stays right after `load_weights`; printed
    with float32's shortest round-trip digits, so 0.01 reads back as 0.01 and
    not as 0.009999999776.
    """
    return float(str(np.float32(ops.convert_to_numpy(variable))))
