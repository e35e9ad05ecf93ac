"""The CPU a benchmark ran on, for its JSON (not a benchmark: a helper the scripts beside it
import). No JAX import, so the retrieval and server benchmarks can use it;
``attention.machine()`` names the accelerator instead where there is one."""

from __future__ import annotations

import os
import platform


def cpu_machine() -> str:
    """The CPU model, its family and model numbers, its AVX-512/AMX flags and the cores this
    process may use, e.g. ``"AMD EPYC (family 23 model 1), 2 cores"``: these 2-core boxes differ
    (an AVX-512/AMX Xeon is much faster at matmuls; the VMs name every AMD generation "AMD
    EPYC", and a family 23 one ran the test suite about 1.9x as long as a family 25 one), so a
    figure names which one gave it."""
    model, details = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as handle:
            info = handle.read().splitlines()

        def field(name: str) -> str:
            return next(
                line.split(":", 1)[1].strip() for line in info if line.split(":")[0].strip() == name
            )

        model = field("model name")
        details.append(f"family {field('cpu family')} model {field('model')}")
        flags = set(field("flags").split())
        details += [
            name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in flags
        ]
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0))
    shown = f" ({', '.join(details)})" if details else ""
    return f"{model}{shown}, {cores} cores"
