"""What the engine asks of a KV connector: the one seam between the batched core and the
prefill -> decode handoff (kv/connector.py is the connector; this package never imports it).

As vLLM v1's scheduler-side connector, it is told when a request finishes and may keep
the request's blocks instead of the engine freeing them; it lets them go in `expire`,
which the engine loop calls every round. It is also shown each batch before it runs, and
may ask to hear of each layer the forward pass has written (a prompt's KV streamed layer by
layer while it computes, kv/early.py). The engine calls every method on its own thread.
A plain engine has no connector and frees every finished request's blocks at once.
"""

from collections.abc import Callable
from typing import Protocol

from .scheduler import ScheduledBatch
from .sequence import Sequence

LayerDone = Callable[[int], None]  # called with a layer's index once the forward pass has written (queued) it


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

    def step_started(self, batch: ScheduledBatch) -> LayerDone | None:
        """`batch` is about to run (its blocks allocated). A callback: the runner calls it
        after each layer of this forward pass; None: nobody asks."""
        ...

    def step_failed(self, batch: ScheduledBatch) -> None:
        """The step of `batch` raised (in its forward pass or after); its sequences are run
        again one by one."""
        ...
