"""`FleetActions` for `fleetwise up`: workers are local processes, routability is the
router's static endpoints file.

The file (`.fleetwise/router.yaml`) lists every worker by its internal URL (the router
calls the internal listener, with the shared token); one out of routing is a mapping
with `routable: false`, its state and reason, which the router picks up when it re-reads
the file (on its next probe round). Each rewrite is atomic (write, then rename), so the
router never reads half a file. A drain stops the process once it holds no request (its
/health `running` and `waiting`) or after the drain timeout; nothing replaces it on one
machine, so it stays listed, not routable, until restarted. A restart stops the process
and starts it again on the same port, out of routing until it is healthy. A slow KV link is
routed around through the same file: the decode worker's entry lists the prefill peers it avoids
(`avoid`, by internal URL, each until a time the router honours on its own). A power cap goes
to the worker's `/internal/power` with the shared token. There are no nodes: cordon and
uncordon are refused. Each action is a log line (in the logger and in `actions.log`) and the
worker's state.
"""

import datetime as dt
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from fleetwise.fleet import (
    ActionRefused,
    Avoidance,
    PowerOverride,
    Routability,
    WorkerRef,
    WorkerState,
    dump_avoidances,
    send_power_cap,
    with_avoidance,
)
from fleetwise.procs import Process, ProcessError, wait_healthy

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_SECONDS = 120.0  # as the deployment controller's
SETTLE_SECONDS = 2.0           # a drain checks for idleness once the router has re-read the file
NO_NODES = "fleetwise up runs on one machine; there is no node to {}"


@dataclass
class Member(Process):
    """One process of the fleet: a worker of one role, or the router; `url` is its public
    listener, `internal_url` a worker's internal one (what the router's file lists);
    `health` is its last /health answer, for the status table."""
    role: str = "mixed"
    internal_url: str = ""
    health: dict = field(default_factory=dict)


def _entry(url: str, state: WorkerState, avoid: dict[str, object]) -> str | dict:
    if state.state is Routability.SERVING:
        return {"url": url, "avoid": avoid} if avoid else url
    return {"url": url, "routable": False, "state": str(state.state), "reason": state.reason,
            **({"avoid": avoid} if avoid else {})}


