"""`fleetwise node-agent`: one per GPU node (a DaemonSet). It applies the power loop's caps to
the node's real GPUs through NVML, enforces their leases, and exports each GPU's telemetry
under the DCGM exporter's names, so the operator's power loop reads this node as it reads a
modelled GPU.

One path for a cap on a real GPU: the operator writes it on the worker pod (the
`fleetwise.dev/power-cap` annotation: watts per GPU, `until`, `fallbackWatts`) and this agent,
watching the pods on its node, applies it to the GPUs the kubelet gave that pod (its
pod-resources API). The worker is not asked (a worker container has no privilege to set a
limit, and two writers of one limit would fight); the operator runs with
`--power-actuator node-agent`. The annotation's `until` is the lease, on the wall clock (the
nodes' clocks are kept in step, as Kubernetes' own leases need): past it the GPU goes to the
fallback, or to its default limit when there is none, even when the API server or the
operator is gone. A GPU no pod holds, or held by a pod without a cap, is at its default
limit, so a pod that goes leaves no cap behind, and an agent started after a crash puts
right what the last one left. On exit the agent restores every GPU's default limit.

Each period reconciles against what NVML reports, not what the agent remembers setting. A
GPU that stops answering is counted (`fleetwise_node_agent_errors_total`) and left out of
that period's series; the others go on.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from fleetwise.telemetry import catalog as c
from fleetwise.telemetry.nvml import NvmlGPU, NvmlRefused, NvmlUnavailable, XidWatch
from fleetwise.telemetry.nvml_series import GpuSample, families

from . import manifests as m
from .pod_resources import Holder, PodResourcesError

log = logging.getLogger(__name__)

PodKey = tuple[str, str]  # namespace, name
TOLERANCE_WATTS = 0.5     # NVML rounds to milliwatts; a limit this close is the one wanted


@dataclass(frozen=True)
class CapIntent:
    """A pod's cap annotation as the agent reads it."""
    watts: float
    until: float
    fallback: float | None
    reason: str = ""

    def target(self, now: float) -> tuple[float | None, float | None]:
        """The limit in force now and until when (None: no expiry): the cap, or past its lease the fallback."""
        return (self.watts, self.until) if now < self.until else (self.fallback, None)


def cap_intent(pod: dict) -> CapIntent | None:
    cap = m.pod_power_cap(pod)
    if cap is None:
        return None
    fallback = cap.get("fallbackWatts")
    return CapIntent(float(cap["watts"]), float(cap["until"]),
                     float(fallback) if isinstance(fallback, int | float) else None, str(cap.get("reason", "")))


@dataclass
class Applied:
    watts: float
    expiry: float | None
    holder: Holder


