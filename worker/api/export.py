"""`POST /internal/export`: a draining worker hands running requests over with their KV.

The router calls it when a drain's grace period ends (router/migrate.py). The choices'
context (prompt and output, but the last token) stays in its blocks under one KV lease per
choice, the same leases a prefill worker keeps for a decode worker (kv/connector.py), and
their streams end with an error event of code `migrated` once every token sampled before
has gone out. The router resumes each stream elsewhere naming the leases, and the new
worker pulls them over the KV transfer path (`GET /internal/kv/{handle}`). A request that
cannot move this way (unknown here, or a choice not decoding) is refused whole (404, 409),
and the router moves it by recomputing it instead.
"""

from fastapi import FastAPI

from fleetwise.openai_schema import errors
from fleetwise.protocol import ExportAnswer, ExportedChoice, ExportRequest

from ..engine.engine import LLMEngine, RequestError, RequestOutput
from ..engine.migration import export_running, handle_of
from ..kv.connector import KVConnector
from .openai import APIError
from .service import WorkerAPI


def export(core: LLMEngine, connector: KVConnector, request_ids: list[str], ns: dict[str, int]) -> list[RequestOutput]:
    """On the engine thread: the requests' choices out of the batch, their contexts under
    leases; the outputs that end their streams. `ns` gets each request's n."""
    ns.update({rid: core.requests[rid][0].params.n for rid in request_ids if rid in core.requests})
    contexts, outs = export_running(core, request_ids)
    for ctx in contexts:
        ctx.hold_kv = True
        connector.request_finished(ctx, "length")  # held as a finished prefill's blocks are
    core.metrics.on_kv_exported(len(contexts))
    return outs


def add_export_route(app: FastAPI, api: WorkerAPI, connector: KVConnector) -> None:
    @app.post("/internal/export", response_model=None, summary="Export: hand running requests over with their KV",
              responses={200: {"model": ExportAnswer}, **errors(400, 404, 409)})
    async def export_(body: ExportRequest) -> ExportAnswer:
        if api.role not in ("decode", "mixed"):
            raise APIError(400, f"this worker's role is {api.role}; the endpoint needs decode or mixed",
                           code="wrong_role")
        if len(set(body.request_ids)) != len(body.request_ids):
            raise APIError(400, "request_ids: a request id appears twice", param="request_ids")
        ns: dict[str, int] = {}
        try:
            outs = await api.engine.call(export, api.core, connector, body.request_ids, ns)
        except RequestError as e:
            status = 404 if "no request" in str(e) else 409
            raise APIError(status, str(e), param=e.param, code="not_found" if status == 404 else "not_decoding")
        where = {rid: i for i, rid in enumerate(body.request_ids)}
        return ExportAnswer(choices=[ExportedChoice(index=where[o.request_id] * ns[o.request_id] + o.index,
                                                    handle=handle_of(o.request_id, o.index),
                                                    num_tokens=o.num_prompt_tokens + o.num_output_tokens - 1)
                                     for o in outs], kv_lease_seconds=connector.lease_seconds)

