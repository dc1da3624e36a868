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


@contextmanager
def postgres() -> Iterator[str]:
    """Yields a postgresql:// URL to an empty database; the cluster is gone afterwards."""
    root = Path(tempfile.mkdtemp(prefix="fleetwise-pg-"))
    data, port = root / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    run = lambda argv: subprocess.run(_as_postgres(argv), check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run([str(BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        run([str(BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "start",
             "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"])
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_postgres([str(BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