@dataclass(eq=False)  # a collector: the registry keys it by identity
class NodeAgent:
    node: str
    gpus: list[NvmlGPU]
    intents: Callable[[], dict[PodKey, CapIntent | None]]   # the node's worker pods, from the watch
    holders: Callable[[], dict[str, Holder]]                # device id -> holder, from the kubelet
    xid: XidWatch | None = None
    gpu_metrics: bool = True   # False where a DCGM exporter runs: only the caps are exported
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    applied: dict[int, Applied] = field(default_factory=dict)
    samples: list[GpuSample] = field(default_factory=list)
    _held: dict[str, Holder] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.errors = Counter(c.NODE_AGENT_ERRORS, "What failed: a GPU's reading or limit, the kubelet's "
                              "pod-resources answer, the pods watch.", ["what", "gpu"], registry=self.registry)
        self.registry.register(self)

    def holder(self, gpu: NvmlGPU) -> Holder | None:
        return self._held.get(gpu.uuid) or self._held.get(str(gpu.index))

    def step(self, now: float | None = None) -> None:
        """One period: who holds which GPU, what each should be limited to, applied; then read."""
        now = time.time() if now is None else now
        try:
            self._held = self.holders()
        except PodResourcesError as e:  # keep the last answer: a lease still lapses on time
            self.errors.labels("pod_resources", "").inc()
            log.warning("%s", e)
        intents = self.intents()
        samples = []
        for gpu in self.gpus:
            holder = self.holder(gpu)
            intent = intents.get((holder.namespace, holder.pod)) if holder else None
            watts, expiry = intent.target(now) if intent else (None, None)
            try:
                self._enforce(gpu, watts, expiry, holder)
                reading = gpu.read()
            except NvmlUnavailable as e:
                self.errors.labels("gpu_read", str(gpu.index)).inc()
                log.warning("%s", e)
                reading = None
            samples.append(GpuSample(self._labels(gpu), self._pod_labels(holder), reading,
                                     None if self.xid is None or gpu.index not in self.xid.watched
                                     else self.xid.last[gpu.index]))
        with self._lock:
            self.samples = samples

    def _enforce(self, gpu: NvmlGPU, watts: float | None, expiry: float | None, holder: Holder | None) -> None:
        if watts is not None and not gpu.min_watts <= watts <= gpu.max_watts:
            log.warning("GPU %s: a cap of %g W is outside %g-%g W; held at the nearest", gpu.index, watts,
                        gpu.min_watts, gpu.max_watts)
            watts = min(max(watts, gpu.min_watts), gpu.max_watts)
        want = gpu.default_watts if watts is None else watts
        if abs(gpu.limit_watts() - want) > TOLERANCE_WATTS:
            try:
                gpu.set_limit(watts)
            except NvmlRefused as e:  # what holds is whatever held before: no cap of ours to report
                self.errors.labels("set_limit", str(gpu.index)).inc()
                log.error("%s", e)
                self.applied.pop(gpu.index, None)
                return
            who = f"{holder.namespace}/{holder.pod}" if holder else "no pod"
            log.info("GPU %s (%s): power limit %g W%s", gpu.index, who, want, " (default)" if watts is None else "")
        if watts is None or holder is None:
            self.applied.pop(gpu.index, None)
        else:
            self.applied[gpu.index] = Applied(watts, expiry, holder)

    def restore_all(self) -> None:
        """Every GPU back to its default limit (the agent is stopping)."""
        for gpu in self.gpus:
            try:
                if abs(gpu.limit_watts() - gpu.default_watts) > TOLERANCE_WATTS:
                    gpu.set_limit(None)
                    log.info("GPU %s: power limit back to its default %g W", gpu.index, gpu.default_watts)
            except (NvmlUnavailable, NvmlRefused) as e:
                self.errors.labels("set_limit", str(gpu.index)).inc()
                log.error("GPU %s: default limit not restored: %s", gpu.index, e)
            self.applied.pop(gpu.index, None)

    def _labels(self, gpu: NvmlGPU) -> dict[str, str]:
        return {"gpu": str(gpu.index), "UUID": gpu.uuid, "modelName": gpu.name, "Hostname": self.node}

    @staticmethod
    def _pod_labels(holder: Holder | None) -> dict[str, str]:
        return {} if holder is None else {"pod": holder.pod, "namespace": holder.namespace,
                                          "container": holder.container}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The last period's readings and the caps in force, as a scrape finds them."""
        with self._lock:
            samples = list(self.samples)
        if self.gpu_metrics:
            yield from families(samples)
        names = ["gpu", "UUID", "pod", "namespace"]
        cap = GaugeMetricFamily(c.POWER_CAP_WATTS, "The power cap in force per GPU (W); no series while uncapped.",
                                labels=names)
        expiry = GaugeMetricFamily(c.POWER_CAP_EXPIRY, "When the cap lapses unless renewed (Unix time).",
                                   labels=names)
        by_index = {g.index: g for g in self.gpus}
        for index, a in sorted(self.applied.items()):
            values = [str(index), by_index[index].uuid, a.holder.pod, a.holder.namespace]
            cap.add_metric(values, a.watts)
            if a.expiry is not None:
                expiry.add_metric(values, a.expiry)
        yield cap
        yield expiry
