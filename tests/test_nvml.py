"""telemetry/nvml.py's side of NVML: watts to milliwatts, the range the driver gives, and a
refusal said plainly. No GPU here: a stand-in `pynvml` module answers as NVML does (its
calls and error codes); a real GPU's answers are not tested by this file."""

import sys
import types

import pytest

from fleetwise.telemetry import nvml

NO_PERMISSION, NOT_SUPPORTED, DRIVER_NOT_LOADED = 4, 3, 9


class NVMLError(Exception):
    def __init__(self, value: int):
        self.value = value
        super().__init__({NO_PERMISSION: "Insufficient Permissions", NOT_SUPPORTED: "Not Supported",
                          DRIVER_NOT_LOADED: "Driver Not Loaded"}[value])


def fake_pynvml(init_error: int | None = None, set_error: int | None = None) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError
    m.NVML_ERROR_NO_PERMISSION = NO_PERMISSION
    m.limit_mw = 700_000
    m.set_calls = []

    def init():
        if init_error is not None:
            raise NVMLError(init_error)

    def set_limit(handle, mw):
        if set_error is not None:
            raise NVMLError(set_error)
        m.set_calls.append(mw)
        m.limit_mw = mw

    m.nvmlInit = init
    m.nvmlDeviceGetHandleByIndex = lambda i: f"handle-{i}"
    m.nvmlDeviceGetPowerManagementLimitConstraints = lambda h: (200_000, 700_000)
    m.nvmlDeviceGetPowerManagementDefaultLimit = lambda h: 700_000
    m.nvmlDeviceGetPowerManagementLimit = lambda h: m.limit_mw
    m.nvmlDeviceGetName = lambda h: "NVIDIA H100 80GB HBM3"
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    m.nvmlDeviceSetPowerManagementLimit = set_limit
    return m


@pytest.fixture
def with_nvml(monkeypatch):
    def install(**kw) -> types.ModuleType:
        module = fake_pynvml(**kw)
        monkeypatch.setitem(sys.modules, "pynvml", module)
        monkeypatch.setattr(nvml, "_initialised", False)
        return module
    return install


def test_a_limit_in_range_goes_to_nvml_in_milliwatts_and_none_restores_the_default(with_nvml):
    fake = with_nvml()
    gpu = nvml.NvmlGPU(0)
    assert (gpu.min_watts, gpu.max_watts, gpu.default_watts) == (200, 700, 700)
    gpu.set_limit(350.5)
    assert fake.set_calls == [350_500] and gpu.limit_watts() == 350.5
    gpu.set_limit(None)
    assert fake.set_calls[-1] == 700_000


def test_a_limit_out_of_range_is_refused_before_nvml_is_asked(with_nvml):
    fake = with_nvml()
    with pytest.raises(ValueError, match="from 200 to 700 W; got 150"):
        nvml.NvmlGPU(0).set_limit(150)
    assert fake.set_calls == []


def test_no_permission_is_said_plainly_with_who_can(with_nvml):
    with_nvml(set_error=NO_PERMISSION)
    with pytest.raises(nvml.NvmlRefused, match=r"Insufficient Permissions.*node agent"):
        nvml.NvmlGPU(0).set_limit(400)


def test_no_driver_or_no_package_is_unavailable(with_nvml, monkeypatch):
    with_nvml(init_error=DRIVER_NOT_LOADED)
    with pytest.raises(nvml.NvmlUnavailable, match="Driver Not Loaded"):
        nvml.NvmlGPU(0)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # an import of it fails
    with pytest.raises(nvml.NvmlUnavailable, match="nvidia-ml-py"):
        nvml.NvmlGPU(0)
