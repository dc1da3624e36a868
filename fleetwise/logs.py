"""Log lines that name their request.

The router takes the client's `x-request-id` (or makes one), passes it to the prefill and
decode workers, and every part sets it in `request_id` while it works on the request, so
that one id finds a request's lines in the router's and both workers' logs; answers carry it
back in the same header.
"""

import itertools
import logging
import os
import re
from contextvars import ContextVar

from fleetwise.protocol import MAX_REQUEST_ID_LENGTH

request_id: ContextVar[str] = ContextVar("request_id", default="-")

_USABLE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_LENGTH}}}")


def incoming_request_id(value: str | bytes | None) -> str:
    """The caller's id when it is one we can log and pass on safely (letters, digits, `._:-`,
    at most MAX_REQUEST_ID_LENGTH characters), else a new one."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value if value and _USABLE.fullmatch(value) else new_request_id()


_BASE = os.urandom(8).hex()  # this process's: ids stay unique across processes
_SERIAL = itertools.count()


def new_request_id() -> str:
    """A new id, 32 hex digits like a UUID's, unique to this process and its run; cheaper than
    uuid4 (no system call, no UUID object), as every request without an id of its own gets one."""
    return f"{_BASE}{next(_SERIAL):016x}"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure(level: int = logging.INFO) -> None:
    """The processes' log format: time, level, logger, [request id], message."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RequestIdFilter())
