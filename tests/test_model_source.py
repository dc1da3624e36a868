"""Models from where users keep them: `spec.model.uri` parsed and refused with reasons, and an
hf:// model downloaded by `fleetwise model download` (what the worker pod's init container
runs) from a local server in the Hugging Face hub's HTTP layout - no hub is reachable here."""

import filecmp
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from fleetwise.model_source import ModelSource, ModelUriError, parse
from fleetwise.spec import ModelDeploymentSpec
from fleetwise.worker.model.files import model_id, write_model
from tests.hub_server import HubServer, Repo


@pytest.mark.parametrize("uri, source", [
    ("/models/llama", ModelSource("path", path="/models/llama")),
    ("/models//llama/", ModelSource("path", path="/models/llama")),
    ("pvc://weights/llama-3/8b", ModelSource("pvc", path="llama-3/8b", claim="weights")),
    ("pvc://weights", ModelSource("pvc", path="", claim="weights")),
    ("hf://meta-llama/Llama-3.1-8B@0e9e39f", ModelSource("hf", repo="meta-llama/Llama-3.1-8B", revision="0e9e39f")),
    ("hf://org/name", ModelSource("hf", repo="org/name", revision="main")),
    ("hf://org/name@refs/pr/1", ModelSource("hf", repo="org/name", revision="refs/pr/1")),
])
def test_each_kind_of_uri_parses(uri, source):
    assert parse(uri) == source


@pytest.mark.parametrize("uri, words", [
    ("models/llama", "must be absolute"),
    ("s3://bucket/llama", "unknown scheme 's3'"),
    ("pvc://Weights/x", "not a PersistentVolumeClaim name"),
    ("pvc:///x", "not a PersistentVolumeClaim name"),
    ("pvc://w/../etc", "'..' is not allowed"),
    ("/models/../etc", "'..' is not allowed"),
    ("hf://llama", "expected hf://ORG/NAME@REVISION"),
    ("hf://org/name/extra", "expected hf://ORG/NAME@REVISION"),
    ("hf://org/name@", "is not a revision"),
    ("/models/my model", "without spaces"),
])
def test_a_bad_uri_is_refused_saying_what_is_accepted(uri, words):
    with pytest.raises(ModelUriError, match=words):
        parse(uri)
    with pytest.raises(ValidationError, match=words) as e:
        ModelDeploymentSpec.model_validate({"model": {"name": "m", "uri": uri}, "image": "i",
                                            "mixed": {"replicas": 1, "gpuType": "H100"}, "mode": "Colocated"})
    assert e.value.errors()[0]["loc"] == ("model",)


def test_a_token_secret_is_only_for_hub_models():
    base = {"image": "i", "mode": "Colocated", "mixed": {"replicas": 1, "gpuType": "H100"}}
    with pytest.raises(ValidationError, match="tokenSecret is for hf:// models only"):
        ModelDeploymentSpec.model_validate({**base, "model": {"name": "m", "uri": "/m", "tokenSecret": {"name": "s"}}})
    spec = ModelDeploymentSpec.model_validate({**base, "model": {"name": "m", "uri": "hf://o/n",
                                                                 "tokenSecret": {"name": "hf"}}})
    assert spec.model.token_secret is not None and spec.model.token_secret.key == "token"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("hub") / "tiny", "tiny", seed=3)


def download(uri: str, out, endpoint: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(out.parent / "hf-home"), "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "fleetwise", "model", "download", uri, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)


def test_a_hub_model_downloads_with_its_token_into_a_directory_the_worker_loads(tiny, tmp_path):
    (tiny / "pytorch_model.bin").write_bytes(b"\0" * 1024)  # a second copy of the weights nobody needs
    with HubServer({"acme/tiny": Repo(tiny, token="hf_secret")}) as hub:
        out = tmp_path / "model"
        r = download("hf://acme/tiny@main", out, hub.url, token="hf_secret")
        assert r.returncode == 0, r.stderr
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
            assert filecmp.cmp(tiny / name, out / name, shallow=False), name
        assert not (out / "pytorch_model.bin").exists()
        assert model_id(out) == model_id(tiny)
        repo_requests = [r for r in hub.requests if "acme/tiny" in r[1]]
        assert repo_requests and all(auth == "Bearer hf_secret" for _, _, auth in repo_requests)
        # an init container that restarts finds the files there and fetches none again
        fetched = len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]])
        assert download("hf://acme/tiny@main", out, hub.url, token="hf_secret").returncode == 0
        assert len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]) == fetched


def test_a_download_that_cannot_succeed_says_why(tiny, tmp_path):
    with HubServer({"acme/tiny": Repo(tiny, token="hf_secret")}) as hub:
        r = download("hf://acme/tiny@main", tmp_path / "a", hub.url)
        assert r.returncode == 1 and "acme/tiny not found, or private" in r.stderr
        r = download("hf://acme/tiny@v9", tmp_path / "b", hub.url, token="hf_secret")
        assert r.returncode == 1 and "has no revision 'v9'" in r.stderr
        r = download("pvc://weights/x", tmp_path / "c", hub.url)
        assert r.returncode == 1 and "only hf:// models are downloaded" in r.stderr
        r = download("hf://acme", tmp_path / "d", hub.url)
        assert r.returncode == 2 and "expected hf://ORG/NAME@REVISION" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no weights here")
    with HubServer({"acme/empty": Repo(empty)}) as hub:
        r = download("hf://acme/empty", tmp_path / "e", hub.url)
        assert r.returncode == 1 and "the worker needs config.json, tokenizer.json and *.safetensors" in r.stderr
