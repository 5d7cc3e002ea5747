"""Tolerances for comparing two different computations of the same values, portable across x86-64 CPUs.

Two computations that agree in exact arithmetic (a fused ``addmm`` against a matmul then a multiply,
batched against per-row matmuls, or one BLAS code path against the one another CPU picks) round
differently. How far apart they land grows with the size of the values and the precision of the
dtype, so a fixed ``atol`` that holds on one CPU fails on another once the values are a few units
large. These helpers allow a number of rounding steps (units in the last place) at the scale of the
largest expected value instead. Where both sides run the same kernels on the same inputs (resume,
save/load, frozen weights), compare with ``torch.equal``: any difference there is a bug.
"""

from __future__ import annotations

import torch

# Worst gaps seen: about 29 ulps on an AMD EPYC (T5 LoRA against peft: 1.4e-5 at max |logit| 4.0) and at
# most 7 on an AVX-512 Xeon with MKL forced to its AVX2 / SSE4.2 paths and ATen to its default / AVX2
# kernels (HyperLoader aside: see HYPER_ULPS in test_adapters_model.py). A real bug (a wrong scale, a
# skipped skill) shows up as thousands of ulps or more.
DEFAULT_ULPS = 128


def tolerances(expected: torch.Tensor, ulps: float = DEFAULT_ULPS) -> tuple[float, float]:
    """(atol, rtol): ``ulps`` machine epsilons of ``expected``'s dtype, atol times max |expected|."""
    eps = torch.finfo(expected.dtype).eps
    return ulps * eps * expected.detach().abs().max().item(), ulps * eps


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, ulps: float = DEFAULT_ULPS) -> None:
    """``torch.testing.assert_close`` with :func:`tolerances` (so dtypes must match, as there)."""
    atol, rtol = tolerances(expected, ulps)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                               msg=lambda text: f"{text}\n(allowed: {ulps} ulps at max |expected|)")


def assert_differs_scaled(actual: torch.Tensor, expected: torch.Tensor, ulps: float = DEFAULT_ULPS) -> None:
    """Fail unless some element differs by more than rounding explains: a change must really change the output."""
    atol, rtol = tolerances(expected, ulps)
    assert not torch.allclose(actual, expected, atol=atol, rtol=rtol), "the outputs agree up to rounding"
