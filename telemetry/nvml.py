"""A real GPU through NVML (`nvidia-ml-py`), for the node agent: read the limits the driver
accepts, set one, go back to the default; read what the DCGM exporter would (power, limits,
temperature, SM clock, utilisation, energy, ECC counters) and watch for XID errors.

Setting a limit needs privileges (root or CAP_SYS_ADMIN on the node) that a worker
container does not have; NVML then says NO_PERMISSION and this says so plainly
(`NvmlRefused`) instead of pretending the cap holds. The import is guarded: without the
package or a driver, `NvmlUnavailable` says which. A reading NVML does not support on a GPU
(ECC on a consumer card, say) is None, never a zero; any other error is that GPU's
(`NvmlUnavailable`), so one failing GPU does not hide the others.
"""

import ctypes
import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


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
            self.name = _text(nv.nvmlDeviceGetName(self._handle))
            self.uuid = _text(nv.nvmlDeviceGetUUID(self._handle))
        except nv.NVMLError as e:
            raise NvmlUnavailable(f"GPU {self.index}: {e}") from e
        self.min_watts, self.max_watts = lo / 1000, hi / 1000

    def limit_watts(self) -> float:
        nv = _nvml()
        try:
            return nv.nvmlDeviceGetPowerManagementLimit(self._handle) / 1000
        except nv.NVMLError as e:
            raise NvmlUnavailable(f"GPU {self.index}: {e}") from e

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

    def read(self) -> "GpuReading":
        """What the GPU reports now; NvmlUnavailable when it does not answer (lost, reset)."""
        nv, h = _nvml(), self._handle

        def get(call: Any, *args: Any) -> Any:
            try:
                return call(h, *args)
            except nv.NVMLError as e:
                if getattr(e, "value", None) == nv.NVML_ERROR_NOT_SUPPORTED:
                    return None
                raise NvmlUnavailable(f"GPU {self.index} ({self.uuid}): {e}") from e

        def watts(mw: int | None) -> float | None:
            return None if mw is None else mw / 1000

        util = get(nv.nvmlDeviceGetUtilizationRates)
        return GpuReading(
            power_watts=watts(get(nv.nvmlDeviceGetPowerUsage)),
            limit_watts=watts(get(nv.nvmlDeviceGetPowerManagementLimit)),
            enforced_watts=watts(get(nv.nvmlDeviceGetEnforcedPowerLimit)),
            temperature_c=get(nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU),
            sm_clock_mhz=get(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM),
            utilisation_pct=None if util is None else util.gpu,
            energy_mj=get(nv.nvmlDeviceGetTotalEnergyConsumption),
            ecc_corrected=get(nv.nvmlDeviceGetTotalEccErrors, nv.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                              nv.NVML_VOLATILE_ECC),
            ecc_uncorrected=get(nv.nvmlDeviceGetTotalEccErrors, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                nv.NVML_VOLATILE_ECC))


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class GpuReading:
    power_watts: float | None
    limit_watts: float | None
    enforced_watts: float | None
    temperature_c: float | None
    sm_clock_mhz: float | None
    utilisation_pct: float | None
    energy_mj: float | None
    ecc_corrected: int | None     # volatile (since the driver loaded), as DCGM's *_VOL_TOTAL
    ecc_uncorrected: int | None


def all_gpus() -> tuple[list[NvmlGPU], list[str]]:
    """Every GPU NVML sees, and why any could not be opened (that GPU is left out)."""
    nv = _nvml()
    try:
        count = nv.nvmlDeviceGetCount()
    except nv.NVMLError as e:
        raise NvmlUnavailable(f"NVML could not count the GPUs: {e}") from e
    found, failed = [], []
    for i in range(count):
        try:
            found.append(NvmlGPU(i))
        except NvmlUnavailable as e:
            failed.append(str(e))
    return found, failed


class XidWatch:
    """The last XID error of each GPU (DCGM's XID_ERRORS gauge: the code, 0 for none), from
    NVML's critical-error events, waited for in a thread."""

    def __init__(self, gpus: list[NvmlGPU], wait_ms: int = 1000) -> None:
        nv = _nvml()
        self.last: dict[int, int] = {g.index: 0 for g in gpus}
        self.watched: set[int] = set()
        self._handles = {_address(g._handle): g.index for g in gpus}
        self._stop = threading.Event()
        self._wait_ms = wait_ms
        self._set = nv.nvmlEventSetCreate()
        for g in gpus:
            try:
                nv.nvmlDeviceRegisterEvents(g._handle, nv.nvmlEventTypeXidCriticalError, self._set)
                self.watched.add(g.index)
            except nv.NVMLError as e:  # not supported on this GPU, or it is gone: no XID series for it
                log.warning("GPU %s: XID events not watched: %s", g.index, e)
        self._thread = threading.Thread(target=self._run, name="xid-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nv = _nvml()
        while not self._stop.is_set():
            try:
                data = nv.nvmlEventSetWait_v2(self._set, self._wait_ms)
            except nv.NVMLError as e:
                if getattr(e, "value", None) != nv.NVML_ERROR_TIMEOUT:
                    log.warning("XID watch: %s", e)
                    self._stop.wait(self._wait_ms / 1000)
                continue
            gpu = self._handles.get(_address(data.device))
            if gpu is not None and data.eventType & nv.nvmlEventTypeXidCriticalError:
                self.last[gpu] = int(data.eventData)
                log.error("GPU %s: XID %s", gpu, data.eventData)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._wait_ms / 1000 + 2)
        try:
            _nvml().nvmlEventSetFree(self._set)
        except Exception as e:  # shutting down: say it, go on
            log.warning("XID watch: the event set was not freed: %s", e)


def _address(handle: Any) -> Any:
    """What identifies a device handle: NVML's are ctypes pointers, a new object per call."""
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value
    return handle
