"""The fleet simulator: a discrete-event model of a fleet of GPU workers serving a request
trace, driven by the same routing policies, GPU power model, placement, power controller and
fault detector as the real system, so that a fleet's latency, throughput, power and incidents
can be studied at the scale of thousands of GPUs without them.

`run.run_simulation(SimConfig)` is the entry point; `python -m fleetwise.sim CONFIG.yaml` runs
one from a file; `study.py`, `plan.py` and `scaling.py` run many.
"""
