"""Real GPUs' readings (`telemetry/nvml.py`) as the DCGM exporter's series, names and labels
(`gpu`, `UUID`, `modelName`, `Hostname`, and `pod`, `namespace`, `container` for a GPU a pod
holds), so the power loop's and the dashboards' PromQL reads the node agent as it reads a
DCGM exporter or a modelled GPU. A reading NVML does not give is no sample, never a zero.

DCGM's counters (energy, ECC) keep their own names (prometheus_client would add `_total`
to a counter), as the modelled GPU does.
"""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily

from . import catalog as c
from .nvml import GpuReading

POD_LABELS = ("pod", "namespace", "container")
FIELDS = (  # (series, help, the reading's field)
    (c.DCGM_POWER_USAGE, "Power draw (in W).", "power_watts"),
    (c.DCGM_POWER_MGMT_LIMIT, "Power management limit (in W).", "limit_watts"),
    (c.DCGM_ENFORCED_POWER_LIMIT, "Enforced power limit (in W).", "enforced_watts"),
    (c.DCGM_SM_CLOCK, "SM clock frequency (in MHz).", "sm_clock_mhz"),
    (c.DCGM_GPU_TEMP, "GPU temperature (in C).", "temperature_c"),
    (c.DCGM_GPU_UTIL, "GPU utilization (in %).", "utilisation_pct"),
    (c.DCGM_TOTAL_ENERGY, "Total energy consumption since boot (in mJ).", "energy_mj"),
    (c.DCGM_ECC_SBE_VOL, "Total number of single-bit volatile ECC errors.", "ecc_corrected"),
    (c.DCGM_ECC_DBE_VOL, "Total number of double-bit volatile ECC errors.", "ecc_uncorrected"),
)


@dataclass
class GpuSample:
    """One GPU at the last period: who it is, who holds it, what it read, its last XID."""
    labels: Mapping[str, str]           # gpu, UUID, modelName, Hostname
    holder: Mapping[str, str] = field(default_factory=dict)  # pod, namespace, container; empty: no pod
    reading: GpuReading | None = None   # None: it did not answer this period
    xid: int | None = None              # None: XID events not watched on it


def families(samples: list[GpuSample]) -> Iterator[GaugeMetricFamily]:
    names = [*c.DCGM_LABELS, *POD_LABELS]

    def values(s: GpuSample) -> list[str]:
        return [s.labels.get(k, "") for k in c.DCGM_LABELS] + [s.holder.get(k, "") for k in POD_LABELS]

    for name, doc, attr in FIELDS:
        family = GaugeMetricFamily(name, doc, labels=names)
        for s in samples:
            value = None if s.reading is None else getattr(s.reading, attr)
            if value is not None:
                family.add_metric(values(s), float(value))
        yield family
    xid = GaugeMetricFamily(c.DCGM_XID_ERRORS, "Value of the last XID error encountered.", labels=names)
    for s in samples:
        if s.xid is not None:
            xid.add_metric(values(s), float(s.xid))
    yield xid
