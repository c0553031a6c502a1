"""Every `Example:` in the library's docstrings runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import keras_stability

MODULES = sorted(
    f"keras_stability.{info.name}"
    for info in pkgutil.iter_modules(keras_stability.__path__)
    if info.name != "__main__"
)


def test_every_public_module_is_collected():
    # A new module is checked without editing this file; a rename that
    # empties the list would make the test below vacuous.
    assert {"keras_stability.models", "keras_stability.tuning"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
