"""Which pod holds which GPU on this node, from the kubelet's pod-resources API (the gRPC
service `v1.PodResourcesLister` on a unix socket, as the DCGM exporter reads it): a pod's
spec says how many GPUs it asked for, only the kubelet knows which ones the device plugin
gave it.

The answer is decoded from protobuf's wire format here (four small messages) rather than
through generated stubs, so the only dependency is `grpcio`. A device id is the device
plugin's: a GPU's UUID (`GPU-...`), or its index on plugins configured that way.
"""

from dataclasses import dataclass

SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
LIST_METHOD = "/v1.PodResourcesLister/List"
GPU_RESOURCES = ("nvidia.com/gpu",)


@dataclass(frozen=True)
class Holder:
    namespace: str
    pod: str
    container: str


class PodResourcesError(RuntimeError):
    """The kubelet did not answer (no socket, no permission, an old kubelet)."""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise PodResourcesError("a truncated pod-resources answer")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def fields(buf: bytes) -> list[tuple[int, bytes | int]]:
    """A message's fields in order: (number, bytes for length-delimited, int otherwise)."""
    out: list[tuple[int, bytes | int]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            out.append((number, value))
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise PodResourcesError("a truncated pod-resources answer")
            out.append((number, buf[i:i + n]))
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise PodResourcesError(f"a pod-resources answer with wire type {wire}")
    return out


def _text(v: bytes | int) -> str:
    return v.decode() if isinstance(v, bytes) else ""


def _bytes(v: bytes | int) -> bytes:
    return v if isinstance(v, bytes) else b""


def gpu_holders(answer: bytes, resources: tuple[str, ...] = GPU_RESOURCES) -> dict[str, Holder]:
    """A `ListPodResourcesResponse` as device id -> the container holding that GPU."""
    held: dict[str, Holder] = {}
    for number, pod in fields(answer):
        if number != 1:
            continue
        meta = {n: v for n, v in fields(_bytes(pod)) if n in (1, 2)}
        name, namespace = _text(meta.get(1, b"")), _text(meta.get(2, b""))
        for cn, container in fields(_bytes(pod)):
            if cn != 3:
                continue
            cfields = fields(_bytes(container))
            cname = next((_text(v) for n, v in cfields if n == 1), "")
            for dn, devices in cfields:
                if dn != 2:
                    continue
                dfields = fields(_bytes(devices))
                if next((_text(v) for n, v in dfields if n == 1), "") not in resources:
                    continue
                for _, device in (f for f in dfields if f[0] == 2):
                    held[_text(device)] = Holder(namespace, name, cname)
    return held


def list_gpu_holders(socket: str = SOCKET, timeout: float = 5.0) -> dict[str, Holder]:
    """Asks the kubelet now; PodResourcesError when it does not answer."""
    import grpc
    try:
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            call = channel.unary_unary(LIST_METHOD, request_serializer=lambda _: b"",
                                       response_deserializer=lambda b: b)
            return gpu_holders(call(None, timeout=timeout))
    except grpc.RpcError as e:
        raise PodResourcesError(f"the kubelet's pod-resources API at {socket}: {e.code().name}: {e.details()}") from e
