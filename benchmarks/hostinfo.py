"""The CPU a benchmark ran on, for its JSON (not a benchmark: a helper the scripts beside it
import). No JAX import, so the retrieval and server benchmarks can use it;
``attention.machine()`` names the accelerator instead where there is one."""

from __future__ import annotations

import os
import platform


def cpu_machine() -> str:
    """The CPU model, its AVX-512/AMX flags and the cores this process may use, e.g.
    ``"AMD EPYC, 2 cores"``: these 2-core boxes differ (an AVX-512/AMX Xeon is much faster at
    matmuls), so a figure names which one gave it."""
    model, features = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as handle:
            info = handle.read().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
        flags = set(next(line for line in info if line.startswith("flags")).split())
        features = "/".join(
            name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in flags
        )
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0))
    return f"{model}{f' ({features})' if features else ''}, {cores} cores"
