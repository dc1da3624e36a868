"""`fleetwise bench faults`: fault detection on a real local fleet (see run.py)."""
