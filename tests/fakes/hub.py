"""A Hugging Face hub of our own on loopback (HF_ENDPOINT): the file API huggingface_hub's
snapshot_download and model_info use, and what `datasets.load_dataset` reads through it, for model
and dataset repos served from local folders (dataset repos under /api/datasets and /datasets/).

    GET  /api/models/{repo}[/revision/{rev}]        {"id", "sha", "siblings": [{"rfilename", "size"}]}
    GET  /api/models/{repo}/tree/{sha}[/{path}]     [{"type": "file", "path", "size", "oid"}]
    POST /api/datasets/{repo}/paths-info/{sha}      the same entries for the paths asked for
    HEAD /{repo}/resolve/{rev}/{file}               X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{file}               the bytes (honours Range)

A gated repo answers 401 (X-Error-Code: GatedRepo) unless the request carries its token; an unknown
repo 404 (RepoNotFound), an unknown revision 404 (RevisionNotFound). Every request is counted.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

API = re.compile(
    r"^/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)"
    r"(?:/revision/(?P<rev>[^/]+)|/tree/(?P<tree>[^/]+)(?:/(?P<sub>.*))?|/paths-info/(?P<info>[^/]+))?$"
)
RESOLVE = re.compile(r"^/(?:datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.tokens: dict[str, str] = {}
        """Gated repo -> the token that may read it."""
        self.requests: collections.Counter[str] = collections.Counter()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hub.handle(self, body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                hub.handle(self, body=False)

            def do_POST(self) -> None:  # noqa: N802
                hub.handle(self, body=True)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def add(self, repo: str, folder: Path, token: str | None = None) -> None:
        self.repos[repo] = folder
        if token:
            self.tokens[repo] = token

    def sha(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def files(self, repo: str) -> list[Path]:
        return sorted(p for p in self.repos[repo].iterdir() if p.is_file())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _refuse(self, h: BaseHTTPRequestHandler, code: int, error: str) -> None:
        h.send_response(code)
        h.send_header("X-Error-Code", error)
        h.send_header("Content-Type", "application/json")
        body = json.dumps({"error": error}).encode()
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _allowed(self, h: BaseHTTPRequestHandler, repo: str) -> str | None:
        """None when the request may read repo, else the refusal's error code."""
        if repo not in self.repos:
            return "RepoNotFound"
        want = self.tokens.get(repo)
        if want and h.headers.get("Authorization") != f"Bearer {want}":
            return "GatedRepo"
        return None

    def handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests[f"{h.command} {path}"] += 1
        m = API.match(path) or RESOLVE.match(path)
        if m is None:
            return self._refuse(h, 404, "EntryNotFound")
        repo = m["repo"]
        if refused := self._allowed(h, repo):
            return self._refuse(h, 401 if refused == "GatedRepo" else 404, refused)
        g = m.groupdict()
        rev = g.get("rev") or g.get("tree") or g.get("info") or "main"
        if rev not in ("main", self.sha(repo)):
            return self._refuse(h, 404, "RevisionNotFound")
        if g.get("file"):
            return self._file(h, repo, g["file"], body)
        if g.get("info"):
            return self._paths_info(h, repo)
        if g.get("sub"):  # a folder: the files here are flat
            return self._json(h, [])
        return self._api(h, repo, tree=g.get("tree") is not None)

    def _entry(self, p: Path) -> dict:
        return {"type": "file", "path": p.name, "size": p.stat().st_size, "oid": self._oid(p)}

    def _paths_info(self, h: BaseHTTPRequestHandler, repo: str) -> None:
        from urllib.parse import parse_qs

        length = int(h.headers.get("Content-Length", "0"))
        asked = parse_qs(h.rfile.read(length).decode()).get("paths", [])
        self._json(h, [self._entry(p) for p in self.files(repo) if p.name in asked])

    def _json(self, h: BaseHTTPRequestHandler, data: object) -> None:
        out = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(out)))
        h.end_headers()
        h.wfile.write(out)

    def _api(self, h: BaseHTTPRequestHandler, repo: str, tree: bool) -> None:
        files = self.files(repo)
        if tree:
            return self._json(h, [self._entry(p) for p in files])
        siblings = [{"rfilename": p.name, "size": p.stat().st_size} for p in files]
        self._json(h, {"id": repo, "modelId": repo, "sha": self.sha(repo), "siblings": siblings, "private": False})

    def _oid(self, p: Path) -> str:
        return hashlib.sha1(p.read_bytes()).hexdigest()

    def _file(self, h: BaseHTTPRequestHandler, repo: str, name: str, body: bool) -> None:
        p = self.repos[repo] / name
        if not p.is_file():
            return self._refuse(h, 404, "EntryNotFound")
        data = p.read_bytes()
        start = 0
        if r := re.match(r"bytes=(\d+)-", h.headers.get("Range", "")):
            start = int(r[1])
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", self.sha(repo))
        h.send_header("ETag", f'"{self._oid(p)}"')
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if body:
            h.wfile.write(data[start:])
