"""The admin API as `fleetwise up` runs it (`admin/local.py`: a thread, its own port, over
the LocalFleet), in front of two real mixed workers and a real router: a quarantine through
the API stops the router sending the worker requests, a restore brings traffic back, and
the audit log holds both and a viewer's refused attempt."""

import httpx
import pytest
import yaml

from fleetwise.admin.auth import Role, token_entry
from fleetwise.admin.local import TOKENS_FILE, start_local
from fleetwise.fleet import Routability, WorkerRef
from fleetwise.local_fleet import LocalFleet
from fleetwise.procs import stop_all, wait_healthy
from fleetwise.up import plan

from .test_local_fleet import routed, send, served
from .workers import free_port, start_router, token_file

W0, W1 = WorkerRef("mixed-0"), WorkerRef("mixed-1")
VIEWER_TOKEN = "a-viewer-token-added-by-hand"


@pytest.fixture(scope="module")
def up(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("up")
    members = plan(tiny_model_dir, "tiny", "colocated", free_port(), 0, 0, 2, workdir, [], token_file())
    workers = [m for m in members if m.role != "router"]
    for w in workers:
        w.die_with_parent = True
        w.start()
    # a token the user added to the tokens file: kept when fleetwise up writes its own
    (workdir / TOKENS_FILE).write_text(yaml.safe_dump({"tokens": [token_entry("vera", Role.VIEWER, VIEWER_TOKEN)]}))
    admin = None
    try:
        wait_healthy(workers, 120)
        local = LocalFleet("tiny", members, workdir / "router.yaml", settle=0.5)
        router = start_router(workdir / "router.yaml", "round_robin", probe_interval=0.1)
        admin = start_local(local, workdir, free_port())
        yield local, router, admin
        router.stop()
    finally:
        if admin is not None:
            admin.stop()
        stop_all([workers], grace=5)


def test_quarantine_and_restore_through_the_api_steer_the_router_and_are_audited(up):
    local, router, admin = up
    token = admin.token_file.read_text().strip()
    assert admin.token_file.stat().st_mode & 0o777 == 0o600
    assert token not in (admin.token_file.parent / TOKENS_FILE).read_text()  # only its hash
    me, vera = {"authorization": f"Bearer {token}"}, {"authorization": f"Bearer {VIEWER_TOKEN}"}
    api = admin.url + "/api/v1"

    r = httpx.post(f"{api}/workers/local/mixed-0/quarantine", json={"reason": "p99 3x its peers"}, headers=me)
    assert r.status_code == 200 and r.json()["state"] == "quarantined"
    routed(router, local, W0, False)
    before = served(local, W0), served(local, W1)
    send(router, 6)
    assert served(local, W0) == before[0] and served(local, W1) == before[1] + 6

    r = httpx.post(f"{api}/workers/local/mixed-0/restore", json={"reason": "I say so"}, headers=vera)
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    assert local.state(W0).state is Routability.QUARANTINED
    fleet = httpx.get(f"{api}/fleet", headers=vera).json()  # a viewer may look
    assert {w["name"]: w["state"] for w in fleet["workers"]} == {"mixed-0": "quarantined", "mixed-1": "serving"}

    r = httpx.post(f"{api}/workers/local/mixed-0/restore", json={"reason": "false alarm"}, headers=me)
    assert r.status_code == 200 and r.json()["state"] == "serving"
    routed(router, local, W0, True)
    before = served(local, W0), served(local, W1)
    send(router, 6)
    assert served(local, W0) > before[0] and served(local, W1) > before[1]

    audit = httpx.get(f"{api}/audit", headers=me).json()["items"]
    assert [(a["actor"], a["path"].rsplit("/", 1)[1], a["status"], a["outcome"]) for a in audit] == [
        ("admin", "restore", 200, "ok"), ("vera", "restore", 403, "denied"), ("admin", "quarantine", 200, "ok")]
    assert "p99 3x its peers" in audit[2]["body"] and "viewer" in audit[1]["detail"]
