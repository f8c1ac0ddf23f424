"""The ``Examples:`` blocks of the public docstrings run and print what they say.

Each module below carries ``>>>`` examples in its public functions' and classes'
docstrings; this runs them with :mod:`doctest` so that a changed behaviour (or a stale
example) fails the suite instead of misleading a reader.
"""

import doctest
import importlib

import pytest

# Explicit, so that a module losing its examples fails here instead of passing unnoticed.
MODULES = [
    "fastcore.ops.gather",
    "fastcore.ops.segment",
    "fastcore.ops._csr",
    "fastcore.ops.feature_mlp",
    "fastcore.ops.time_conv",
    "fastcore.ops.spmm",
    "fastcore.ops.memory",
    "fastcore.compat",
    "fastcore.nn.dropout",
    "fastcore.nn.pooling",
    "fastcore.nn.sample_random",
    "fastcore.nn.spatiotemporal",
    "fastcore.nn.temporal",
    "fastcore.nn.heads",
    "fastcore.nn.kv",
    "fastcore.data.panel",
    "fastcore.data.epidemic",
    "fastcore.train.jobs",
    "fastcore.train.config",
    "fastcore.train.trainer",
    "fastcore.train.checkpoint",
    "fastcore.train.allocator",
    "fastcore.train.cli",
    "fastcore.losses",
    "fastcore.metrics",
    "fastcore.graph",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    # import_module, not attribute access: fastcore.ops re-exports functions under the
    # names of their modules (fastcore.ops.gather is the function).
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False
    )
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
