"""One header line naming the CPU a benchmark ran on and the instruction sets its figures depend on.

int8 speed depends on dot-product instructions (x86 VNNI, Arm's ``asimddp``), OpenVINO's f16/unset
precision hints resolve to bf16 on CPUs with ``avx512_bf16``/``amx_bf16``: a figure means little without
them, and CI runs on whichever CPU a session gets.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["INT8_DOT_FLAGS", "cpu_flags", "cpu_line", "has_int8_dot"]

# The flags, as /proc/cpuinfo spells them, that change what int8/bf16/f16 code runs.
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
         "avx512_fp16", "asimddp", "bf16", "fphp", "i8mm")  # fmt: skip


# Int8 dot-product instructions: where the int8 speed targets apply (elsewhere ratios are reported).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    return flags


def has_int8_dot() -> bool:
    """Whether this CPU has an int8 dot-product instruction (x86 VNNI/AMX, Arm ``asimddp``)."""
    return bool(cpu_flags() & set(INT8_DOT_FLAGS))


def cpu_line() -> str:
    """``cpu: <model>, <n> CPUs, int8/bf16 features: ...`` (from /proc/cpuinfo where there is one)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and model in ("", platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    features = [f for f in FLAGS if f in flags] or ["(none of " + ", ".join(FLAGS[:5]) + ", ...)"]
    return f"cpu: {model}, {os.cpu_count()} CPUs, {platform.machine()}, int8/bf16 features: {' '.join(features)}"


if __name__ == "__main__":
    print(cpu_line())
