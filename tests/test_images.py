"""The worker image, built the way this project builds images without a registry or a
Docker engine (buildah, vfs storage, a Debian base made with debootstrap), then run:
`fleetwise worker` inside it serves tokens on loopback. Many minutes (PyPI's torch is the
CUDA build, gigabytes), so under the `image` marker, out of the default run:

    pytest -m image tests/test_images.py

Wheels are taken from FLEETWISE_WHEELHOUSE (default ~/.cache/fleetwise/wheelhouse), filled
by `pip download` on the first run, so a rebuild downloads nothing."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from fleetwise.net import free_port

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[1]
BASE = "localhost/debian-base:bookworm"
WORKER = "localhost/fleetwise-worker:test"
CA = "/etc/ssl/certs/ca-certificates.crt"
WHEELHOUSE = Path(os.environ.get("FLEETWISE_WHEELHOUSE", Path.home() / ".cache" / "fleetwise" / "wheelhouse"))


def buildah(*args: str, timeout: float = 3600, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["buildah", "--storage-driver", "vfs", *args], capture_output=True, text=True,
                          timeout=timeout, check=check)


def ensure_base() -> None:
    """Debian bookworm with Python 3.11, from the mirror apt uses (no registry is reachable)."""
    if buildah("inspect", BASE, check=False).returncode == 0:
        return
    sources = Path("/etc/apt/sources.list.d/debian.sources").read_text()
    mirror = next(line.split()[1] for line in sources.splitlines() if line.startswith("URIs:"))
    rootfs = Path("/tmp/fleetwise-base-rootfs")
    shutil.rmtree(rootfs, ignore_errors=True)
    subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(rootfs),
                    mirror], check=True, capture_output=True, timeout=1800)
    c = buildah("from", "scratch").stdout.strip()
    mount = buildah("mount", c).stdout.strip()
    subprocess.run(["cp", "-a", f"{rootfs}/.", mount + "/"], check=True)
    buildah("umount", c)
    buildah("commit", "-q", c, BASE)
    buildah("rm", c)
    shutil.rmtree(rootfs, ignore_errors=True)


def fill_wheelhouse() -> None:
    """Every wheel the image installs, for CPython 3.11 on x86-64 Linux (what the base has);
    skipped when the wheelhouse was filled for these same requirements."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    marker = WHEELHOUSE / f".filled-{hashlib.sha256(json.dumps(deps).encode()).hexdigest()[:16]}"
    if marker.exists():
        return
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELHOUSE), "--only-binary=:all:",
                    "--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "linux_x86_64", *deps, "setuptools>=68", "wheel"], check=True, timeout=3600)
    marker.touch()


@pytest.fixture(scope="module")
def worker_image():
    if shutil.which("buildah") is None:
        pytest.fail("buildah is needed: apt-get install -y buildah debootstrap")
    ensure_base()
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    fill_wheelhouse()
    started = time.monotonic()
    build = buildah("bud", "--isolation", "chroot", "--layers=false", "-f", "images/worker.Containerfile",
                    "--volume", f"{CA}:{CA}:ro", "--volume", f"{WHEELHOUSE}:/wheels:ro",
                    "--build-arg", f"BASE={BASE}", "--build-arg", "PIP_FIND_LINKS=/wheels",
                    "--build-arg", "PIP_NO_INDEX=1", "-t", WORKER, str(ROOT), check=False)
    assert build.returncode == 0, build.stderr[-4000:]
    print(f"worker image built in {time.monotonic() - started:.0f} s")
    return WORKER


def test_the_worker_image_runs_as_non_root_with_no_build_tools(worker_image):
    config = buildah("inspect", "--type", "image", worker_image).stdout
    assert '"User": "65532:65532"' in config
    assert "org.opencontainers.image.version" in config and "org.opencontainers.image.revision" in config
    assert f'"org.opencontainers.image.base.name": "{BASE}"' in config
    c = buildah("from", worker_image).stdout.strip()
    try:
        r = buildah("run", "--isolation", "chroot", c, "--", "sh", "-c",
                    "ls /opt/venv/bin; command -v gcc cc make || true", check=False)
        assert "fleetwise" in r.stdout.split() and "pip" not in r.stdout.split(), r.stdout
        assert "/gcc" not in r.stdout and "/make" not in r.stdout
    finally:
        buildah("rm", c)


def test_fleetwise_worker_in_the_image_serves_tokens_on_loopback(worker_image):
    c = buildah("from", worker_image).stdout.strip()
    port = free_port()
    run = ["buildah", "--storage-driver", "vfs", "run", "--isolation", "chroot", "--user", "65532:65532",
           "--env", "HOME=/tmp", c, "--", "sh", "-c",
           "fleetwise model init --preset tiny --out /tmp/tiny && exec fleetwise worker --model /tmp/tiny "
           f"--public-only --host 127.0.0.1 --port {port} --device cpu"]
    proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise AssertionError("the worker in the image did not become healthy")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        buildah("rm", c, check=False)


def test_the_control_plane_image_runs_each_command_without_torch():
    ensure_base()
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    fill_wheelhouse()
    image = "localhost/fleetwise:test"
    build = buildah("bud", "--isolation", "chroot", "-f", "images/control-plane.Containerfile",
                    "--volume", f"{CA}:{CA}:ro", "--volume", f"{WHEELHOUSE}:/wheels:ro",
                    "--build-arg", f"BASE={BASE}", "--build-arg", "PIP_FIND_LINKS=/wheels",
                    "--build-arg", "PIP_NO_INDEX=1", "-t", image, str(ROOT), check=False)
    assert build.returncode == 0, build.stderr[-4000:]
    assert '"User": "65532:65532"' in buildah("inspect", "--type", "image", image).stdout
    c = buildah("from", image).stdout.strip()
    try:
        for command in ("operator", "router"):
            r = buildah("run", "--isolation", "chroot", c, "--", "fleetwise", command, "--help", check=False)
            assert r.returncode == 0 and "Usage" in r.stdout, r.stdout + r.stderr
        r = buildah("run", "--isolation", "chroot", c, "--", "python", "-c", "import torch", check=False)
        assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    finally:
        buildah("rm", c)
        buildah("rmi", image, check=False)
