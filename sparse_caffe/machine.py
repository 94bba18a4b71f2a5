"""What a measurement ran on: recorded with every benchmark result."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_info(threads: int, load_before: tuple[float, float, float]) -> dict:
    """CPU model, cores, SIMD flags, memory, OS, threads used, and the load before and after."""
    cpu, flags = platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == platform.machine():
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = sorted(f for f in line.split(":", 1)[1].split()
                               if f.startswith(("avx", "sse4", "fma", "f16c", "amx")))
        memory = next(int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        memory = None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "simd_flags": flags,
            "memory_mib": memory, "os": platform.platform(), "machine": platform.machine(),
            "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())}
