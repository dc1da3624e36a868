"""A model from a Hugging Face repository (`hf://ORG/NAME@REVISION`), downloaded into a
directory the worker then loads: what a worker pod's init container runs
(`fleetwise model download`).

Only the files the worker reads are fetched (configuration, tokenizer, safetensors weights),
not the PyTorch pickles or GGUF copies many repositories also carry. huggingface_hub does
the transfer, so its environment applies: HF_TOKEN (a gated or private repository),
HF_ENDPOINT (a mirror), HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT. A second run into the
same directory (an init container restarted) fetches only what is missing or changed.
"""

import logging
from pathlib import Path

from fleetwise import model_source

log = logging.getLogger(__name__)

WANTED = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja", "*.safetensors", "model.safetensors.index.json"]


class DownloadError(RuntimeError):
    pass


def download(uri: str, out: Path, token: str | None = None) -> Path:
    """Fetch the worker's files of the repository `uri` names into `out`; DownloadError says
    what went wrong in a line a person can act on."""
    source = model_source.parse(uri)
    if source.kind != "hf":
        raise DownloadError(f"{uri!r} is not an hf:// model; only hf:// models are downloaded")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    out.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(source.repo, revision=source.revision, local_dir=out, allow_patterns=WANTED, token=token)
    except GatedRepoError:
        raise DownloadError(f"{source.repo} is gated: the token (model.tokenSecret) must belong to an account "
                            "that accepted its terms")
    except RepositoryNotFoundError:
        raise DownloadError(f"{source.repo} not found, or private and the token (model.tokenSecret) cannot read it")
    except RevisionNotFoundError:
        raise DownloadError(f"{source.repo} has no revision {source.revision!r}")
    except (HfHubHTTPError, OSError) as e:
        raise DownloadError(f"downloading {source.repo}@{source.revision}: {e}")
    missing = [f for f in ("config.json", "tokenizer.json") if not (out / f).is_file()]
    if missing or not any(out.glob("*.safetensors")):
        raise DownloadError(f"{source.repo}@{source.revision} has no {', '.join(missing) or 'safetensors weights'}: "
                            "the worker needs config.json, tokenizer.json and *.safetensors")
    log.info("downloaded %s@%s to %s", source.repo, source.revision, out)
    return out
