"""A minimal Hugging Face Hub, for round trips through the real ``huggingface_hub`` client without network.

It serves just what ``HfApi.create_repo`` / ``upload_folder`` / ``create_commit`` and the downloads of timm,
transformers and ``hf_hub_download`` / ``snapshot_download`` use, with the Hub's status codes and headers:

- ``GET /api/whoami-v2``: the token's user; an unknown token is a 401 like the Hub's.
- ``POST /api/repos/create``: 409 when the repo exists, 403 outside the token's namespaces.
- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info with ``sha`` and ``siblings``.
- ``POST /api/models/{repo}/preupload/{rev}``: every file is "regular" (inline base64), so no LFS/Xet.
- ``POST /api/models/{repo}/commit/{rev}``: ndjson ``header`` / ``file`` / ``deletedFile`` / ``deletedFolder``.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` and ``POST /api/models/{repo}/paths-info/{rev}``.
- ``POST /api/validate-yaml``: README metadata must be a YAML mapping.
- ``GET`` / ``HEAD /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1), ``Content-Length``;
  404 with ``X-Error-Code: EntryNotFound`` / ``RepoNotFound`` / ``RevisionNotFound``.

Blobs and each repo's refs and commits are stored on disk under ``root``. Only model repos exist.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class HubError(Exception):
    """An HTTP error answered the way the Hub does (status, ``X-Error-Code``, ``X-Error-Message``, JSON body)."""

    def __init__(self, status: int, message: str, code: str | None = None, **body: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.body = {"error": message, **body}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file, which the Hub uses as the ETag of regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """An in-process Hub on ``127.0.0.1`` and a free port, serving from a background thread.

    Args:
        root: Folder where blobs and repos are stored.
        tokens: Known tokens, mapped to their user name.
        orgs: Organisations each user belongs to (and may write to).

    Example:
        >>> with HubServer(tmp_path, tokens={"hf_good": "user"}) as hub:
        ...     env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_good"}
    """

    def __init__(
        self,
        root: str | os.PathLike,
        tokens: dict[str, str],
        orgs: dict[str, list[str]] | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.tokens = dict(tokens)
        self.orgs = {user: list(names) for user, names in (orgs or {}).items()}
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.RLock()
        self._repos: dict[str, dict[str, Any]] = {}
        self._counter = 0
        os.makedirs(os.path.join(self.root, "blobs"), exist_ok=True)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, for ``HF_ENDPOINT``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- storage ---------------------------------------------------------------------------------------

    def _repo_dir(self, repo_id: str) -> str:
        return os.path.join(self.root, "repos", *repo_id.split("/"))

    def _save_repo(self, repo_id: str) -> None:
        path = os.path.join(self._repo_dir(repo_id), "repo.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self._repos[repo_id], f, indent=1)

    def _put_blob(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        path = os.path.join(self.root, "blobs", oid)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
        return oid

    def _blob(self, oid: str) -> bytes:
        with open(os.path.join(self.root, "blobs", oid), "rb") as f:
            return f.read()

    def create_repo(self, repo_id: str, owner: str, private: bool = False) -> None:
        """Creates a repo with the Hub's initial commit (``.gitattributes``); also used to seed tests."""
        with self._lock:
            if repo_id in self._repos:
                # The client reads the url of the existing repo from the 409's body (create_repo(exist_ok=True)).
                raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
            self._repos[repo_id] = {"owner": owner, "private": private, "branches": {}, "commits": {}}
            self._commit(repo_id, "main", "initial commit", {".gitattributes": GITATTRIBUTES}, [])

    def _commit(
        self, repo_id: str, branch: str, message: str, added: dict[str, bytes], deleted: list[tuple[str, bool]]
    ) -> str:
        repo = self._repos[repo_id]
        parent = repo["branches"].get(branch)
        files = dict(repo["commits"][parent]["files"]) if parent else {}
        for path, is_folder in deleted:
            prefix = path.rstrip("/") + "/"
            gone = [p for p in files if p.startswith(prefix)] if is_folder else [p for p in files if p == path]
            if not gone:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for p in gone:
                del files[p]
        for path, data in added.items():
            files[path] = {"oid": self._put_blob(data), "size": len(data)}
        self._counter += 1
        sha = hashlib.sha1(f"{repo_id}\0{parent}\0{message}\0{self._counter}\0{time.time()}".encode()).hexdigest()
        repo["commits"][sha] = {"parent": parent, "message": message, "files": files, "date": time.time()}
        repo["branches"][branch] = sha
        self._save_repo(repo_id)
        return sha

    def head(self, repo_id: str, branch: str = "main") -> str:
        """The commit sha a branch points to."""
        with self._lock:
            return self._repos[repo_id]["branches"][branch]

    def commits(self, repo_id: str, branch: str = "main") -> list[tuple[str, str]]:
        """``(sha, message)`` of a branch's history, newest first."""
        with self._lock:
            repo = self._repos[repo_id]
            out, sha = [], repo["branches"][branch]
            while sha:
                out.append((sha, repo["commits"][sha]["message"]))
                sha = repo["commits"][sha]["parent"]
            return out

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The repo's files at a revision, with their contents."""
        with self._lock:
            commit = self._resolve(repo_id, revision)
            return {
                path: self._blob(entry["oid"])
                for path, entry in self._repos[repo_id]["commits"][commit]["files"].items()
            }

    def has_repo(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def _resolve(self, repo_id: str, revision: str) -> str:
        repo = self._repos[repo_id]
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if _COMMIT_RE.match(revision) and revision in repo["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # ---- auth ------------------------------------------------------------------------------------------

    def user_for(self, authorization: str | None) -> str | None:
        """The user of a request's bearer token (None without one); an unknown token is a 401."""
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, INVALID_CREDENTIALS)
        return self.tokens[token]

    def can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.orgs.get(user, []))

    def _readable_repo(self, repo_id: str, user: str | None) -> dict[str, Any]:
        repo = self._repos.get(repo_id)
        # As on the Hub, a private repo one may not read looks missing.
        if repo is None or (repo["private"] and not self.can_write(user, repo_id.split("/")[0])):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str, user: str | None) -> dict[str, Any]:
        if user is None:
            raise HubError(401, "You must be authenticated to access this resource")
        repo = self._readable_repo(repo_id, user)
        if not self.can_write(user, repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ---- API -------------------------------------------------------------------------------------------

    def api_whoami(self, user: str | None) -> dict[str, Any]:
        if user is None:
            raise HubError(401, "You must be authenticated to access this resource")
        orgs = [{"name": org, "type": "org", "roleInOrg": "write"} for org in self.orgs.get(user, [])]
        return {
            "type": "user",
            "id": hashlib.md5(user.encode()).hexdigest()[:24],
            "name": user,
            "fullname": user,
            "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        }

    def api_create_repo(self, user: str | None, payload: dict[str, Any]) -> dict[str, Any]:
        if user is None:
            raise HubError(401, "You must be authenticated to access this resource")
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, "Only model repos are served here")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if not self.can_write(user, namespace):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        self.create_repo(repo_id, owner=user, private=private)
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def api_model_info(self, user: str | None, repo_id: str, revision: str) -> dict[str, Any]:
        with self._lock:
            repo = self._readable_repo(repo_id, user)
            sha = self._resolve(repo_id, revision)
            commit = repo["commits"][sha]
            return {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": sha,
                "private": repo["private"],
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit["date"])),
                "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit["date"])),
                "siblings": [{"rfilename": path} for path in sorted(commit["files"])],
            }

    def api_preupload(self, user: str | None, repo_id: str, revision: str, payload: dict[str, Any]) -> dict:
        with self._lock:
            repo = self._writable_repo(repo_id, user)
            files = {}
            if revision in repo["branches"]:
                files = repo["commits"][repo["branches"][revision]]["files"]
            return {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": files[f["path"]]["oid"] if f["path"] in files else None,
                    }
                    for f in payload.get("files", [])
                ],
                "commitOid": repo["branches"].get(revision),
            }

    def api_commit(self, user: str | None, repo_id: str, revision: str, body: bytes) -> dict[str, Any]:
        header: dict[str, Any] = {}
        added: dict[str, bytes] = {}
        deleted: list[tuple[str, bool]] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append((value["path"], False))
            elif key == "deletedFolder":
                deleted.append((value["path"], True))
            else:
                # preupload said "regular" for every file, so the client has no reason to send LFS pointers.
                raise HubError(400, f"Unsupported commit operation {key!r} (this test Hub has no LFS)")
        with self._lock:
            repo = self._writable_repo(repo_id, user)
            if revision not in repo["branches"]:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            parent = header.get("parentCommit")
            if parent and parent != repo["branches"][revision]:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            sha = self._commit(repo_id, revision, header.get("summary", ""), added, deleted)
        return {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo_id}/commit/{sha}"}

    def api_tree(
        self, user: str | None, repo_id: str, revision: str, path: str, recursive: bool
    ) -> list[dict[str, Any]]:
        with self._lock:
            repo = self._readable_repo(repo_id, user)
            files = repo["commits"][self._resolve(repo_id, revision)]["files"]
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for name, entry in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            parts = rest.split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:i])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())})
            if recursive or len(parts) == 1:
                entries[name] = {"type": "file", "path": name, "oid": entry["oid"], "size": entry["size"]}
        return list(entries.values())

    def api_paths_info(self, user: str | None, repo_id: str, revision: str, paths: list[str]) -> list[dict]:
        with self._lock:
            repo = self._readable_repo(repo_id, user)
            files = repo["commits"][self._resolve(repo_id, revision)]["files"]
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append({"type": "file", "path": path, "oid": files[path]["oid"], "size": files[path]["size"]})
            elif any(p.startswith(path + "/") for p in files):
                out.append({"type": "directory", "path": path, "oid": git_blob_sha1(path.encode())})
        return out

    def resolve_file(self, user: str | None, repo_id: str, revision: str, path: str) -> tuple[str, str, bytes]:
        """``(commit sha, blob oid, content)`` of a file, or the Hub's 404."""
        with self._lock:
            repo = self._readable_repo(repo_id, user)
            sha = self._resolve(repo_id, revision)
            entry = repo["commits"][sha]["files"].get(path)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound")
            return sha, entry["oid"], self._blob(entry["oid"])


