"""A stand-in for nvidia-ml-py's `pynvml`, for tests on a machine with no GPU: the calls the
node agent and `telemetry/nvml.py` make, NVML's error codes, milliwatts. Its GPUs live in a
JSON file (`FAKE_NVML_STATE`), so a test and an agent in another process share them: the test
says how many GPUs, which one is lost, which XID arrives; the agent's limits land there.

A GPU's draw is its load (`draw_mw`) held under its limit, as a power-capped GPU's is.
"""

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_GPU_IS_LOST = 15
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
nvmlEventTypeXidCriticalError = 8

_MESSAGES = {3: "Not Supported", 4: "Insufficient Permissions", 9: "Driver Not Loaded", 10: "Timeout",
             15: "GPU is lost"}


class NVMLError(Exception):
    def __init__(self, value: int):
        self.value = value
        super().__init__(_MESSAGES.get(value, f"NVML error {value}"))


def gpu(index: int, name: str = "NVIDIA H100 80GB HBM3", draw_w: float = 500.0, ecc: bool = True) -> dict:
    return {"uuid": f"GPU-{index:08d}-fake", "name": name, "min_mw": 200_000, "max_mw": 700_000,
            "default_mw": 700_000, "limit_mw": 700_000, "draw_mw": int(draw_w * 1000), "lost": False, "ecc": ecc,
            "deny_set": False}


def write_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def read_state(path: Path) -> dict:
    return json.loads(path.read_text())


def _path() -> Path:
    return Path(os.environ["FAKE_NVML_STATE"])


def _gpu(handle: "Handle") -> dict:
    g = read_state(_path())["gpus"][handle.index]
    if g["lost"]:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    return g


class Handle:
    def __init__(self, index: int):
        self.index = index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Handle) and other.index == self.index

    def __hash__(self) -> int:
        return hash(self.index)


def nvmlInit() -> None:
    if read_state(_path()).get("init_error"):
        raise NVMLError(read_state(_path())["init_error"])


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(read_state(_path())["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> Handle:
    if index >= nvmlDeviceGetCount():
        raise NVMLError(2)
    return Handle(index)


def nvmlDeviceGetName(h: Handle) -> str:
    return _gpu(h)["name"]


def nvmlDeviceGetUUID(h: Handle) -> str:
    return _gpu(h)["uuid"]


def nvmlDeviceGetPowerManagementLimitConstraints(h: Handle) -> tuple[int, int]:
    g = _gpu(h)
    return g["min_mw"], g["max_mw"]


def nvmlDeviceGetPowerManagementDefaultLimit(h: Handle) -> int:
    return _gpu(h)["default_mw"]


def nvmlDeviceGetPowerManagementLimit(h: Handle) -> int:
    return _gpu(h)["limit_mw"]


def nvmlDeviceGetEnforcedPowerLimit(h: Handle) -> int:
    return _gpu(h)["limit_mw"]


def nvmlDeviceSetPowerManagementLimit(h: Handle, mw: int) -> None:
    state = read_state(_path())
    g = state["gpus"][h.index]
    if g["lost"]:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    if g["deny_set"]:
        raise NVMLError(NVML_ERROR_NO_PERMISSION)
    g["limit_mw"] = mw
    state.setdefault("set_calls", []).append([h.index, mw])
    write_state(_path(), state)


def nvmlDeviceGetPowerUsage(h: Handle) -> int:
    g = _gpu(h)
    return min(g["draw_mw"], g["limit_mw"])


def nvmlDeviceGetTemperature(h: Handle, sensor: int) -> int:
    return 40 + nvmlDeviceGetPowerUsage(h) // 20_000


def nvmlDeviceGetClockInfo(h: Handle, clock: int) -> int:
    g = _gpu(h)
    return int(1980 * min(1.0, g["limit_mw"] / max(1, g["draw_mw"])))


def nvmlDeviceGetUtilizationRates(h: Handle) -> SimpleNamespace:
    return SimpleNamespace(gpu=min(100, _gpu(h)["draw_mw"] // 6000), memory=30)


def nvmlDeviceGetTotalEnergyConsumption(h: Handle) -> int:
    return int(time.time() * nvmlDeviceGetPowerUsage(h) / 1000) % 10**12


def nvmlDeviceGetTotalEccErrors(h: Handle, error_type: int, counter: int) -> int:
    if not _gpu(h)["ecc"]:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return 3 if error_type == NVML_MEMORY_ERROR_TYPE_CORRECTED else 0


def nvmlEventSetCreate() -> object:
    return object()


def nvmlEventSetFree(event_set: object) -> None:
    pass


def nvmlDeviceRegisterEvents(h: Handle, types: int, event_set: object) -> None:
    _gpu(h)


def nvmlEventSetWait_v2(event_set: object, timeout_ms: int) -> SimpleNamespace:
    state = read_state(_path())
    if state.get("xid"):
        index, code = state["xid"].pop(0)
        write_state(_path(), state)
        return SimpleNamespace(device=Handle(index), eventType=nvmlEventTypeXidCriticalError, eventData=code,
                               gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
    time.sleep(min(timeout_ms, 50) / 1000)
    raise NVMLError(NVML_ERROR_TIMEOUT)