class LocalFleet:
    def __init__(self, model: str, members: list[Member], config: Path, actions_log: Path | None = None,
                 drain_timeout: float = DRAIN_TIMEOUT_SECONDS, ready_timeout: float = 180.0,
                 settle: float = SETTLE_SECONDS, token: str | None = None) -> None:
        """`token`: the shared internal token, for the workers' /internal/power (caps)."""
        self.model, self.config, self.actions_log, self.token = model, config, actions_log, token
        self.drain_timeout, self.ready_timeout, self.settle = drain_timeout, ready_timeout, settle
        self.workers = {m.name: m for m in members if m.role != "router"}
        self.states = {name: WorkerState(Routability.SERVING, "started", time.time()) for name in self.workers}
        self._lock = threading.RLock()
        self._turn: dict[str, int] = dict.fromkeys(self.workers, 0)  # a drain ends when its turn has passed
        self.overrides: dict[str, PowerOverride] = {}
        self.caps: dict[str, float] = {}  # worker -> the cap in force (W per GPU), as last applied
        self.avoided: dict[str, dict[str, Avoidance]] = {}  # decode worker -> prefill worker -> until when
        self.write()

    def write(self) -> None:
        """The router's endpoints file from the workers' states, replaced in one rename."""
        with self._lock:
            roles: dict[str, list] = {}
            now = time.time()
            for name, w in self.workers.items():
                avoid = dump_avoidances({self.workers[p].internal_url or self.workers[p].url: a
                                         for p, a in self.avoided.get(name, {}).items()}, now)
                roles.setdefault(w.role, []).append(_entry(w.internal_url or w.url, self.states[name], avoid))
            tmp = self.config.with_name(f".{self.config.name}.tmp")
            tmp.write_text(yaml.safe_dump({"models": [{"name": self.model, **roles}]}, sort_keys=False))
            os.replace(tmp, self.config)

    def _worker(self, verb: str, ref: WorkerRef) -> Member:
        w = self.workers.get(ref.name) or next((w for w in self.workers.values()
                                                if ref.url and ref.url in (w.url, w.internal_url)), None)
        if w is None:
            raise ActionRefused(f"{verb}: no worker {ref.name!r} in this fleet (workers: {', '.join(self.workers)})")
        return w

    def _record(self, verb: str, w: Member, state: Routability, reason: str) -> int:
        """Sets the state, rewrites the file, logs the action; returns the worker's new turn."""
        with self._lock:
            self.states[w.name] = WorkerState(state, reason, time.time())
            self._turn[w.name] += 1
            self.write()
            turn = self._turn[w.name]
        self._log(f"{verb} {w.name} ({w.url}): {reason}")
        return turn

    def _log(self, line: str) -> None:
        log.info(line)
        if self.actions_log is not None:
            self.actions_log.parent.mkdir(parents=True, exist_ok=True)
            with self.actions_log.open("a") as f:
                f.write(f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} {line}\n")

    def state(self, worker: WorkerRef) -> WorkerState:
        return self.states[self._worker("state", worker).name]

    def quarantine(self, worker: WorkerRef, reason: str) -> None:
        self._record("quarantine", self._worker("quarantine", worker), Routability.QUARANTINED, reason)

    def restore(self, worker: WorkerRef, reason: str) -> None:
        w = self._worker("restore", worker)
        if not w.running:
            raise ActionRefused(f"restore: {w.name} is not running (drained or exited); restart it instead")
        self._record("restore", w, Routability.SERVING, reason)

    def drain(self, worker: WorkerRef, reason: str) -> None:
        """Returns at once; the process is stopped in the background when drained."""
        w = self._worker("drain", worker)
        turn = self._record("drain", w, Routability.DRAINING, reason)
        threading.Thread(target=self._finish_drain, args=(w, turn), name=f"drain-{w.name}", daemon=True).start()

    def _finish_drain(self, w: Member, turn: int) -> None:
        t0 = time.monotonic()
        time.sleep(self.settle)
        while self._turn[w.name] == turn and w.running:
            if _idle(w) or time.monotonic() - t0 >= self.drain_timeout:
                with self._lock:  # a restore or restart in between takes the worker back
                    if self._turn[w.name] != turn:
                        return
                    w.stop()
                log.info("drained %s: stopped", w.name)
                return
            time.sleep(0.2)

    def restart(self, worker: WorkerRef, reason: str) -> None:
        """Stops the process and starts it on the same port; returns once it is healthy and serving."""
        w = self._worker("restart", worker)
        self._record("restart", w, Routability.DRAINING, f"restarting: {reason}")
        w.stop()
        w.start()
        try:
            wait_healthy([w], self.ready_timeout)
        except ProcessError as e:
            raise ActionRefused(f"restart: {w.name} did not come back: {e}") from e
        self._record("restarted", w, Routability.SERVING, reason)

    def avoid_link(self, prefill: WorkerRef, decode: WorkerRef, reason: str, until: float | None) -> None:
        p, d = self._worker("avoid_link", prefill), self._worker("avoid_link", decode)
        if (p.role, d.role) != ("prefill", "decode"):
            raise ActionRefused(f"avoid_link: {p.name} ({p.role}) -> {d.name} ({d.role}) is no prefill -> decode pair")
        now = time.time()
        with self._lock:
            self.avoided[d.name] = kept = with_avoidance(self.avoided.get(d.name, {}), p.name, until, reason, now)
            self.write()
        what = "lifted" if p.name not in kept else f"avoided for {until - now:.0f} s"  # type: ignore[operator]
        self._log(f"avoid_link {p.name} -> {d.name}: {what}: {reason}")

    def stopped_on_purpose(self, member: Process) -> bool:
        """The fleet stopped it (drained) or is restarting it itself: not to be restarted."""
        state = self.states.get(member.name)
        return state is not None and state.state is Routability.DRAINING

    def override_power(self, worker: WorkerRef, watts: float | None, until: float, reason: str) -> None:
        w = self._worker("override_power", worker)
        with self._lock:
            if watts is None:
                self.overrides.pop(w.name, None)
            else:
                self.overrides[w.name] = PowerOverride(watts, until, reason)
        log.info("override_power %s: %s W until %s: %s", w.name, watts, until, reason)

    def power_override(self, worker: WorkerRef) -> PowerOverride | None:
        o = self.overrides.get(self._worker("power_override", worker).name)
        return o if o is not None and o.active(time.time()) else None

    def cap_power(self, worker: WorkerRef, watts: float | None, until: float, reason: str,
                  fallback_watts: float | None = None) -> None:
        w = self._worker("cap_power", worker)
        if self.token is None:
            raise ActionRefused("cap_power: this fleet has no internal token to reach the workers' /internal/power")
        send_power_cap(w.internal_url, self.token, watts, until, reason, fallback_watts)
        with self._lock:
            before = self.caps.pop(w.name, None)
            if watts is not None:
                self.caps[w.name] = watts
        if before != watts:  # a renewal is not news
            self._log(f"cap_power {w.name}: {'lifted' if watts is None else f'{watts:.0f} W'}: {reason}")

    def cordon(self, node: str, reason: str) -> None:
        raise ActionRefused("cordon: " + NO_NODES.format("cordon"))

    def uncordon(self, node: str, reason: str) -> None:
        raise ActionRefused("uncordon: " + NO_NODES.format("uncordon"))


def _idle(w: Member) -> bool:
    """Its /health says it holds no request (running, waiting and KV leases all 0: a drained
    stream's KV waits to be pulled), or that its engine is dead (nothing left to finish)."""
    try:
        h = httpx.get(w.url + "/health", timeout=1.0).json()
    except (httpx.HTTPError, ValueError):
        return False
    return h.get("status") == "dead" or (h.get("running") == 0 and h.get("waiting") == 0 and not h.get("kv_leases"))
