"""A GPU that is not there: it draws what fleetwise/gpus.py says the engine's steps draw, takes
a power cap, and exports the DCGM exporter's series, so that the power controller's PromQL is
the same on a laptop and on a GPU fleet.

Where there is a real GPU the DCGM exporter is the source and nothing of fleetwise exports
these names; the modelled GPU exists only where there is none (tests, `fleetwise up` on a
CPU, the simulator). The engine reports each step (its prompt tokens, its decodes and how long
it took); under a cap the step would have run `stretch` times longer, which the caller may
wait out so that a cap's cost shows in the latencies too.

Readings at scrape time: power is the mean draw over the last `window` seconds (steps at their
modelled draw, the rest of the window at idle); energy is a counter since start; utilisation is
the busy share of the window; the SM clock follows the cap (gpus.clock_mhz); temperature is
ambient plus `KELVIN_PER_WATT` times the power, a rough figure no controller reads.
"""

import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fleetwise import gpus

from . import catalog as c

AMBIENT_C = 30.0
KELVIN_PER_WATT = 0.08


class ModelledGPU(Collector):
    def __init__(self, product: gpus.GPUProduct, index: int = 0, hostname: str | None = None,
                 extra_labels: Mapping[str, str] | None = None, window: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.product, self.window, self.clock = product, window, clock
        self.cap: float | None = None
        self.xid = 0
        self.labels = {"gpu": str(index), "UUID": f"GPU-{uuid.uuid4()}", "modelName": product.dcgm_model_name,
                       "Hostname": hostname or socket.gethostname(), **(extra_labels or {})}
        self._lock = threading.Lock()  # steps come from the engine thread, scrapes from the HTTP side
        self._steps: deque[tuple[float, float, float, float]] = deque()  # (start, end, watts, demand)
        self._started = clock()
        self._busy_energy = 0.0  # J drawn by steps
        self._busy_seconds = 0.0

    def set_cap(self, watts: float | None) -> None:
        """A power limit per GPU (None: the default, the rating), within what the driver accepts."""
        if watts is not None and not self.product.min_limit_watts <= watts <= self.product.rated_watts:
            raise ValueError(f"a {self.product.family} takes a power limit from {self.product.min_limit_watts:g} "
                             f"to {self.product.rated_watts:g} W; got {watts:g}")
        self.cap = watts

    def step(self, prompt_tokens: int, decode_seqs: int, seconds: float) -> float:
        """A step just ran for `seconds` uncapped; returns how many times longer the cap makes it."""
        demand = gpus.step_demand_watts(self.product, prompt_tokens, decode_seqs)
        factor = gpus.stretch(gpus.phase_of(prompt_tokens), demand, self.cap)
        drawn = gpus.drawn_watts(demand, self.cap)
        now = self.clock()
        duration = seconds * factor
        with self._lock:
            self._steps.append((now - seconds, now - seconds + duration, drawn, demand))
            self._busy_energy += drawn * duration
            self._busy_seconds += duration
            horizon = now - self.window
            while self._steps and self._steps[0][1] < horizon:
                self._steps.popleft()
        return factor

    def readings(self) -> dict[str, float]:
        """Power (W), energy (J), utilisation (0..1), SM clock (MHz) and temperature (C) now."""
        now = self.clock()
        lo = now - self.window
        with self._lock:
            steps = list(self._steps)
            energy = self._busy_energy + self.product.idle_watts * max(0.0, now - self._started - self._busy_seconds)
        busy = step_energy = 0.0
        demand = 0.0
        for start, end, watts, d in steps:
            overlap = max(0.0, min(end, now) - max(start, lo))
            busy += overlap
            step_energy += overlap * watts
            demand = max(demand, d) if overlap else demand
        busy = min(busy, self.window)
        power = (step_energy + self.product.idle_watts * (self.window - busy)) / self.window
        clock_mhz = gpus.clock_mhz(self.product, demand, self.cap) if demand else self.product.max_sm_clock_mhz
        return {"power": power, "energy": energy, "utilisation": busy / self.window, "clock": clock_mhz,
                "temperature": AMBIENT_C + KELVIN_PER_WATT * power}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        r = self.readings()
        names, values = list(self.labels), list(self.labels.values())
        limit = self.cap if self.cap is not None else self.product.rated_watts
        for name, doc, value in (
            (c.DCGM_POWER_USAGE, "Power draw (in W).", r["power"]),
            (c.DCGM_POWER_MGMT_LIMIT, "Power management limit (in W).", limit),
            (c.DCGM_ENFORCED_POWER_LIMIT, "Enforced power limit (in W).", limit),
            (c.DCGM_SM_CLOCK, "SM clock frequency (in MHz).", r["clock"]),
            (c.DCGM_GPU_TEMP, "GPU temperature (in C).", r["temperature"]),
            (c.DCGM_GPU_UTIL, "GPU utilization (in %).", 100 * r["utilisation"]),
            (c.DCGM_XID_ERRORS, "Value of the last XID error encountered.", float(self.xid)),
        ):
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            yield family
        # a counter in DCGM, exposed under its own name (prometheus_client would add _total to a counter)
        energy = GaugeMetricFamily(c.DCGM_TOTAL_ENERGY, "Total energy consumption since boot (in mJ).", labels=names)
        energy.add_metric(values, 1000 * r["energy"])
        yield energy


def kubernetes_labels(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The labels the DCGM exporter adds on Kubernetes (pod, namespace, container), from the
    downward API's POD_NAME and POD_NAMESPACE; none outside a pod."""
    if "POD_NAME" not in environ or "POD_NAMESPACE" not in environ:
        return {}
    return {"pod": environ["POD_NAME"], "namespace": environ["POD_NAMESPACE"],
            "container": environ.get("CONTAINER_NAME", "worker")}
