"""`python -m fleetwise.sim CONFIG.yaml`: one simulation from a file (see run.py)."""

from .run import main

raise SystemExit(main())
