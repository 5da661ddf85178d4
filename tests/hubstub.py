"""A local stand-in for the Hugging Face Hub, to drive the real ``huggingface_hub`` client in tests.

Only the standard library: a ``ThreadingHTTPServer`` on 127.0.0.1 that speaks enough of the Hub's
HTTP API for ``HfApi`` (checked against huggingface_hub 2.4.0, with Xet disabled, i.e. the plain
LFS transfer path) to create repos and branches, commit regular and LFS files (preupload, LFS
batch, LFS PUT + verify, ndjson commit), and read the result back (repo info, tree, refs,
paths-info, resolve).

Use the ``hub`` fixture (it starts a stub and points ``huggingface_hub`` at it, with a fake token
and a temporary ``HF_HOME``), or ``start_hub()`` / ``HubStub().start()`` by hand::

    def test_push(hub):
        HfApi().create_repo("me/model", private=True)
        ...
        assert hub.files("me/model")["config.json"] == b"{}"
        assert not hub.unexpected  # no endpoint the stub does not know was called

Endpoints (``{type}s`` is ``models``, ``datasets`` or ``spaces``; LFS/resolve URLs carry the
``datasets/`` / ``spaces/`` prefix for those types, none for models):

    POST   /api/repos/create                           create_repo (409 + ``url`` if it exists)
    DELETE /api/repos/delete                           delete_repo
    POST   /api/{type}s/{ns}/{name}/branch/{branch}    create_branch (409 if it exists)
    DELETE /api/{type}s/{ns}/{name}/branch/{branch}    delete_branch
    POST   /api/validate-yaml                          README.md metadata check (always valid)
    POST   /api/{type}s/{ns}/{name}/preupload/{rev}    upload mode (lfs/regular) + remote oid
    POST   /{ns}/{name}.git/info/lfs/objects/batch     LFS batch: no ``actions`` for held objects
    PUT    /__lfs/upload/{oid}                         LFS object upload (sha256 checked, no auth)
    POST   /{ns}/{name}.git/info/lfs/objects/verify    LFS verify
    POST   /api/{type}s/{ns}/{name}/commit/{rev}       ndjson commit, atomic
    GET    /api/{type}s/{ns}/{name}[/revision/{rev}]   repo_info / model_info
    GET    /api/{type}s/{ns}/{name}/tree/{rev}[/path]  list_repo_tree / list_repo_files
    POST   /api/{type}s/{ns}/{name}/paths-info/{rev}   get_paths_info
    GET    /api/{type}s/{ns}/{name}/refs               list_repo_refs
    GET    /api/whoami-v2                              whoami
    GET    /api/agent-harnesses                        user-agent helper of huggingface_hub 2.x
    GET    /{ns}/{name}/resolve/{rev}/{path} (+HEAD)   hf_hub_download

Anything else is answered 404 with a JSON error and listed in ``HubStub.unexpected``. A bug in
the stub itself is answered 500 and listed in ``HubStub.errors``.

Not supported (answered 501, listed in ``unexpected``): ``create_pr``, the LFS multipart transfer
(the stub never hands out a ``chunk_size``, so the client always does one PUT per object), Xet.

Behaviour worth knowing when writing tests:

* huggingface_hub retries by itself (``http_backoff``: 5 retries, 6 tries in all, sleeping
  1, 2, 4, 8, 8 s) on 408/429/500/502/503/504 and on dropped connections for the preupload, LFS
  batch, LFS PUT, LFS verify and tree calls. It does NOT retry the commit POST, create_repo,
  create_branch or repo_info. So ``fail(..., times=1)`` on a PUT is invisible to the caller;
  use ``times=None`` (or ``times >= 6``) or a non-retried status (e.g. 403) for a hard failure.
  The ``hub`` fixture makes those backoff sleeps instant (recorded in ``hub.backoff_sleeps``).
* ``create_commit`` with several LFS files uploads them from a thread pool (``num_threads=5``):
  the order of the PUTs is not deterministic unless ``num_threads=1``.
* The first commit of a repo (made by ``create_repo``) holds ``.gitattributes`` as on the real
  Hub; ``files()`` leaves it out unless ``gitattributes=True``.
* preupload says "lfs" for a path matching an LFS pattern of the branch's ``.gitattributes``
  (``*.safetensors``, ``*.bin``, ... by default), for files of ``lfs_threshold`` (10 MiB) or
  more, and for files whose first 512 bytes hold a NUL byte; "regular" otherwise. It reports the
  oid of a path already on the branch, so the client drops unchanged files from a commit (and
  makes no commit at all when nothing changed: it then calls ``GET .../revision/{rev}``).
* ``HfApi.upload_large_folder`` is gone in huggingface_hub 2.x (``upload_folder`` took over; with
  Xet disabled it is one ``create_commit``). In 1.x it works against this stub, but it keeps its
  state in ``<folder>/.cache/huggingface/`` (``upload/<path>.metadata`` and ``.lock`` per file,
  plus a ``.gitignore``), polls every second (so it takes >= 1 s) and puts a failed item back in
  its queue forever: with ``fail(..., times=None)`` it never returns. Use a finite ``times``.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

import pytest

FAKE_TOKEN = "hf_orthoeditTESTtoken000000000000000"
DEFAULT_USER = "orthoedit-test"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # files this big always go through LFS (as on the Hub)

# The patterns of the Hub's default .gitattributes (files matching them go through LFS).
_PATTERNS = """
*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy
*.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/*
*.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents* *.gguf
"""
DEFAULT_LFS_PATTERNS = tuple(_PATTERNS.split())
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in DEFAULT_LFS_PATTERNS
).encode()

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_ACTIONS = {"preupload", "commit", "branch", "tree", "revision", "paths-info", "refs"}


# --------------------------------------------------------------------------------------------
# Predicates for HubStub.fail(): predicate(method, path), path without the query string.


def is_lfs_put(method: str, path: str) -> bool:
    """The PUT that uploads one LFS object."""
    return method == "PUT" and path.startswith("/__lfs/upload/")


def is_lfs_batch(method: str, path: str) -> bool:
    return method == "POST" and path.endswith(".git/info/lfs/objects/batch")


def is_preupload(method: str, path: str) -> bool:
    return method == "POST" and path.startswith("/api/") and "/preupload/" in path


def is_commit(method: str, path: str) -> bool:
    return method == "POST" and path.startswith("/api/") and "/commit/" in path


# --------------------------------------------------------------------------------------------
# State


@dataclass
class Request:
    """One request the stub received (appended before it is answered)."""

    method: str
    path: str  # as sent, percent-encoding kept, without the query string
    query: str
    headers: dict[str, str]
    body_size: int = 0
    status: int | None = None  # None: not answered yet, or the connection was dropped
    injected: bool = False  # answered by a fail() rule
    unexpected: bool = False  # unknown or unsupported endpoint

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class Commit:
    oid: str
    branch: str
    parent: str | None
    summary: str
    description: str
    added: dict[str, str]  # path -> "lfs" | "regular"
    deleted: list[str]
    tree: dict[str, bytes]  # snapshot after the commit
    lfs_paths: frozenset[str]


@dataclass
class Repo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)  # branch -> path -> bytes
    heads: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    lfs_paths: dict[str, set[str]] = field(default_factory=dict)  # branch -> paths stored in LFS
    commits: list[Commit] = field(default_factory=list)
    created_at: str = ""

    def resolve(self, revision: str) -> tuple[dict[str, bytes], set[str], str] | None:
        """(tree, lfs paths, commit oid) of a branch or commit, or None."""
        if revision in self.branches:
            return self.branches[revision], self.lfs_paths[revision], self.heads[revision]
        if len(revision) >= 7:
            for commit in reversed(self.commits):
                if commit.oid.startswith(revision):
                    return commit.tree, set(commit.lfs_paths), commit.oid
        return None


@dataclass
class Failure:
    predicate: Callable[[str, str], bool]
    times: int | None
    status: int | None
    skip: int
    hits: int = 0  # requests answered with the failure


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def git_blob_oid(data: bytes) -> str:
    """git's sha1 of a blob (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


# --------------------------------------------------------------------------------------------
# The stub


class HubStub:
    """A fake Hub on ``127.0.0.1``. All public state is guarded by ``lock``.

    Args:
        token: if set, an ``Authorization`` header must carry exactly ``Bearer <token>``
            (else 401); if None, any bearer token is accepted. Writes always need one.
        username: the namespace of repos created without an organization, and whoami's name.
        lfs_threshold: files at least this big are uploaded through LFS whatever their name.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        username: str = DEFAULT_USER,
        lfs_threshold: int = LFS_SIZE_THRESHOLD,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.token = token
        self.username = username
        self.lfs_threshold = lfs_threshold
        self.lock = threading.RLock()
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.errors: list[str] = []  # tracebacks of bugs in the stub (answered 500)
        self.backoff_sleeps: list[float] = []  # filled by the hub fixture's no-sleep patch
        self._failures: list[Failure] = []
        self._commit_counter = 0
        self._host, self._port = host, port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("HubStub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStub:
        handler = type("_BoundHandler", (_Handler,), {"stub": self})
        server = ThreadingHTTPServer((self._host, self._port), handler)
        server.daemon_threads = True
        server.block_on_close = False  # idle keep-alive connections must not block stop()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="hubstub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> HubStub:
        return self if self._server is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- failure injection -------------------------------------------------------------------

    def fail(
        self,
        predicate: Callable[[str, str], bool],
        times: int | None = None,
        status: int | None = 500,
        *,
        skip: int = 0,
    ) -> Failure:
        """Answer matching requests with ``status`` (or drop the connection if None).

        ``predicate(method, path)`` sees the path as sent (percent-encoded, no query string);
        see ``is_lfs_put`` and friends. The first ``skip`` matching requests go through
        normally, the next ``times`` (None: all) fail. The request body is read in full before
        failing. Returns the rule; its ``hits`` counts the requests it failed.
        """
        rule = Failure(predicate, times, status, skip)
        with self.lock:
            self._failures.append(rule)
        return rule

    def clear_failures(self) -> None:
        with self.lock:
            self._failures.clear()

    def _injected_failure(self, method: str, path: str) -> Failure | None:
        with self.lock:
            for rule in self._failures:
                if not rule.predicate(method, path):
                    continue
                if rule.skip > 0:
                    rule.skip -= 1
                    continue
                if rule.times is not None and rule.hits >= rule.times:
                    continue
                rule.hits += 1
                return rule
        return None

    # -- reading state -----------------------------------------------------------------------

    def files(
        self, repo_id: str, revision: str = "main", *, gitattributes: bool = False
    ) -> dict[str, bytes]:
        """The committed tree of a branch (or commit), LFS files resolved to their content."""
        with self.lock:
            resolved = self.repos[repo_id].resolve(revision)
            if resolved is None:
                raise KeyError(f"{repo_id}: no revision {revision!r}")
            tree = dict(resolved[0])
        if not gitattributes and tree.get(".gitattributes") == DEFAULT_GITATTRIBUTES:
            del tree[".gitattributes"]
        return tree

    def calls(
        self, method: str | None = None, predicate: Callable[[str, str], bool] | None = None
    ) -> list[Request]:
        """Recorded requests, optionally filtered by method and ``predicate(method, path)``."""
        with self.lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method)
                and (predicate is None or predicate(r.method, r.path))
            ]

    @property
    def unexpected(self) -> list[Request]:
        """Requests to endpoints the stub does not implement (answered 404 or 501)."""
        with self.lock:
            return [r for r in self.requests if r.unexpected]

    @property
    def authorizations(self) -> list[str | None]:
        """The ``Authorization`` header of every request (None where absent), in order."""
        with self.lock:
            return [r.authorization for r in self.requests]

    def lfs_puts(self, oid: str | None = None) -> list[Request]:
        """LFS upload PUTs received (including failed ones), optionally for one object."""
        suffix = f"/{oid}" if oid else ""
        return [r for r in self.calls("PUT", is_lfs_put) if r.path.endswith(suffix)]

    # -- internals: repos --------------------------------------------------------------------

    def _lfs_patterns(self, tree: dict[str, bytes]) -> list[str]:
        text = tree.get(".gitattributes", DEFAULT_GITATTRIBUTES).decode(errors="replace")
        return [
            line.split()[0]
            for line in text.splitlines()
            if line.strip() and not line.startswith("#") and "filter=lfs" in line.split()[1:]
        ]

    def _is_lfs(self, path: str, size: int, sample: bytes, patterns: list[str]) -> bool:
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns):
            return True
        return size >= self.lfs_threshold or b"\0" in sample

    def _new_commit(
        self,
        repo: Repo,
        branch: str,
        tree: dict[str, bytes],
        lfs_paths: set[str],
        *,
        summary: str,
        description: str = "",
        added: dict[str, str] | None = None,
        deleted: list[str] | None = None,
    ) -> Commit:
        self._commit_counter += 1
        parent = repo.heads.get(branch)
        digest = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{self._commit_counter}\n".encode())
        for path in sorted(tree):
            digest.update(path.encode() + b"\0" + hashlib.sha256(tree[path]).digest())
        commit = Commit(
            oid=digest.hexdigest(),
            branch=branch,
            parent=parent,
            summary=summary,
            description=description,
            added=added or {},
            deleted=deleted or [],
            tree=dict(tree),
            lfs_paths=frozenset(lfs_paths),
        )
        repo.branches[branch] = dict(tree)
        repo.lfs_paths[branch] = set(lfs_paths)
        repo.heads[branch] = commit.oid
        repo.commits.append(commit)
        return commit

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _entry(self, path: str, tree: dict[str, bytes], lfs_paths: set[str]) -> dict[str, Any]:
        data = tree[path]
        if path in lfs_paths:
            sha = hashlib.sha256(data).hexdigest()
            pointer = lfs_pointer(sha, len(data))
            return {
                "type": "file",
                "oid": git_blob_oid(pointer),
                "size": len(data),
                "path": path,
                "lfs": {"oid": sha, "size": len(data), "pointerSize": len(pointer)},
            }
        return {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}

    @staticmethod
    def _folder(path: str) -> dict[str, Any]:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path}


# --------------------------------------------------------------------------------------------
# HTTP handler


class _Handler(BaseHTTPRequestHandler):
    stub: HubStub  # set on the per-stub subclass
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    # -- plumbing ----------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes = b"", content_type: str = "application/json", **headers: str
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self._record.status = status

    def _json(self, status: int, payload: Any, **headers: str) -> None:
        self._send(status, json.dumps(payload).encode(), **headers)

    def _error(self, err: _HttpError) -> None:
        headers = {"X_Error_Message": err.message}
        if err.code:
            headers["X_Error_Code"] = err.code
        self._json(err.status, {"error": err.message, **err.extra}, **headers)

    def _dispatch(self) -> None:
        stub = self.stub
        raw_path, _, query = self.path.partition("?")
        record = Request(
            method=self.command,
            path=raw_path,
            query=query,
            headers={k.lower(): v for k, v in self.headers.items()},
        )
        self._record = record
        with stub.lock:
            stub.requests.append(record)
        body = self._read_body()
        record.body_size = len(body)

        rule = stub._injected_failure(self.command, raw_path)
        if rule is not None:
            record.injected = True
            if rule.status is None:
                self.close_connection = True  # no response at all: the client sees a dropped link
                return
            self._json(rule.status, {"error": f"stub: injected failure ({rule.status})"})
            return

        try:
            self._route(raw_path, parse_qs(query), body)
        except _HttpError as err:
            if err.status in (404, 501) and err.code is None:
                record.unexpected = True
            self._error(err)
        except Exception:
            with stub.lock:
                stub.errors.append(traceback.format_exc())
            self._json(500, {"error": "stub crashed, see HubStub.errors"})

    def _check_auth(self, *, required: bool) -> bool:
        """True when a (valid) token came along; 401 if it is wrong, or missing but required."""
        header = self.headers.get("Authorization")
        if header is None:
            if required:
                raise _HttpError(401, "Invalid username or password.")
            return False
        token = self.stub.token
        if not header.startswith("Bearer ") or (token is not None and header != f"Bearer {token}"):
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return True

    def _repo(self, repo_type: str, repo_id: str, *, authed: bool) -> Repo:
        repo = self.stub.repos.get(repo_id)
        if repo is None or repo.repo_type != repo_type or (repo.private and not authed):
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _revision(repo: Repo, revision: str) -> tuple[dict[str, bytes], set[str], str]:
        resolved = repo.resolve(revision)
        if resolved is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return resolved

    # -- routing -----------------------------------------------------------------------------

    def _route(self, raw_path: str, params: dict[str, list[str]], body: bytes) -> None:
        method = self.command
        raw_segs = raw_path.strip("/").split("/")
        segs = [unquote(s) for s in raw_segs]

        if method == "PUT" and segs[:2] == ["__lfs", "upload"] and len(segs) == 3:
            return self._lfs_put(segs[2], body)

        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["agent-harnesses"] and method == "GET":
                return self._json(200, {"standardEnvVars": [], "harnesses": {}})
            if rest == ["validate-yaml"] and method == "POST":
                return self._json(200, {"errors": [], "warnings": []})
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(body)
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(body)
            if len(rest) >= 3 and rest[0] in _REPO_TYPES:
                return self._repo_api(_REPO_TYPES[rest[0]], rest[1:], params, body)

        # /[datasets/|spaces/]{ns}/{name}.git/info/lfs/objects/{batch|verify}
        for i, seg in enumerate(segs):
            if seg.endswith(".git") and segs[i + 1 : i + 4] == ["info", "lfs", "objects"]:
                repo_type, repo_id = self._split_repo([*segs[:i], seg.removesuffix(".git")])
                action = segs[i + 4 : i + 5]
                if method == "POST" and action == ["batch"]:
                    return self._lfs_batch(repo_type, repo_id, body)
                if method == "POST" and action == ["verify"]:
                    return self._lfs_verify(repo_type, repo_id, body)
                break

        # /[datasets/|spaces/]{ns}/{name}/resolve/{rev}/{path}
        if method in ("GET", "HEAD") and "resolve" in segs:
            i = segs.index("resolve")
            if i >= 2 and len(segs) >= i + 3:
                repo_type, repo_id = self._split_repo(segs[:i])
                return self._resolve(repo_type, repo_id, segs[i + 1], "/".join(segs[i + 2 :]))

        raise _HttpError(404, f"stub: unknown endpoint {method} {raw_path}")

    @staticmethod
    def _split_repo(segs: list[str]) -> tuple[str, str]:
        if segs and segs[0] in ("datasets", "spaces"):
            return _REPO_TYPES[segs[0]], "/".join(segs[1:])
        return "model", "/".join(segs)

    def _repo_api(
        self, repo_type: str, segs: list[str], params: dict[str, list[str]], body: bytes
    ) -> None:
        method = self.command
        repo_id, rest = "/".join(segs[:2]), segs[2:]
        action = rest[0] if rest else None
        if action is not None and action not in _API_ACTIONS:
            raise _HttpError(404, f"stub: unknown endpoint {method} {self.path}")
        if params.get("create_pr", ["0"])[0] not in ("0", "false", "False"):
            raise _HttpError(501, "stub: create_pr is not supported")
        write = method != "GET" and action not in ("paths-info",)
        authed = self._check_auth(required=write)
        with self.stub.lock:
            repo = self._repo(repo_type, repo_id, authed=authed)
            if method == "GET" and action is None:
                return self._repo_info(repo, "main", params)
            if method == "GET" and action == "revision" and len(rest) == 2:
                return self._repo_info(repo, rest[1], params)
            if method == "GET" and action == "refs":
                return self._refs(repo)
            if method == "GET" and action == "tree" and len(rest) >= 2:
                return self._tree(repo, rest[1], "/".join(rest[2:]), params)
            if method == "POST" and action == "paths-info" and len(rest) == 2:
                return self._paths_info(repo, rest[1], body)
            if method == "POST" and action == "branch" and len(rest) == 2:
                return self._create_branch(repo, rest[1], body)
            if method == "DELETE" and action == "branch" and len(rest) == 2:
                return self._delete_branch(repo, rest[1])
            if method == "POST" and action == "preupload" and len(rest) == 2:
                return self._preupload(repo, rest[1], body)
            if method == "POST" and action == "commit" and len(rest) == 2:
                return self._commit(repo, rest[1], body)
        raise _HttpError(404, f"stub: unknown endpoint {method} {self.path}")

    # -- endpoints ---------------------------------------------------------------------------

    def _whoami(self) -> None:
        self._check_auth(required=True)
        self._json(
            200,
            {
                "type": "user",
                "name": self.stub.username,
                "fullname": self.stub.username,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "stub", "role": "write"},
                },
            },
        )

    def _create_repo(self, body: bytes) -> None:
        self._check_auth(required=True)
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HttpError(400, f"stub: unsupported repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or self.stub.username}/{payload['name']}"
        stub = self.stub
        with stub.lock:
            existing = stub.repos.get(repo_id)
            if existing is not None:
                url = stub._repo_url(existing)
                message = f"You already created this {existing.repo_type} repo"
                return self._json(409, {"error": message, "url": url}, X_Error_Message=message)
            repo = Repo(
                repo_id=repo_id,
                repo_type=repo_type,
                private=payload.get("visibility") == "private" or payload.get("private") is True,
                created_at=_now(),
            )
            stub.repos[repo_id] = repo
            stub._new_commit(
                repo,
                "main",
                {".gitattributes": DEFAULT_GITATTRIBUTES},
                set(),
                summary="initial commit",
                added={".gitattributes": "regular"},
            )
            self._json(200, {"url": stub._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, body: bytes) -> None:
        self._check_auth(required=True)
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.stub.username}/{payload['name']}"
        with self.stub.lock:
            self._repo(payload.get("type") or "model", repo_id, authed=True)
            del self.stub.repos[repo_id]
        self._json(200, {})

    def _repo_info(self, repo: Repo, revision: str, params: dict[str, list[str]]) -> None:
        tree, lfs_paths, oid = self._revision(repo, revision)
        blobs = params.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path in sorted(tree):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry = self.stub._entry(path, tree, lfs_paths)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    lfs = entry["lfs"]
                    sibling["lfs"] = {
                        "sha256": lfs["oid"],
                        "size": lfs["size"],
                        "pointerSize": lfs["pointerSize"],
                    }
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "createdAt": repo.created_at,
            "lastModified": _now(),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        self._json(200, info)

    def _refs(self, repo: Repo) -> None:
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": repo.heads[name]}
            for name in sorted(repo.branches)
        ]
        self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _tree(self, repo: Repo, revision: str, folder: str, params: dict[str, list[str]]) -> None:
        tree, lfs_paths, _ = self._revision(repo, revision)
        recursive = params.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in tree):
            raise _HttpError(404, f"Entry not found: {folder}", "EntryNotFound")
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path in sorted(tree):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(self.stub._entry(path, tree, lfs_paths))
        entries += [self.stub._folder(f) for f in sorted(folders)]
        self._json(200, entries)

    def _paths_info(self, repo: Repo, revision: str, body: bytes) -> None:
        tree, lfs_paths, _ = self._revision(repo, revision)
        form = parse_qs(body.decode())
        out: list[dict[str, Any]] = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in tree:
                out.append(self.stub._entry(path, tree, lfs_paths))
            elif any(p.startswith(path + "/") for p in tree):
                out.append(self.stub._folder(path))
        self._json(200, out)

    def _create_branch(self, repo: Repo, branch: str, body: bytes) -> None:
        if branch in repo.branches:
            message = "Reference already exists"
            return self._json(409, {"error": message}, X_Error_Message=message)
        if branch.startswith("refs/") or not branch:
            raise _HttpError(400, f"Invalid reference for a branch: {branch}")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        tree, lfs_paths, oid = self._revision(repo, start)
        repo.branches[branch] = dict(tree)
        repo.lfs_paths[branch] = set(lfs_paths)
        repo.heads[branch] = oid
        self._json(200, {})

    def _delete_branch(self, repo: Repo, branch: str) -> None:
        if branch not in repo.branches or branch == "main":
            raise _HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        for mapping in (repo.branches, repo.lfs_paths, repo.heads):
            del mapping[branch]
        self._json(200, {})

    def _preupload(self, repo: Repo, revision: str, body: bytes) -> None:
        if revision not in repo.branches:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        tree, lfs_paths, head = self._revision(repo, revision)
        patterns = self.stub._lfs_patterns(tree)
        files = []
        for item in json.loads(body)["files"]:
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = self.stub._is_lfs(path, size, sample, patterns)
            info: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
            }
            if path in tree:  # what the client compares with its local oid to skip no-ops
                data = tree[path]
                in_lfs = path in lfs_paths
                info["oid"] = hashlib.sha256(data).hexdigest() if in_lfs else git_blob_oid(data)
            files.append(info)
        self._json(200, {"files": files, "commitOid": head})

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        authed = self._check_auth(required=True)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise _HttpError(501, "stub: only LFS uploads are supported")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise _HttpError(501, f"stub: no common LFS transfer in {payload.get('transfers')}")
        stub = self.stub
        with stub.lock:
            repo = self._repo(repo_type, repo_id, authed=authed)
            ref = (payload.get("ref") or {}).get("name")
            if ref is not None:
                self._revision(repo, ref)
            verify_href = f"{stub._repo_url(repo)}.git/info/lfs/objects/verify"
            objects = []
            for obj in payload["objects"]:
                oid, size = obj["oid"], int(obj["size"])
                item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if oid not in stub.lfs:  # held objects get no "actions": nothing to upload
                    item["actions"] = {
                        "upload": {"href": f"{stub.endpoint}/__lfs/upload/{oid}", "header": {}},
                        "verify": {
                            "href": verify_href,
                            "header": {"Authorization": self.headers["Authorization"]},
                        },
                    }
                objects.append(item)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, oid: str, body: bytes) -> None:
        actual = hashlib.sha256(body).hexdigest()
        if actual != oid:
            raise _HttpError(400, f"sha256 mismatch: expected {oid}, got {actual}", "BadDigest")
        with self.stub.lock:
            self.stub.lfs[oid] = body
        self._send(200, etag=f'"{hashlib.md5(body).hexdigest()}"')

    def _lfs_verify(self, repo_type: str, repo_id: str, body: bytes) -> None:
        authed = self._check_auth(required=True)
        payload = json.loads(body)
        with self.stub.lock:
            self._repo(repo_type, repo_id, authed=authed)
            data = self.stub.lfs.get(payload["oid"])
        if data is None or len(data) != int(payload["size"]):
            raise _HttpError(404, f"LFS object {payload['oid']} not found", "EntryNotFound")
        self._json(200, {"success": True})

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        stub = self.stub
        if revision not in repo.branches:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        tree = dict(repo.branches[revision])
        lfs_paths = set(repo.lfs_paths[revision])
        header: dict[str, Any] = {}
        added: dict[str, str] = {}
        deleted: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HttpError(400, f"stub: unsupported encoding {value.get('encoding')}")
                tree[value["path"]] = base64.b64decode(value["content"])
                lfs_paths.discard(value["path"])
                added[value["path"]] = "regular"
            elif key == "lfsFile":
                data = stub.lfs.get(value["oid"])
                if data is None:
                    raise _HttpError(
                        400,
                        f"Your push was rejected because an LFS pointer pointed to a file that"
                        f" does not exist ({value['path']}: {value['oid']})",
                    )
                if "size" in value and int(value["size"]) != len(data):
                    raise _HttpError(400, f"LFS object size mismatch for {value['path']}")
                tree[value["path"]] = data
                lfs_paths.add(value["path"])
                added[value["path"]] = "lfs"
            elif key == "deletedFile":
                if value["path"] not in tree:
                    raise _HttpError(
                        404,
                        "A file with this name doesn't exist: " + value["path"],
                        "EntryNotFound",
                    )
                del tree[value["path"]]
                lfs_paths.discard(value["path"])
                deleted.append(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in tree if p.startswith(prefix)]:
                    del tree[path]
                    lfs_paths.discard(path)
                    deleted.append(path)
            else:
                raise _HttpError(501, f"stub: unsupported commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent is not None and parent != repo.heads[revision]:
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
        commit = stub._new_commit(
            repo,
            revision,
            tree,
            lfs_paths,
            summary=header.get("summary", ""),
            description=header.get("description", ""),
            added=added,
            deleted=deleted,
        )
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{stub._repo_url(repo)}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        authed = self._check_auth(required=False)
        with self.stub.lock:
            repo = self._repo(repo_type, repo_id, authed=authed)
            tree, lfs_paths, oid = self._revision(repo, revision)
            if path not in tree:
                raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound")
            entry = self.stub._entry(path, tree, lfs_paths)
            data = tree[path]
        headers = {"X_Repo_Commit": oid, "ETag": f'"{entry["oid"]}"', "Accept_Ranges": "none"}
        if "lfs" in entry:
            headers.update(X_Linked_Etag=f'"{entry["lfs"]["oid"]}"', X_Linked_Size=str(len(data)))
        self._send(200, data, content_type="application/octet-stream", **headers)


# --------------------------------------------------------------------------------------------
# Starting it, and pointing huggingface_hub at it


@contextlib.contextmanager
def start_hub(**kwargs: Any) -> Iterator[HubStub]:
    """``with start_hub() as hub:`` a started stub (not wired into huggingface_hub)."""
    stub = HubStub(**kwargs).start()
    try:
        yield stub
    finally:
        stub.stop()


class _NoSleepTime:
    """Stands in for the ``time`` module inside huggingface_hub.utils._http: backoff is instant."""

    def __init__(self, real: Any, record: list[float]):
        self._real, self._record = real, record

    def sleep(self, seconds: float) -> None:
        self._record.append(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def point_client_at(
    stub: HubStub,
    monkeypatch: pytest.MonkeyPatch,
    hf_home: str | os.PathLike[str],
    *,
    token: str = FAKE_TOKEN,
    instant_backoff: bool = True,
) -> None:
    """Point an imported huggingface_hub at ``stub`` for the duration of a test.

    ``HfApi()`` takes its endpoint from ``constants.ENDPOINT`` at construction time, and several
    values are derived from the environment at import time, so the env vars alone are not enough:
    the derived constants are patched too (only those this huggingface_hub version has).
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api
    import huggingface_hub.utils._http as hf_http

    home = os.fspath(hf_home)
    endpoint = stub.endpoint
    for var in ("HF_ENDPOINT", "HF_TOKEN", "HF_HOME", "HF_HUB_DISABLE_XET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for var in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_TOKEN_PATH", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_CO_STAGING", raising=False)

    values: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HOME": home,
        "HF_HUB_CACHE": os.path.join(home, "hub"),
        "HUGGINGFACE_HUB_CACHE": os.path.join(home, "hub"),
        "HF_ASSETS_CACHE": os.path.join(home, "assets"),
        "HUGGINGFACE_ASSETS_CACHE": os.path.join(home, "assets"),
        "HF_XET_CACHE": os.path.join(home, "xet"),
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(home, ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": os.path.join(home, ".check_for_skill_update_done"),
    }
    for name, value in values.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    if hasattr(constants, "HF_URL_HOSTS"):
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    origins = getattr(hf_http, "_HUB_ORIGINS", None)
    if isinstance(origins, frozenset):
        port = int(stub.endpoint.rsplit(":", 1)[1])
        monkeypatch.setattr(hf_http, "_HUB_ORIGINS", origins | {("http", "127.0.0.1", port)})

    # The module-level functions (huggingface_hub.create_repo, ...) are bound to an HfApi built at
    # import time, with the endpoint of that time.
    module_api = getattr(hf_api, "api", None)
    if module_api is not None:
        monkeypatch.setattr(module_api, "endpoint", endpoint)

    # huggingface_hub 2.x builds its user agent from a registry fetched once from the endpoint
    # (and cached under HF_HOME): pin it empty, so no request goes anywhere for it.
    with contextlib.suppress(ImportError):
        import huggingface_hub.utils._detect_agent as detect_agent

        if hasattr(detect_agent, "_registry"):
            monkeypatch.setattr(detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})

    if instant_backoff and hasattr(hf_http, "time"):
        monkeypatch.setattr(hf_http, "time", _NoSleepTime(hf_http.time, stub.backoff_sleeps))

    # Pooled connections from an earlier stub (or the real Hub) must not be reused.
    hf_http.close_session()


@pytest.fixture
def hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """A started ``HubStub`` that huggingface_hub talks to, with the fake token ``FAKE_TOKEN``.

    ``HF_HOME`` (token file, caches) is a fresh temporary folder, so the real
    ``~/.cache/huggingface`` is never read or written. Backoff sleeps are instant.
    """
    import huggingface_hub.utils._http as hf_http

    stub = HubStub(token=FAKE_TOKEN).start()
    try:
        point_client_at(stub, monkeypatch, tmp_path_factory.mktemp("hf_home"))
        yield stub
    finally:
        hf_http.close_session()
        stub.stop()


__all__ = [
    "DEFAULT_GITATTRIBUTES",
    "FAKE_TOKEN",
    "Commit",
    "Failure",
    "HubStub",
    "Repo",
    "Request",
    "git_blob_oid",
    "hub",
    "is_commit",
    "is_lfs_batch",
    "is_lfs_put",
    "is_preupload",
    "lfs_pointer",
    "point_client_at",
    "start_hub",
]


if __name__ == "__main__":  # a quick manual run: python tests/hubstub.py
    with start_hub() as _stub:
        print(f"hub stub on {_stub.endpoint} (Ctrl-C to stop)")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
