"""`GET` and `POST /internal/faults`: the drills' fault switches (engine/faults.py), on the
internal listener behind the shared token, and only on a worker started with
`--fault switches` (404 otherwise, as for any unknown path). A POST replaces every switch at
once (a field left out is off); each field is bounded and a value out of bounds is a 400
naming it."""

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from fleetwise.openai_schema import errors

from ..engine.engine import LLMEngine
from ..engine.faults import (
    MAX_KV_DELAY_SECONDS,
    MAX_SLOW_FACTOR,
    MAX_STALL_SECONDS,
    MAX_STEP_DELAY_SECONDS,
    MAX_XID,
    FaultSettings,
)
from .openai import APIError


class FaultsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slow_factor: float = Field(1.0, ge=1.0, le=MAX_SLOW_FACTOR,
                               description="each forward pass keeps the device busy this many times longer")
    step_delay_seconds: float = Field(0.0, ge=0.0, le=MAX_STEP_DELAY_SECONDS,
                                      description="each step with work takes this much longer")
    stall_seconds: float = Field(0.0, ge=0.0, le=MAX_STALL_SECONDS,
                                 description="the engine loop stops this long, from now")
    kv_slow_peer: str | None = Field(None, max_length=200,
                                     description="pulls from this prefill worker's URL are slow")
    kv_delay_seconds: float = Field(0.0, ge=0.0, le=MAX_KV_DELAY_SECONDS, description="added to each such pull")
    xid: int = Field(0, ge=0, le=MAX_XID, description="the modelled GPU's last XID error (0: none)")


def add_fault_routes(app: FastAPI, core: LLMEngine) -> None:
    switches = core.switches
    assert switches is not None

    @app.get("/internal/faults", summary="The fault switches in force (drills and tests)")
    async def faults() -> dict:
        return switches.view()

    @app.post("/internal/faults", summary="Set the fault switches (drills and tests)", responses=errors(400))
    async def set_faults(body: FaultsBody) -> dict:
        if body.xid and core.gpu is None:
            raise APIError(400, "xid: this worker has no modelled GPU (start it with --modelled-gpu); on a real GPU "
                                "XID errors come from the driver", param="xid")
        if body.kv_delay_seconds and not body.kv_slow_peer:
            raise APIError(400, "kv_delay_seconds: needs kv_slow_peer, the prefill worker whose pulls are slow",
                           param="kv_delay_seconds")
        switches.set(FaultSettings(**body.model_dump()))
        if core.gpu is not None:
            core.gpu.xid = body.xid
        return switches.view()
