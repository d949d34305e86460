"""Every docstring example of the library runs and prints what it says (pytest collects this, not --doctest-modules,
so that a module whose optional dependency is missing is reported instead of breaking collection)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import xaiwatch

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(xaiwatch.__path__, "xaiwatch.") if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as err:  # an optional extra (umap, modelscope) that this environment lacks
        pytest.skip(f"{name} needs an optional dependency: {err}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} failing docstring example(s) in {name}"


def test_every_public_callback_and_engine_entry_point_has_an_example():
    from pytorch_lightning.callbacks import Callback

    from xaiwatch import callbacks
    from xaiwatch.explain import base

    classes = [getattr(callbacks, n) for n in callbacks.__all__]
    objects = [c for c in classes if isinstance(c, type) and issubclass(c, Callback)]
    objects += [base.get_engine, base.Engine.explain_boxes]
    missing = [o.__qualname__ for o in objects if ">>>" not in (o.__doc__ or "")]
    assert not missing, f"no docstring example: {missing}"
