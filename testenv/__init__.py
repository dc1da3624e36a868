"""The test control plane: `cluster.py` starts a real Kubernetes API server with kwok GPU nodes
on loopback from the binaries that `k8s/build.sh` builds. Development only: not in the wheel."""
