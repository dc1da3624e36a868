"""A real GPU's power limit through NVML (`nvidia-ml-py`), for a worker or node agent that has
one: read the limits the driver accepts, set one, go back to the default.

Setting a limit needs privileges (root or CAP_SYS_ADMIN on the node) that a worker
container does not have; NVML then says NO_PERMISSION and this says so plainly
(`NvmlRefused`) instead of pretending the cap holds. The import is guarded: without the
package or a driver, `NvmlUnavailable` says which. Telemetry itself (power, clocks, XID)
comes from the DCGM exporter on GPU nodes, not from here.
"""

import threading
from dataclasses import dataclass
from typing import Any


class NvmlUnavailable(RuntimeError):
    """No NVML here: the package, the driver or the GPU is missing."""


class NvmlRefused(RuntimeError):
    """NVML answered, but would not do it (no permission, not supported); the message says why."""


_init_lock = threading.Lock()
_initialised = False


def _nvml() -> Any:
    global _initialised
    try:
        import pynvml
    except ImportError as e:
        raise NvmlUnavailable("the nvidia-ml-py package is not installed") from e
    with _init_lock:
        if not _initialised:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as e:
                raise NvmlUnavailable(f"NVML did not start (no NVIDIA driver or GPU?): {e}") from e
            _initialised = True
    return pynvml


@dataclass
class NvmlGPU:
    """One GPU by its NVML index. Watts in, milliwatts to NVML."""
    index: int = 0

    def __post_init__(self) -> None:
        nv = _nvml()
        try:
            self._handle = nv.nvmlDeviceGetHandleByIndex(self.index)
            lo, hi = nv.nvmlDeviceGetPowerManagementLimitConstraints(self._handle)
            self.default_watts = nv.nvmlDeviceGetPowerManagementDefaultLimit(self._handle) / 1000
            self.name = str(nv.nvmlDeviceGetName(self._handle))
        except nv.NVMLError as e:
            raise NvmlUnavailable(f"GPU {self.index}: {e}") from e
        self.min_watts, self.max_watts = lo / 1000, hi / 1000

    def limit_watts(self) -> float:
        nv = _nvml()
        return nv.nvmlDeviceGetPowerManagementLimit(self._handle) / 1000

    def set_limit(self, watts: float | None) -> None:
        """`watts` within [min_watts, max_watts]; None: back to the default limit."""
        nv = _nvml()
        target = self.default_watts if watts is None else watts
        if not self.min_watts <= target <= self.max_watts:
            raise ValueError(f"{self.name} takes a power limit from {self.min_watts:g} to {self.max_watts:g} W; "
                             f"got {target:g}")
        try:
            nv.nvmlDeviceSetPowerManagementLimit(self._handle, round(target * 1000))
        except nv.NVMLError as e:
            hint = (" (setting a power limit needs root or CAP_SYS_ADMIN: the node agent does it, not a worker)"
                    if getattr(e, "value", None) == nv.NVML_ERROR_NO_PERMISSION else "")
            raise NvmlRefused(f"NVML refused a {target:g} W limit on GPU {self.index}: {e}{hint}") from e
