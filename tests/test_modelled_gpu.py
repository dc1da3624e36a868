"""The modelled GPU: what it draws for prompt and token steps, what a cap holds and costs,
and the DCGM exporter's series it exports (checked by promtool)."""

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleetwise import gpus
from fleetwise.telemetry.modelled_gpu import ModelledGPU

H100 = gpus.PRODUCTS["H100"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def busy(gpu: ModelledGPU, clock: Clock, prompt_tokens: int, decode_seqs: int, seconds: float = 2.0) -> float:
    """Back-to-back steps of 10 ms for `seconds`; returns the last stretch."""
    factor = 1.0
    for _ in range(int(seconds / 0.01)):
        clock.now += 0.01
        factor = gpu.step(prompt_tokens, decode_seqs, 0.01)
        clock.now += 0.01 * (factor - 1)  # the caller waits out the cap
    return factor


def test_idle_prompt_and_token_power():
    clock = Clock()
    gpu = ModelledGPU(H100, clock=clock)
    clock.now += 5
    assert gpu.readings()["power"] == pytest.approx(H100.idle_watts)
    assert gpu.readings()["utilisation"] == 0
    busy(gpu, clock, 4096, 0)
    assert gpu.readings()["power"] == pytest.approx(1.022 * H100.rated_watts, rel=0.01)
    assert gpu.readings()["utilisation"] == pytest.approx(1.0)
    busy(gpu, clock, 0, 32)
    assert gpu.readings()["power"] == pytest.approx(gpus.TOKEN_POWER * H100.rated_watts, rel=0.01)


def test_a_cap_holds_the_draw_slows_prompt_steps_and_the_clock():
    clock = Clock()
    gpu = ModelledGPU(H100, clock=clock)
    gpu.set_cap(350)
    factor = busy(gpu, clock, 4096, 0)
    r = gpu.readings()
    assert r["power"] == pytest.approx(350, rel=0.01)
    assert factor == pytest.approx((1.022 * 700 / 350) ** gpus.PROMPT_CAP_EXPONENT)
    assert r["clock"] < H100.max_sm_clock_mhz * 0.8
    assert busy(gpu, clock, 0, 32) < 1.02  # a token step barely notices half the power
    with pytest.raises(ValueError, match="from 200 to 700 W"):
        gpu.set_cap(150)


def test_energy_counts_steps_and_idle_time():
    clock = Clock()
    gpu = ModelledGPU(H100, clock=clock)
    clock.now += 10
    busy(gpu, clock, 4096, 0, seconds=1.0)
    expected = 10 * H100.idle_watts + 1.0 * 1.022 * H100.rated_watts
    assert gpu.readings()["energy"] == pytest.approx(expected, rel=0.01)


def test_the_dcgm_exporters_series_and_labels():
    registry = CollectorRegistry()
    gpu = ModelledGPU(H100, index=3, hostname="node-a", extra_labels={"pod": "w-0", "namespace": "models",
                                                                    "container": "worker"})
    registry.register(gpu)
    gpu.set_cap(500)
    page = generate_latest(registry).decode()
    for name in ("DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_POWER_MGMT_LIMIT", "DCGM_FI_DEV_ENFORCED_POWER_LIMIT",
                 "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_XID_ERRORS",
                 "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"):
        assert f"\n{name}{{" in page, name
    [limit] = [s for f in text_string_to_metric_families(page) if f.name == "DCGM_FI_DEV_POWER_MGMT_LIMIT"
               for s in f.samples]
    assert limit.value == 500.0
    assert limit.labels["UUID"].startswith("GPU-") and {k: v for k, v in limit.labels.items() if k != "UUID"} == {
        "gpu": "3", "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "node-a", "pod": "w-0", "namespace": "models",
        "container": "worker"}
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed to lint /metrics"
    lint = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, text=True)
    # DCGM's own label names (modelName, UUID, Hostname) are camelCase, which promtool's style
    # lint (exit code 3) points out; anything else it says is a fault of ours
    problems = [line for line in (lint.stdout + lint.stderr).splitlines()
                if line.strip() and "label names should be written in 'snake_case'" not in line]
    assert lint.returncode in (0, 3) and not problems, lint.stdout + lint.stderr


def test_an_engine_without_a_gpu_steps_as_the_modelled_one_and_waits_out_its_cap(tiny_model_dir, monkeypatch):
    from fleetwise.worker.engine import engine as engine_module
    from fleetwise.worker.engine.config import EngineConfig
    from fleetwise.worker.engine.engine import LLMEngine
    from fleetwise.worker.engine.sequence import SamplingParams

    waited: list[float] = []
    monkeypatch.setattr(engine_module.time, "sleep", waited.append)
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_blocks=64, device="cpu", modelled_gpu="H100"))
    assert engine.gpu is not None
    engine.add_request("a", list(range(1, 200)), SamplingParams(max_tokens=4, temperature=0))
    while engine.has_work():
        engine.step()
    assert waited == []  # uncapped: no step takes longer
    assert engine.gpu.readings()["energy"] > 0
    page = generate_latest(engine.metrics.registry).decode()
    assert "DCGM_FI_DEV_POWER_USAGE{" in page and "vllm:num_requests_running" in page  # one /metrics page
    engine.gpu.set_cap(200)
    engine.add_request("b", list(range(300, 500)), SamplingParams(max_tokens=2, temperature=0))
    while engine.has_work():
        engine.step()
    assert waited and all(w > 0 for w in waited)  # the prompt step ran longer under the cap


def test_kubernetes_labels_come_from_the_downward_api():
    from fleetwise.telemetry.modelled_gpu import kubernetes_labels
    assert kubernetes_labels({}) == {}
    assert kubernetes_labels({"POD_NAME": "w-0", "POD_NAMESPACE": "models"}) == {
        "pod": "w-0", "namespace": "models", "container": "worker"}


def test_the_worker_command_takes_a_known_product_only(tiny_model_dir):
    from typer.testing import CliRunner

    from fleetwise.cli import app
    r = CliRunner().invoke(app, ["worker", "--model", str(tiny_model_dir), "--public-only", "--modelled-gpu", "Z100"])
    assert r.exit_code == 2 and "--modelled-gpu" in r.output and "H100" in r.output
