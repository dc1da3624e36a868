"""What the engine asks of a KV connector: the one seam between the batched core and the
prefill -> decode handoff (kv/connector.py is the connector; this package never imports it).

As vLLM v1's scheduler-side connector, it is told when a request finishes and may keep
the request's blocks instead of the engine freeing them; it lets them go in `expire`,
which the engine loop calls every round. The engine calls all three methods on its own
thread. A plain engine has no connector and frees every finished request's blocks at once.
"""

from typing import Protocol

from .sequence import Sequence


class KVHooks(Protocol):
    def request_finished(self, seq: Sequence, reason: str) -> bool:
        """`seq` has just finished for `reason`. True: the connector holds its blocks now
        and frees them itself (a delayed free); the engine must not free them."""
        ...

    def holds(self, request_id: str) -> bool:
        """Whether blocks are held under `request_id`; a new request may not take that id."""
        ...

    def expire(self) -> None:
        """Frees the blocks of holdings whose time is up."""
        ...
