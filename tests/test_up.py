"""`fleetwise up`: the whole fleet as processes, serving, and gone without a trace on Ctrl-C or SIGTERM."""

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
import yaml

from .workers import free_port, wait_healthy


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes (its parent has not reaped it yet)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("mode, sig, own_model", [("disaggregated", signal.SIGINT, False),
                                                  ("colocated", signal.SIGTERM, True)])
def test_up_serves_and_stops_cleanly(tmp_path, tiny_model_dir, mode, sig, own_model):
    port, admin_port = free_port(), free_port()
    args = [sys.executable, "-m", "fleetwise", "up", "--port", str(port), "--workdir", str(tmp_path), "--mode", mode,
            "--admin-port", str(admin_port)]
    if own_model:
        args += ["--model", str(tiny_model_dir), "--mixed", "2"]
    up = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 120, up)
        lines = []
        for line in up.stdout:  # the supervisor has seen every process healthy, and said how to call it
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        # the curl line names the router's public port (rich wraps long lines)
        assert f"curl-s{url}/v1/completions" in "".join("".join(lines).split())
        name = "tiny"
        r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "hello", "max_tokens": 5}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        pids = json.loads((tmp_path / "pids.json").read_text())
        assert len(pids) == 3  # prefill + decode + router, or two mixed + router
        assert all(alive(p) for p in pids.values())
        token = tmp_path / "internal-token"
        assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text().strip()) >= 32
        # the router's file names the workers' internal listeners, which want the token
        config = yaml.safe_load((tmp_path / "router.yaml").read_text())["models"][0]
        internal = next(iter(config.get("prefill") or config["mixed"]))
        assert httpx.get(internal + "/health", timeout=10).status_code == 401
        ok = httpx.get(internal + "/health", headers={"authorization": f"Bearer {token.read_text().strip()}"})
        assert ok.status_code == 200
        # the admin API, in the same process: its new token printed once and kept for the user alone
        admin_token = tmp_path / "admin-token"
        assert admin_token.stat().st_mode & 0o777 == 0o600
        assert admin_token.read_text().strip() in "".join("".join(lines).split())
        fleet = httpx.get(f"http://127.0.0.1:{admin_port}/api/v1/fleet", timeout=10,
                          headers={"authorization": f"Bearer {admin_token.read_text().strip()}"})
        assert fleet.status_code == 200 and {w["role"] for w in fleet.json()["workers"]} == (
            {"prefill", "decode"} if mode == "disaggregated" else {"mixed"})
        up.send_signal(sig)
        out, _ = up.communicate(timeout=60)
        out = "".join(lines) + out
        assert up.returncode == 0, out
        assert "fleet ready" in out and "fleet stopped" in out
        assert not [name for name, p in pids.items() if alive(p)]
        if not own_model:
            assert (tmp_path / "models" / "tiny" / "config.json").exists()
    finally:
        if up.poll() is None:
            up.kill()


def test_up_refuses_a_busy_port(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "fleetwise", "up", "--port", str(port), "--workdir", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "in use" in r.stdout
