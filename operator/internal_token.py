"""The shared internal token where the workers are: the operator reads it from its own mount
of the chart's Secret and keeps a copy (`fleetwise-internal-token`) in each namespace where
it places worker pods, which mount it (manifests.py). The file is read at each check, so a
rotated Secret reaches the copies once the kubelet has updated the operator's mount; a copy
is looked at again after `recheck` seconds, so one edited or deleted by hand comes back."""

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleetwise.protocol import load_token

from . import manifests as m
from .kube import Kube

RECHECK_SECONDS = 60.0


@dataclass
class TokenCopies:
    kube: Kube
    token_file: Path
    recheck: float = RECHECK_SECONDS
    _checked: dict[str, tuple[str, float]] = field(default_factory=dict)  # namespace -> (token, when)
    # one check at a time: the reconciles of a namespace's deployments, starting together, would
    # each read the missing copy and race to create it (all but one refused with a 409)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ensure(self, namespace: str) -> None:
        """The namespace's copy holds the current token (raises ApiException when it cannot be written)."""
        token = load_token(self.token_file)
        with self._lock:
            seen = self._checked.get(namespace)
            if seen and seen[0] == token and time.monotonic() - seen[1] < self.recheck:
                return
            self.kube.ensure_secret(namespace, m.token_secret(token))
            self._checked[namespace] = (token, time.monotonic())
