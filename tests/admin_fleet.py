"""An admin API over a real `LocalFleet` whose worker processes are not started (acting on
them rewrites the router's file and is refused where a process is needed), with a SQLite
store and one token per role; for tests that need no running workers."""

from dataclasses import dataclass
from pathlib import Path

from fleetwise.admin.app import Limits, create_app
from fleetwise.admin.auth import Role, TokenBook, digest
from fleetwise.admin.deps import Ctx
from fleetwise.admin.store import Store
from fleetwise.admin.view import LocalView
from fleetwise.local_fleet import LocalFleet, Member

TOKENS = {role: f"token-of-the-{role.label}" for role in Role}


def headers(role: Role | None, token: str | None = None) -> dict[str, str]:
    token = token if token is not None else (TOKENS[role] if role is not None else None)
    return {} if token is None else {"Authorization": f"Bearer {token}"}


@dataclass
class AdminFleet:
    fleet: LocalFleet
    store: Store
    ctx: Ctx


def admin_fleet(workdir: Path, limits: Limits | None = None):
    workdir.mkdir(parents=True, exist_ok=True)
    members = [Member(f"mixed-{i}", ["true"], None, f"http://127.0.0.1:{9100 + i}", role="mixed",
                      internal_url=f"http://127.0.0.1:{9200 + i}") for i in range(2)]
    fleet = LocalFleet("tiny", members, workdir / "router.yaml")
    store = Store(str(workdir / "admin.db"))
    ctx = Ctx(store, LocalView(fleet), fleet)
    book = TokenBook([(role.label, role, digest(token)) for role, token in TOKENS.items()])
    return AdminFleet(fleet, store, ctx), create_app(ctx, book, limits)
