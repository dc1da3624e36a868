"""The admin API inside `fleetwise up`: a thread of the same process, on its own port,
over its `LocalFleet` (the fleet's verbs and its state, in memory) and a SQLite store in
the workdir. Each start makes a new admin token, stored in `admin-token` (0600) for the
caller to print once; its hash replaces the `admin` entry of `admin-tokens.yaml` (0600),
where other tokens (`fleetwise admin token`) may be added, while it runs too, and are kept."""

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from fleetwise.local_fleet import LocalFleet
from fleetwise.net import free_port, port_free

from .app import Server, create_app
from .auth import Role, TokenFile, new_token, token_entry
from .deps import Ctx
from .store import Store
from .view import LocalView

TOKEN_FILE = "admin-token"
TOKENS_FILE = "admin-tokens.yaml"
DATABASE = "admin.db"
OWN = "admin"  # fleetwise up's own entry in the tokens file


@dataclass
class LocalAdmin:
    server: Server
    store: Store
    token_file: Path
    moved_from: int | None  # the port asked for, when it was taken and another was used

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()
        self.store.close()


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_tokens(workdir: Path) -> tuple[str, Path]:
    """A new admin token in `admin-token`, its hash in `admin-tokens.yaml` (other entries kept)."""
    token = new_token()
    _write_private(workdir / TOKEN_FILE, token + "\n")
    tokens = workdir / TOKENS_FILE
    doc = (yaml.safe_load(tokens.read_text()) or {}) if tokens.exists() else {}
    kept = [e for e in doc.get("tokens") or [] if isinstance(e, dict) and e.get("name") != OWN]
    _write_private(tokens, yaml.safe_dump({"tokens": [token_entry(OWN, Role.ADMIN, token), *kept]}, sort_keys=False))
    return token, tokens


def start_local(fleet: LocalFleet, workdir: Path, port: int, host: str = "127.0.0.1") -> LocalAdmin:
    moved = None
    if not port_free(port):
        moved, port = port, free_port()
    _, tokens = write_tokens(workdir)
    store = Store(str(workdir / DATABASE))
    app = create_app(Ctx(store, LocalView(fleet), fleet), TokenFile(tokens))
    try:
        server = Server(app, host, port).start()
    except RuntimeError:
        store.close()
        raise
    return LocalAdmin(server, store, workdir / TOKEN_FILE, moved)
