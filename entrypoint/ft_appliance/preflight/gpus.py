"""What GPUs this process can see, behind one small interface so policy can be tested with recorded
inventories of real cards. NVML (nvidia-ml-py) is the source; torch is the fallback.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_mib: int
    memory_free_mib: int
    compute_capability: tuple[int, int]
    uuid: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[GpuInfo, ...]
    driver_version: str | None
    driver_cuda: str | None
    """Highest CUDA version the driver supports ("13.0")."""
    torch_cuda: str | None
    """CUDA version torch was built for (None for a CPU build)."""
    source: str
    error: str | None = None
    """Why no GPU could be read (NVML missing, driver not loaded), when gpus is empty."""

    @property
    def count(self) -> int:
        return len(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["count"] = self.count
        return d


class InventorySource(Protocol):
    def __call__(self) -> Inventory: ...


def _visible_filter(n: int) -> list[int]:
    """Indices NVML should report, following CUDA_VISIBLE_DEVICES (numbers only; UUIDs are matched
    by the caller), so the count is what CUDA in this process will see."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return list(range(n))
    out = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if part.isdigit():
            if int(part) < n:
                out.append(int(part))
        else:
            return [-1]  # UUIDs or MIG names: matched below
    return out


def read_nvml() -> Inventory:
    """NVML first (no CUDA context, nothing allocated); torch's view when NVML cannot be read."""
    torch_cuda = _torch_cuda_version()
    try:
        import pynvml
    except ImportError:
        return read_torch(torch_cuda, "nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return read_torch(torch_cuda, f"NVML could not start ({exc}): no NVIDIA driver visible")
    try:
        driver = _s(pynvml.nvmlSystemGetDriverVersion())
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        driver_cuda = f"{cuda // 1000}.{(cuda % 1000) // 10}"
        total = pynvml.nvmlDeviceGetCount()
        wanted = _visible_filter(total)
        raw = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        gpus = []
        for i in range(total):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = _s(pynvml.nvmlDeviceGetUUID(h))
            if wanted == [-1]:
                if not any(uuid.startswith(p.strip()) for p in raw.split(",") if p.strip()):
                    continue
            elif i not in wanted:
                continue
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(
                GpuInfo(
                    len(gpus),
                    _s(pynvml.nvmlDeviceGetName(h)),
                    int(mem.total) // 2**20,
                    int(mem.free) // 2**20,
                    (int(major), int(minor)),
                    uuid,
                )
            )
        return Inventory(tuple(gpus), driver, driver_cuda, torch_cuda, "nvml")
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def read_torch(torch_cuda: str | None, nvml_error: str) -> Inventory:
    """The fallback: only when torch is a CUDA build, since importing it costs seconds."""
    if torch_cuda is None:
        return Inventory((), None, None, None, "nvml", nvml_error)
    try:
        import torch

        if not torch.cuda.is_available():
            return Inventory((), None, None, torch_cuda, "torch", f"{nvml_error}; torch sees no CUDA device")
        gpus = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(GpuInfo(i, p.name, total // 2**20, free // 2**20, (p.major, p.minor)))
        return Inventory(tuple(gpus), None, None, torch_cuda, "torch")
    except Exception as exc:  # noqa: BLE001 - a broken CUDA setup reads as "no GPU", with the reason
        return Inventory((), None, None, torch_cuda, "torch", f"{nvml_error}; torch: {exc}")


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _torch_cuda_version() -> str | None:
    """torch's build CUDA version from its version file, without importing torch (seconds)."""
    try:
        from importlib.metadata import files

        for f in files("torch") or []:
            if f.name == "version.py" and f.parent.name == "torch":
                text = f.read_text()
                for line in text.splitlines():
                    if line.startswith("cuda"):
                        value = line.split("=", 1)[1].strip().strip("'\"")
                        return None if value in ("None", "") else value
    except Exception:  # noqa: BLE001 - any failure means "unknown", never fatal
        return None
    return None


def inventory_from_dict(d: dict[str, Any]) -> Inventory:
    """Rebuild a recorded inventory (tests feed these instead of reading NVML)."""
    gpus = tuple(
        GpuInfo(
            g["index"],
            g["name"],
            g["memory_total_mib"],
            g.get("memory_free_mib", g["memory_total_mib"]),
            tuple(g["compute_capability"]),
            g.get("uuid", ""),
        )  # type: ignore[arg-type]
        for g in d.get("gpus", [])
    )
    return Inventory(
        gpus,
        d.get("driver_version"),
        d.get("driver_cuda"),
        d.get("torch_cuda"),
        d.get("source", "recorded"),
        d.get("error"),
    )
