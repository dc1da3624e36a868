"""A real Prometheus on loopback that fleetwise starts and stops itself: `fleetwise up` runs
one over its local fleet, the tests run one over real processes. It needs the `prometheus`
binary (Debian's and Ubuntu's package `prometheus`, or a release from prometheus.io); the
configuration, the data folder and the log live in a folder of the caller's.
"""

import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
import yaml

from fleetwise.net import free_port
from fleetwise.procs import Process, answers_200, wait_healthy

INSTALL_HINT = ("install Prometheus: `apt-get install prometheus` on Debian or Ubuntu, or a release from "
                "https://prometheus.io/download/ on PATH")


class PrometheusUnavailable(RuntimeError):
    """No `prometheus` binary to run; the message says how to get one."""


@dataclass
class PrometheusServer:
    workdir: Path
    targets: dict[str, list[str]]          # job -> ["host:port", ...]
    scrape_interval: float = 1.0
    port: int = 0                          # 0: a free one
    binary: str | None = None              # None: `prometheus` on PATH
    process: Process | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict:
        interval = f"{round(self.scrape_interval * 1000)}ms"  # Prometheus takes whole units
        return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
                "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(hosts)}]}
                                   for job, hosts in sorted(self.targets.items())]}

    def _write_config(self) -> Path:
        path = self.workdir / "prometheus.yml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.config()))
        tmp.replace(path)  # a reload never reads half a file
        return path

    def start(self, timeout: float = 60.0) -> Self:
        binary = self.binary or shutil.which("prometheus")
        if binary is None:
            raise PrometheusUnavailable(f"no `prometheus` binary on PATH; {INSTALL_HINT}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        argv = [binary, f"--config.file={self._write_config()}", f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d"]
        self.process = Process("prometheus", argv, self.workdir / "prometheus.log", self.url,
                               die_with_parent=True).start()
        try:
            wait_healthy([self.process], timeout, ready=lambda p: answers_200(p.url + "/-/ready"))
        except Exception:
            self.stop()
            raise
        return self

    def set_targets(self, targets: dict[str, list[str]]) -> None:
        """New scrape targets, taken without a restart (the data stays)."""
        self.targets = targets
        self._write_config()
        httpx.post(self.url + "/-/reload", timeout=10).raise_for_status()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=10)

    def kill(self) -> None:
        """Gone at once, as when it crashes (tests of what its absence does)."""
        if self.process is not None:
            self.process.signal(signal.SIGKILL)
            if self.process.popen is not None:
                self.process.popen.wait()