_API_MODEL = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>revision|preupload|commit|tree|paths-info)/(?P<rest>.+))?$"
)
_RESOLVE = re.compile(r"^/(?:models/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the request log is kept in hub.requests instead of stderr noise

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
            self.send_response(status)
            headers = {"Content-Type": "application/json", **(headers or {})}
            headers.setdefault("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)
            hub.requests.append((self.command, self.path, status))

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data).encode())

        def _handle(self, head: bool = False) -> None:
            body = self._body() if self.command == "POST" else b""
            url = urlsplit(self.path)
            path = unquote(url.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                user = hub.user_for(self.headers.get("Authorization"))
                self._route(user, path, query, body, head)
            except HubError as err:
                headers = {"X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._send(err.status, json.dumps(err.body).encode(), headers, head)

        def _route(self, user: str | None, path: str, query: dict[str, str], body: bytes, head: bool) -> None:
            method = self.command
            if path == "/api/whoami-v2" and method == "GET":
                return self._json(200, hub.api_whoami(user))
            if path == "/api/repos/create" and method == "POST":
                return self._json(200, hub.api_create_repo(user, json.loads(body)))
            if path == "/api/validate-yaml" and method == "POST":
                return self._validate_yaml(json.loads(body))
            match = _API_MODEL.match(path)
            if match:
                repo_id, op, rest = match["repo"], match["op"], match["rest"] or ""
                if op is None and method == "GET":
                    return self._json(200, hub.api_model_info(user, repo_id, "main"))
                if op == "revision" and method == "GET":
                    return self._json(200, hub.api_model_info(user, repo_id, rest))
                if op == "preupload" and method == "POST":
                    return self._json(200, hub.api_preupload(user, repo_id, rest, json.loads(body)))
                if op == "commit" and method == "POST":
                    return self._json(200, hub.api_commit(user, repo_id, rest, body))
                if op == "tree" and method == "GET":
                    revision, _, sub = rest.partition("/")
                    recursive = query.get("recursive", "").lower() in ("1", "true")
                    return self._json(200, hub.api_tree(user, repo_id, revision, sub, recursive))
                if op == "paths-info" and method == "POST":
                    form = parse_qs(body.decode())
                    paths = form.get("paths", [])
                    if not paths and body.startswith(b"{"):
                        paths = json.loads(body).get("paths", [])
                    return self._json(200, hub.api_paths_info(user, repo_id, rest, paths))
            match = _RESOLVE.match(path)
            if match and method in ("GET", "HEAD"):
                return self._resolve(user, match["repo"], match["rev"], match["path"], head)
            raise HubError(404, f"Not implemented by the test Hub: {method} {path}")

        def _validate_yaml(self, payload: dict[str, Any]) -> None:
            import yaml

            content = payload.get("content", "")
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            if match:
                try:
                    meta = yaml.safe_load(match[1])
                except yaml.YAMLError as err:
                    return self._json(400, {"errors": [{"message": f"Invalid YAML: {err}"}]})
                if not isinstance(meta, dict):
                    return self._json(400, {"errors": [{"message": "Metadata must be a YAML mapping"}]})
            return self._json(200, {"errors": [], "warnings": []})

        def _resolve(self, user: str | None, repo_id: str, revision: str, path: str, head: bool) -> None:
            sha, oid, data = hub.resolve_file(user, repo_id, revision, path)
            headers = {
                "Content-Type": "application/octet-stream",
                "X-Repo-Commit": sha,
                "ETag": f'"{oid}"',
                "Accept-Ranges": "bytes",
            }
            status = 200
            match = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
            if match and not head:
                start = int(match[1])
                end = int(match[2]) if match[2] else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start : end + 1], 206
            headers["Content-Length"] = str(len(data))
            self._send(status, data, headers, head)

        def do_GET(self) -> None:
            self._handle()

        def do_HEAD(self) -> None:
            self._handle(head=True)

        def do_POST(self) -> None:
            self._handle()

    return Handler
