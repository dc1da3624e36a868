"""A stand-in for the Hugging Face hub on loopback (no hub is reachable from the tests): it
serves model directories in the hub's HTTP layout, as much of it as huggingface_hub's
snapshot_download uses (repository info by revision, the file tree, `resolve/` with its
commit and ETag headers), and refuses like the hub: a private repository without the
right token is "not found" (401, X-Error-Code RepoNotFound), an unknown revision 404."""

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: Path                  # the directory whose files the repository holds
    token: str | None = None     # private: only this bearer token reads it
    commit: str = field(default="")
    revisions: tuple[str, ...] = ("main",)

    def __post_init__(self) -> None:
        digest = hashlib.sha1()
        for p in sorted(self.files.iterdir()):
            digest.update(p.name.encode() + p.read_bytes())
        self.commit = self.commit or digest.hexdigest()


class HubServer:
    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode(), {"X-Error-Code": code,
                                                                           "X-Error-Message": message})

        def _repo(self, repo_id: str, revision: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            auth = self.headers.get("Authorization")
            if repo is None or (repo.token and auth != f"Bearer {repo.token}"):
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            if revision not in (*repo.revisions, repo.commit):
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
                return None
            return repo

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Authorization")))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                repo = self._repo("/".join(parts[2:4]), parts[5])
                if repo is None:
                    return
                files = sorted(p for p in repo.files.iterdir() if p.is_file())
                if parts[4] == "revision":
                    body = {"id": "/".join(parts[2:4]), "sha": repo.commit,
                            "siblings": [{"rfilename": p.name} for p in files]}
                else:
                    body = [{"type": "file", "path": p.name, "size": p.stat().st_size,
                             "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files]
                return self._send(200, json.dumps(body).encode())
            if len(parts) >= 5 and parts[2] == "resolve":
                repo = self._repo("/".join(parts[:2]), parts[3])
                if repo is None:
                    return
                file = repo.files / "/".join(parts[4:])
                if not file.is_file() or repo.files not in file.resolve().parents:
                    return self._error(404, "EntryNotFound", "Entry not found")
                data = file.read_bytes()
                return self._send(200, data, {"X-Repo-Commit": repo.commit,
                                              "ETag": f'"{hashlib.sha1(data).hexdigest()}"'},
                                  "application/octet-stream")
            self._error(404, "NotFound", "no such route")

    return Handler
