"""The GPUs the cost planner knows (opd.studies.cost): dense bf16 FLOP/s, memory bandwidth and memory.

Figures are NVIDIA's published peaks (docs/cost.md lists the source of each). NVIDIA's datasheets print the
Tensor Core bf16 figure "with sparsity"; the dense figure used here is half of it. Plain data, no torch.
"""

from __future__ import annotations

import dataclasses

from opd.infra.io import InputError

TB = 1e12


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    label: str
    bf16_flops: float  # dense bf16 Tensor Core FLOP/s
    bandwidth: float  # HBM bytes/s
    memory_gb: float  # GB (10^9 bytes) as sold


GPUS = {g.name: g for g in (
    Gpu("h100_sxm", "NVIDIA H100 SXM5 80GB", 989.4e12, 3.35 * TB, 80),
    Gpu("h100_pcie", "NVIDIA H100 PCIe 80GB", 756.5e12, 2.0 * TB, 80),
    Gpu("h200", "NVIDIA H200 SXM 141GB", 989.4e12, 4.8 * TB, 141),
    Gpu("a100_80gb", "NVIDIA A100 SXM4 80GB", 312e12, 2.039 * TB, 80),
    Gpu("h800", "NVIDIA H800 SXM5 80GB", 989.4e12, 3.35 * TB, 80),
)}
ALIASES = {"h100": "h100_sxm", "h200_sxm": "h200", "a100": "a100_80gb", "h800_sxm": "h800"}


def known() -> list[str]:
    return sorted([*GPUS, *ALIASES])


def gpu(name: str, key: str = "resources.gpu_type") -> Gpu:
    """The GPU called `name` (case-insensitive; `h100` = the SXM part); an unknown name lists the known ones.
    `key`: the config key or flag that gave the name, for the message."""
    found = GPUS.get(ALIASES.get(name.lower(), name.lower()))
    if found is None:
        raise InputError(f"{key}: unknown GPU {name!r}; known: {', '.join(known())}")
    return found
