"""What the CPU can do, read from /proc/cpuinfo: the features that decide which CPU path is fast
(AVX2, AVX-VNNI or AVX512-VNNI for int8, AVX512-BF16 or AMX for bf16; AMX also decides the int8
recipe, recipes.py)."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

#: Flags that decide the fast path, as /proc/cpuinfo names them, and how we print them.
FEATURES = {
    "avx2": "AVX2",
    "avx_vnni": "AVX-VNNI",
    "avx512_vnni": "AVX512-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware. Elsewhere torch and OpenVINO emulate it, slower than fp32."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    def features(self) -> dict[str, bool]:
        return {name: flag in self.flags for flag, name in FEATURES.items()}

    def describe(self) -> str:
        found = [name for name, present in self.features().items() if present]
        return f"{self.model} ({', '.join(found) or 'none of ' + ', '.join(FEATURES.values())})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags (every core of a machine has the same)."""
    model: str | None = None
    flags: frozenset[str] | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and flags is None:
            flags = frozenset(value.split())
    return CpuInfo(model or platform.processor() or platform.machine(), flags or frozenset())


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU. Where /proc/cpuinfo is missing, no feature is assumed."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            return parse_cpuinfo(file.read())
    except OSError:
        return CpuInfo(platform.processor() or platform.machine(), frozenset())
