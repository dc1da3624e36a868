"""`/internal/power`: the power cap the controller sets on this worker's GPU, as a lease.

A cap comes with a time to live on the worker's own clock (no clock is shared with the
caller); the controller renews it each control period. One not renewed in time falls back
to the `fallback_watts` it came with (the controller sends a conservative cap for
low-priority work, none for high-priority), so a controller that stops (no leader, operator
down, Prometheus gone) leaves the fleet in a known state instead of capped forever or
uncapped at once. The cap in force is a metric (`fleetwise_power_cap_watts`, with its
expiry) next to the GPU's own enforced-limit series.

The GPU is the modelled one (`--modelled-gpu`: the cap holds its draw and stretches its
steps). A real GPU's cap has one path, and it is not this one: the operator records it on
the pod and `fleetwise node-agent` applies it with NVML's privileges, which a worker
container lacks; a worker on a real GPU answers 409 saying so, instead of pretending the
cap holds or fighting the agent over the limit. Only the internal listener serves this,
behind the shared token.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from fastapi import FastAPI

from fleetwise.openai_schema import errors
from fleetwise.protocol import POWER_PATH, PowerCapRequest, PowerCapState
from fleetwise.telemetry.modelled_gpu import ModelledGPU

from .openai import APIError
from .service import WorkerAPI

log = logging.getLogger(__name__)


class Limiter(Protocol):
    source: Literal["modelled", "nvml"]
    min_watts: float
    max_watts: float

    def apply(self, watts: float | None) -> None: ...


@dataclass
class ModelledLimiter:
    gpu: ModelledGPU
    source: Literal["modelled", "nvml"] = "modelled"

    def __post_init__(self) -> None:
        self.min_watts, self.max_watts = self.gpu.product.min_limit_watts, self.gpu.product.rated_watts

    def apply(self, watts: float | None) -> None:
        self.gpu.set_cap(watts)


class PowerCap:
    """The cap in force on this worker's GPU and its lease; acts in the serving event loop."""

    def __init__(self, api: WorkerAPI, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.api, self.clock, self.wall = api, clock, wall
        self.watts: float | None = None
        self.until: float | None = None          # on `clock`; None: no expiry
        self.fallback: float | None = None
        self.reason = ""
        self._limiter: Limiter | None = None
        self._lapse: asyncio.TimerHandle | None = None

    def limiter(self) -> Limiter:
        if self._limiter is None:
            core = self.api.core
            if core.gpu is not None:
                self._limiter = ModelledLimiter(core.gpu)
            elif core.runner.device.type == "cuda":
                raise APIError(409, "a real GPU's power cap is applied by fleetwise node-agent on its node, from "
                                    "the pod's fleetwise.dev/power-cap annotation (the operator's --power-actuator "
                                    "node-agent), not by the worker", code="node_agent_caps")
            else:
                raise APIError(409, "this worker has no GPU to cap (a CPU worker takes caps only as a modelled GPU: "
                                    "--modelled-gpu)", code="no_gpu")
        return self._limiter

    def state(self) -> PowerCapState:
        limiter = self.limiter()
        left = None if self.until is None else max(0.0, self.until - self.clock())
        return PowerCapState(watts=self.watts, seconds_left=left, fallback_watts=self.fallback, reason=self.reason,
                             source=limiter.source, min_watts=limiter.min_watts, max_watts=limiter.max_watts)

    def set(self, req: PowerCapRequest) -> PowerCapState:
        limiter = self.limiter()
        for field, value in (("watts", req.watts), ("fallback_watts", req.fallback_watts)):
            if value is not None and not limiter.min_watts <= value <= limiter.max_watts:
                raise APIError(400, f"{field}: this GPU takes a power limit from {limiter.min_watts:g} to "
                                    f"{limiter.max_watts:g} W; got {value:g}", param=field)
        limiter.apply(req.watts)
        if req.watts != self.watts:  # a renewal is not worth a line
            log.info("power cap %s W (lease %s s): %s", req.watts, None if req.watts is None else req.ttl_seconds,
                     req.reason)
        if self._lapse is not None:
            self._lapse.cancel()
            self._lapse = None
        self.watts, self.reason = req.watts, req.reason
        if req.watts is None:
            self.until = self.fallback = None
        else:
            self.until, self.fallback = self.clock() + req.ttl_seconds, req.fallback_watts
            self._lapse = asyncio.get_running_loop().call_later(req.ttl_seconds, self.lapse)
        self._export()
        return self.state()

    def lapse(self) -> None:
        """The lease ran out without a renewal: the fallback, with no expiry, or no cap."""
        self._lapse = None
        fallback, was = self.fallback, self.watts
        try:
            self.limiter().apply(fallback)
        except APIError as e:  # the GPU refused the fallback: keep reporting what holds
            log.error("power cap lapsed, fallback %s W not applied: %s", fallback, e.message)
            return
        self.watts, self.until, self.fallback = fallback, None, None
        self.reason = f"the cap of {was:g} W lapsed without renewal: " + (
            f"fallback {fallback:g} W" if fallback is not None else "lifted")
        log.warning(self.reason)
        self._export()

    def _export(self) -> None:
        expires = None if self.until is None else self.wall() + (self.until - self.clock())
        self.api.metrics.on_power_cap(self.watts, expires)


def add_power_routes(app: FastAPI, api: WorkerAPI) -> PowerCap:
    cap = PowerCap(api)

    @app.get(POWER_PATH, summary="The power cap in force", responses=errors(409))
    async def power_state() -> PowerCapState:
        return cap.state()

    @app.post(POWER_PATH, summary="Set or lift the power cap, as a lease", responses=errors(400, 409))
    async def power_set(body: PowerCapRequest) -> PowerCapState:
        return cap.set(body)

    return cap
