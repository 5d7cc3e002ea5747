"""One torch thread count for the tests' own computations and for the processes they start.

How many threads split a float reduction changes its rounding on some CPU kernels (seen with the generic ones,
``ATEN_CPU_CAPABILITY=default``), so a result computed in the test process and one computed in a child process
agree bit for bit only when both use the same count. One thread also suits the suite's tiny models: on a
shared 2-core machine OpenMP's barriers made a 3x7x64 batched matmul take 10 ms, 100x its work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

THREADS = 1
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what a child's torch and MKL start with


@contextlib.contextmanager
def torch_threads(count: int = THREADS) -> Iterator[None]:
    """This process computes with ``count`` torch threads inside the block, and with its earlier count after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def child_environment(count: int = THREADS, **variables: str) -> dict[str, str]:
    """This process's environment plus ``variables``, for a child that computes with ``count`` threads (kernel
    choices such as ``ATEN_CPU_CAPABILITY`` are inherited as they are)."""
    return {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(count)), **variables}
