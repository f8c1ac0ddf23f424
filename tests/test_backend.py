"""The backend machinery: availability, forcing, fallback without the extension."""

import os
import subprocess
import sys

import pytest
import torch

import fastcore
from fastcore import _backend


def test_backends_reports_what_is_usable():
    report = fastcore.backends()
    assert set(report) == set(fastcore.BACKENDS)
    assert report["reference"] is True
    assert report["cpu"] is (_backend._C is not None)
    assert report["cuda"] is (_backend.BUILD_INFO.get("cuda", False) and torch.cuda.is_available())


def test_extension_is_built_here():
    """`make test` builds fastcore._C; a silent fallback to the reference would hide that."""
    assert _backend._C is not None
    assert _backend.BUILD_INFO["openmp"] is True


def test_automatic_choice_per_device():
    with fastcore.use_backend(None):
        assert _backend.resolve("gather", torch.device("cpu")) == "cpu"
        if torch.cuda.is_available():
            assert _backend.resolve("gather", torch.device("cuda")) in ("cuda", "triton")
        assert _backend.resolve("gather", torch.device("meta")) == "reference"


def test_set_backend_and_use_backend_restore():
    before = fastcore.get_backend()
    with fastcore.use_backend("reference"):
        assert fastcore.get_backend() == "reference"
        assert _backend.resolve("gather", torch.device("cpu")) == "reference"
        with fastcore.use_backend("cpu"):
            assert fastcore.get_backend() == "cpu"
        assert fastcore.get_backend() == "reference"
    assert fastcore.get_backend() == before


def test_unknown_backend_is_an_error():
    with pytest.raises(
        ValueError, match="unknown backend 'gpu'; expected one of reference, cpu, triton, cuda"
    ):
        fastcore.set_backend("gpu")


def test_forced_backend_that_cannot_run_is_an_error():
    src = torch.randn(3, 4)
    with (
        fastcore.use_backend("cuda"),
        pytest.raises(
            RuntimeError, match=r"backend 'cuda'.*cannot run fastcore\.ops\.gather on a cpu tensor"
        ),
    ):
        fastcore.ops.gather(src, torch.tensor([0]), 0)


def test_fused_ops_run_their_composite_where_no_kernel_runs():
    """linear_norm_residual, feature_mlp and time_conv own the choice of their composite: a
    forced backend they do not implement, or a device without their kernel, runs it (the
    layers that call them hold no fallback of their own); other ops still refuse."""
    cpu, meta = torch.device("cpu"), torch.device("meta")
    with fastcore.use_backend(None):
        for op in ("linear_norm_residual", "feature_mlp", "time_conv"):
            assert _backend.resolve(op, meta) == "composite", op
        assert _backend.resolve("spmm", meta) == "reference"
    with fastcore.use_backend("cuda"):  # implemented by none of the three
        for op in ("linear_norm_residual", "feature_mlp", "time_conv"):
            assert _backend.resolve(op, cpu) == "composite", op
    with fastcore.use_backend("triton"):
        assert _backend.resolve("linear_norm_residual", cpu) == "composite"
    g = torch.Generator().manual_seed(0)
    h, x = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    weight, params = torch.randn(4, 8, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    args = (h, x, weight, params[0], params[1], params[2], 0.5)
    with fastcore.use_backend("cuda"):
        out = fastcore.ops.linear_norm_residual(*args)
    expected = fastcore.reference.linear_norm_residual(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _run(code, **env):
    environment = {k: v for k, v in os.environ.items() if k != "FASTCORE_BACKEND"}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300
    )


def test_environment_variable_forces_a_backend():
    result = _run("import fastcore; print(fastcore.get_backend())", FASTCORE_BACKEND="reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"
    bad = _run("import fastcore", FASTCORE_BACKEND="fast")
    assert bad.returncode != 0 and "FASTCORE_BACKEND: unknown backend 'fast'" in bad.stderr


def test_missing_extension_warns_once_and_uses_the_reference():
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['fastcore._C'] = None  # makes `from fastcore import _C` fail\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastcore\n"
        "    import fastcore.ops\n"
        "print(sum('fastcore._C is not importable' in str(w.message) for w in caught))\n"
        "print(fastcore.backends()['cpu'], fastcore._backend.resolve('gather', torch.device('cpu')))\n"
        "src = torch.randn(5, 3, requires_grad=True)\n"
        "out = fastcore.ops.gather(src, torch.tensor([4, 0, 4]), 0)\n"
        "out.sum().backward()\n"
        "print(torch.equal(out, src[[4, 0, 4]]), src.grad[4].tolist())\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["1", "False reference", "True [2.0, 2.0, 2.0]"]
