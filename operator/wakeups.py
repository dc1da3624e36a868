"""What wakes a ModelDeployment's daemon before its resync: one asyncio.Event per deployment.

The daemons and the event handlers that wake them all run in the operator's event loop, so
setting an Event needs no lock and no hop between threads.
"""

import asyncio


class Wakeups:
    def __init__(self) -> None:
        self._events: dict[tuple[str | None, str], asyncio.Event] = {}

    def register(self, namespace: str | None, name: str) -> asyncio.Event:
        """A fresh Event for the deployment's daemon (a deployment deleted and created again
        under the same name gets a new daemon, and the new one takes over the wake-ups)."""
        event = self._events[(namespace, name)] = asyncio.Event()
        return event

    def forget(self, namespace: str | None, name: str, event: asyncio.Event) -> None:
        if self._events.get((namespace, name)) is event:
            del self._events[(namespace, name)]

    def wake(self, namespace: str | None, name: str) -> None:
        event = self._events.get((namespace, name))
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        for event in self._events.values():
            event.set()
