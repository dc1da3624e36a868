"""Print the package's runtime requirements that the control plane (operator, router, admin
API) needs: all of pyproject.toml's `dependencies` but the worker's own (PyTorch and the model
file libraries), which no control-plane command imports."""

import re
import sys
import tomllib

WORKER_ONLY = {"torch", "safetensors", "tokenizers", "huggingface-hub"}


def control_plane_requirements(pyproject: str) -> list[str]:
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [d for d in deps if re.split(r"[^A-Za-z0-9._-]", d, maxsplit=1)[0].lower().replace("_", "-")
            not in WORKER_ONLY]


if __name__ == "__main__":
    print("\n".join(control_plane_requirements(sys.argv[1])))
