"""Who may call the admin API: bearer tokens mapped to roles, and a request rate per
caller.

Tokens come from a YAML file (or a Kubernetes Secret mounted as a directory holding
`tokens.yaml`): `tokens: [{name, role, sha256}]`, the SHA-256 of each token in hex, so the
file never holds a token itself; a changed file is read again (`TokenFile`). Tokens are
long random strings (`fleetwise admin token` makes them), for which one unsalted SHA-256
is enough. A token is checked against every
entry with a constant-time comparison and no early exit, so the time taken says nothing
about which entries are close. Roles are ordered: a viewer reads, an operator also acts on
workers and nodes and records incidents, an admin also overrides power caps and reads the
audit log."""

import hashlib
import hmac
import logging
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import yaml

log = logging.getLogger(__name__)
TOKENS_FILE = "tokens.yaml"


class Role(IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "fwa_" + secrets.token_urlsafe(32)


class Tokens(Protocol):
    def lookup(self, token: str) -> Principal | None: ...


class TokenBook:
    def __init__(self, entries: list[tuple[str, Role, str]], accounts: dict[str, Role] | None = None) -> None:
        """`entries`: (name, role, sha256 hex); `accounts`: the role of each Kubernetes user
        (system:serviceaccount:NS:NAME) whose tokens a TokenReview vouches for
        (`admin/token_review.py`)."""
        self.entries = [(name, role, bytes.fromhex(h)) for name, role, h in entries]
        self.accounts = accounts or {}

    def lookup(self, token: str) -> Principal | None:
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for name, role, h in self.entries:
            if hmac.compare_digest(presented, h) and found is None:
                found = Principal(name, role)
        return found

    @classmethod
    def load(cls, path: Path) -> "TokenBook":
        """From a tokens.yaml, or a directory (a mounted Secret) holding one; a bad entry
        is an error naming it."""
        file = path / TOKENS_FILE if path.is_dir() else path
        doc = yaml.safe_load(file.read_text()) or {}
        entries = []
        for i, e in enumerate(doc.get("tokens") or []):
            where = f"{file}: tokens[{i}]"
            if not isinstance(e, dict) or not {"name", "role", "sha256"} <= e.keys():
                raise ValueError(f"{where}: needs name, role and sha256")
            if str(e["role"]).upper() not in Role.__members__:
                raise ValueError(f"{where}: role must be viewer, operator or admin, not {e['role']!r}")
            h = str(e["sha256"]).lower()
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError(f"{where}: sha256 must be 64 hex digits (the token's SHA-256, not the token)")
            entries.append((str(e["name"]), Role[str(e["role"]).upper()], h))
        accounts = {}
        for i, a in enumerate(doc.get("serviceAccounts") or []):
            where = f"{file}: serviceAccounts[{i}]"
            if not isinstance(a, dict) or not str(a.get("name", "")).startswith("system:serviceaccount:"):
                raise ValueError(f"{where}: needs name (system:serviceaccount:NAMESPACE:NAME) and role")
            if str(a.get("role", "")).upper() not in Role.__members__:
                raise ValueError(f"{where}: role must be viewer, operator or admin, not {a.get('role')!r}")
            accounts[str(a["name"])] = Role[str(a["role"]).upper()]
        return cls(entries, accounts)


class TokenFile:
    """A TokenBook read from its file again when the file changes (a rotated Secret), checked
    at most once per `every` seconds; a changed file that does not load keeps the tokens
    before it, and says why in the log."""

    def __init__(self, path: Path, every: float = 1.0) -> None:
        self.path, self.every = path, every
        self.book = TokenBook.load(path)
        self.seen, self.checked = self._stamp(), time.monotonic()

    def _stamp(self) -> tuple[float, int]:
        st = (self.path / TOKENS_FILE if self.path.is_dir() else self.path).stat()
        return st.st_mtime, st.st_size

    def lookup(self, token: str) -> Principal | None:
        now = time.monotonic()
        if now - self.checked >= self.every:
            self.checked = now
            try:
                stamp = self._stamp()
                if stamp != self.seen:
                    self.book, self.seen = TokenBook.load(self.path), stamp
                    log.info("reloaded the admin tokens from %s", self.path)
            except (OSError, ValueError, yaml.YAMLError) as e:
                log.error("kept the admin tokens loaded before: %s does not load: %s", self.path, e)
        return self.book.lookup(token)


def token_entry(name: str, role: Role, token: str) -> dict:
    return {"name": name, "role": role.label, "sha256": digest(token)}


class RateLimiter:
    """A token bucket per caller: `rate` requests a second on average, `burst` at once.
    At most `max_callers` buckets are kept (the least recently used goes first), so
    callers with ever new bad tokens cannot grow it."""

    def __init__(self, rate: float, burst: int, max_callers: int = 10_000) -> None:
        self.rate, self.burst, self.max_callers = rate, burst, max_callers
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, caller: str, now: float | None = None) -> float:
        """0 when the request may go; otherwise the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens, last = self.buckets.pop(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self.buckets[caller] = (tokens - 1 if wait == 0 else tokens, now)
        while len(self.buckets) > self.max_callers:
            self.buckets.popitem(last=False)
        return wait


def retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))
