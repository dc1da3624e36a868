"""A real PostgreSQL 15 for the tests: its own cluster in a temporary directory, on a free
loopback port, run as the `postgres` user (initdb refuses root), stopped at the end."""

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fleetwise.net import free_port

BIN = Path(os.environ.get("FLEETWISE_PG_BIN", "/usr/lib/postgresql/15/bin"))


def missing() -> str | None:
    """Why PostgreSQL cannot be started here, or None."""
    if not (BIN / "initdb").exists() or not (BIN / "pg_ctl").exists():
        return f"PostgreSQL binaries not found in {BIN} (set FLEETWISE_PG_BIN)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: initdb refuses root"
    return None


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str]) -> None:
    subprocess.run(_as_postgres(argv), check=True, capture_output=True, text=True)


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root, self.data, self.port = root, root / "data", free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        _run([str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60", "start",
              "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"])

    def stop(self) -> None:
        _run([str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])


@contextmanager
def postgres() -> Iterator[Cluster]:
    """A started cluster with an empty database at `.url`; gone afterwards."""
    root = Path(tempfile.mkdtemp(prefix="fleetwise-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    cluster = Cluster(root)
    try:
        _run([str(BIN / "initdb"), "-D", str(cluster.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        cluster.start()
        yield cluster
    finally:
        if (cluster.data / "postmaster.pid").exists():
            subprocess.run(_as_postgres([str(BIN / "pg_ctl"), "-D", str(cluster.data), "-m", "immediate", "-w",
                                         "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

