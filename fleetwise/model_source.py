"""Where a ModelDeployment's model comes from: `spec.model.uri`, parsed.

Three kinds, as users keep models: a directory already in the worker image (an absolute
path), a directory on a PersistentVolumeClaim (`pvc://CLAIM/PATH`) that the worker pod
mounts read-only, and a Hugging Face repository (`hf://ORG/NAME@REVISION`) that an init
container downloads into a volume the pod shares. One parser for the spec's validation, the
operator's pod manifests and the download command, so all three agree on what a uri means.
"""

import re
from dataclasses import dataclass
from typing import Literal

USAGE = "an absolute path in the image (/models/x), pvc://CLAIM/PATH or hf://ORG/NAME@REVISION"
# a PersistentVolumeClaim's name is a DNS subdomain (RFC 1123)
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# the hub's repository ids: an owner and a name of letters, digits, '-', '_', '.'
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
DEFAULT_REVISION = "main"


class ModelUriError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["path", "pvc", "hf"]
    path: str = ""      # path: the directory; pvc: the directory inside the claim ("" = its root)
    claim: str = ""     # pvc
    repo: str = ""      # hf: ORG/NAME
    revision: str = ""  # hf: a branch, tag or commit


def _clean_path(path: str, uri: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ModelUriError(f"model uri {uri!r}: '..' is not allowed in the path")
    return "/".join(parts)


def parse(uri: str) -> ModelSource:
    """The model source `uri` names; ModelUriError says what is wrong and what is accepted."""
    if any(c.isspace() for c in uri) or not uri:
        raise ModelUriError(f"model uri {uri!r}: must be {USAGE}, without spaces")
    if uri.startswith("pvc://"):
        claim, _, path = uri[len("pvc://"):].partition("/")
        if not _CLAIM.match(claim):
            raise ModelUriError(f"model uri {uri!r}: {claim!r} is not a PersistentVolumeClaim name "
                                "(lower-case letters, digits, '-' and '.'); expected pvc://CLAIM/PATH")
        return ModelSource("pvc", path=_clean_path(path, uri), claim=claim)
    if uri.startswith("hf://"):
        repo, at, revision = uri[len("hf://"):].partition("@")
        owner, slash, name = repo.partition("/")
        if not (slash and _REPO_PART.match(owner) and _REPO_PART.match(name)):
            raise ModelUriError(f"model uri {uri!r}: expected hf://ORG/NAME@REVISION (a Hugging Face repository id "
                                "of letters, digits, '-', '_' and '.')")
        if at and not _REVISION.match(revision):
            raise ModelUriError(f"model uri {uri!r}: {revision!r} is not a revision (a branch, tag or commit)")
        return ModelSource("hf", repo=repo, revision=revision or DEFAULT_REVISION)
    if "://" in uri:
        raise ModelUriError(f"model uri {uri!r}: unknown scheme {uri.split('://')[0]!r}; must be {USAGE}")
    if not uri.startswith("/"):
        raise ModelUriError(f"model uri {uri!r}: a path in the image must be absolute; must be {USAGE}")
    return ModelSource("path", path="/" + _clean_path(uri, uri))
