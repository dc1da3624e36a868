"""The fleet simulator: a discrete-event model of a fleet of GPU workers serving a request
trace, driven by the same routing policies, GPU power model and (later) controllers as the
real system, so that a fleet's latency, throughput and energy can be studied at the scale of
thousands of GPUs without them.

`run.run_simulation(SimConfig)` is the entry point; `python -m fleetwise.sim CONFIG.yaml` runs
one from a file.
"""
