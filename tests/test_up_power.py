"""`fleetwise up --power-limit-watts`: a real Prometheus scraping modelled A100 workers, the
power loop over them; load drives the machine past its emergency threshold, caps come on and bring
power back under it (the workers are high priority, which the cap threshold leaves alone), and go
once the load stops."""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from fleetwise.protocol import POWER_PATH

from .workers import free_port, wait_healthy

LIMIT = 300.0  # two A100s: idle 110 W, busy about 400 W; caps may go down to 100 W each
pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus")


def status(workdir: Path) -> dict:
    try:
        return json.loads((workdir / "power.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def wait_for(what, workdir: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    seen = {}
    while time.monotonic() < deadline:
        seen = status(workdir)
        if seen and what(seen):
            return seen
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout} s; last status: {seen}")


def load(url: str, stop: threading.Event, k: int) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        prompt = [(13 * j + 7 * i + 101 * k) % 500 + 1 for j in range(800)]  # long prompts: long prompt steps
        try:
            httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 16,
                                                      "ignore_eos": True}, timeout=60)
        except httpx.HTTPError:
            pass


def test_up_caps_power_under_the_limit_and_releases_it(tmp_path, tiny_model_dir):
    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "fleetwise", "up", "--port", str(port), "--workdir", str(tmp_path),
                           "--model", str(tiny_model_dir), "--power-limit-watts", str(LIMIT),
                           "--modelled-gpu", "A100", "--power-period", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    stop = threading.Event()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 120, up)
        idle = wait_for(lambda s: s.get("measured_watts") is not None, tmp_path, 60)
        assert idle["measured_watts"] < 0.8 * LIMIT and idle["caps"] == {}
        # the period's peak comes with the reading, from the same Prometheus
        peaked = wait_for(lambda s: s.get("peak_watts") is not None, tmp_path, 30)
        assert peaked["peak_watts"] >= peaked["measured_watts"]
        threads = [threading.Thread(target=load, args=(url, stop, k), daemon=True) for k in range(12)]
        for t in threads:
            t.start()
        capped = wait_for(lambda s: s["caps"], tmp_path, 60)
        assert capped["situation"] in ("capping", "emergency", "band")
        # the workers say so themselves
        token = (tmp_path / "internal-token").read_text().strip()
        pools = yaml.safe_load((tmp_path / "router.yaml").read_text())["models"][0]
        held = [httpx.get(internal + POWER_PATH, headers={"authorization": f"Bearer {token}"}, timeout=30).json()
                for internal in pools["prefill"] + pools["decode"]]
        assert any(h["watts"] is not None and h["watts"] < 400 and h["seconds_left"] > 0 for h in held), held
        # power back under the emergency threshold while the load goes on
        under = wait_for(lambda s: s["measured_watts"] is not None and s["measured_watts"] < 0.98 * LIMIT
                         and s["caps"], tmp_path, 60)
        assert under["situation"] != "stale"
        stop.set()
        for t in threads:
            t.join(timeout=60)
        released = wait_for(lambda s: s["caps"] == {}, tmp_path, 90)
        assert released["measured_watts"] < 0.8 * LIMIT
        log = (tmp_path / "logs" / "actions.log").read_text()
        assert "cap_power" in log and "lifted" in log
    finally:
        stop.set()
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
    assert up.returncode == 0
    with pytest.raises(httpx.HTTPError):  # Prometheus went with the fleet
        httpx.get(status(tmp_path)["prometheus"] + "/-/ready", timeout=2)


@pytest.mark.parametrize("args, message", [
    (["--modelled-gpu", "A100"], "goes with --power-limit-watts"),
    (["--power-limit-watts", "300", "--modelled-gpu", "Z9"], "choose one of"),
    (["--power-limit-watts", "300", "--modelled-gpu", "mixed=A100"], "this mode's pools are"),
    (["--power-limit-watts", "300", "--power-priority", "Urgent"], "High or Low"),
    (["--power-limit-watts", "0"], "--power-limit-watts"),
])
def test_up_refuses_bad_power_options_by_name(tmp_path, args, message):
    from typer.testing import CliRunner

    from fleetwise.cli import app
    result = CliRunner().invoke(app, ["up", "--workdir", str(tmp_path), *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "internal-token").exists()  # nothing started


def test_up_without_prometheus_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    from fleetwise import up
    monkeypatch.setattr(up.shutil, "which", lambda name: None)
    code = up.run(None, "disaggregated", free_port(), 1, 1, 1, tmp_path, [],
                  power=up.PowerOptions(300, {"prefill": "A100", "decode": "A100"}))
    assert code == 2
    assert "apt-get install prometheus" in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "internal-token").exists()
