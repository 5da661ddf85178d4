"""``orthoedit push``: publish an edited checkpoint, its card and its reports to the Hub.

The repo gets the folder apply wrote, with three differences: the card (README.md) has its
Evaluation section filled from the reports of a run; those reports (bench and safety
summaries, verify.json) go under ``orthoedit/eval`` and ``orthoedit/``; and a direction
file that an older apply left at the top level moves to ``orthoedit/``, since serving tools
take every top-level ``*.safetensors`` for weights. The answers of eval safety
(``completions.jsonl`` and the samples in its report.md) are never uploaded. The GGUF files of
``orthoedit export gguf`` (``MODEL_DIR/gguf``, or ``--gguf``) go under ``gguf/``, with their
record, and the card lists them with their types.

Everything up to the upload (file selection, the card, the license's naming rule) is decided
without network access, so ``--dry-run`` shows exactly what would be sent. The token comes
from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``) and is only ever
handed to huggingface_hub.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from .config import PushConfig
from .edit.apply import ARTIFACT_DIR
from .edit.card import evaluation_markdown, gguf_markdown, with_evaluation, with_gguf
from .edit.licenses import name_problem
from .errors import BadInputError, RemoteError
from .export.gguf import FOLDER as GGUF_FOLDER
from .export.gguf import RECORD as GGUF_RECORD
from .folders import RunFolder
from .model.checkpoint import INDEX_NAME

#: Above this, ``--method auto`` uploads with upload_large_folder (resumable).
LARGE_BYTES = 10 * 1000**3
#: Files on the branch that a push replaces as a set: stale ones are deleted in the same
#: commit (a checkpoint re-sharded since the last push must not keep its old shards).
OWNED = ("*.safetensors", INDEX_NAME, f"{ARTIFACT_DIR}/*", f"{GGUF_FOLDER}/*")


@dataclass
class Item:
    """One file of the upload: from disk (``local``) or generated (``data``)."""

    path_in_repo: str
    local: Path | None = None
    data: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.local.stat().st_size

    @property
    def origin(self) -> str:
        return str(self.local) if self.local is not None else "(generated)"


@dataclass
class PushPlan:
    repo_id: str
    revision: str
    items: list[Item]
    card: str
    method: str
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(i.size for i in self.items)


@dataclass
class PushResult:
    plan: PushPlan
    url: str | None = None
    commit: str | None = None
    deleted: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {
            "repo_id": self.plan.repo_id,
            "revision": self.plan.revision,
            "method": self.plan.method,
            "commit_url": self.url,
            "commit": self.commit,
            "files": {i.path_in_repo: i.size for i in self.plan.items},
            "deleted": self.deleted,
        }


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise BadInputError(f"{repo_id!r} is not a Hub repo id ({err}).") from None
    if "/" not in repo_id:
        raise BadInputError(f"{repo_id!r}: give the full repo id, OWNER/NAME.")


def _model_files(folder: Path) -> list[Item]:
    """The checkpoint's files as repo paths; refuses a folder apply did not write."""
    if not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder.")
    for needed in ("plan.json", "config.json", "README.md"):
        if not (folder / needed).is_file():
            raise BadInputError(
                f"{folder} has no {needed}: push publishes checkpoints written by orthoedit apply."
            )
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weights = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            raise BadInputError(f"{index} is not a valid safetensors index.") from None
    else:
        weights = {"model.safetensors"}
    items = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        if rel.parts[0] == GGUF_FOLDER and len(rel.parts) > 1:
            continue  # export gguf's folder: its own items (_gguf)
        name = rel.as_posix()
        if name == "README.md":
            continue  # the card is generated
        if "/" not in name and name.startswith("direction."):
            name = f"{ARTIFACT_DIR}/{name}"  # the top-level layout of older versions
        elif "/" not in name and name.endswith(".safetensors") and name not in weights:
            raise BadInputError(
                f"{path} is not one of the checkpoint's weight files (not in its index); "
                "serving tools would load it as weights. Move it out of the folder."
            )
        items.append(Item(name, local=path))
    missing = sorted(weights - {i.path_in_repo for i in items})
    if missing:
        raise BadInputError(f"{folder}: weight file {missing[0]} is missing.")
    return items


def find_reports(path: Path) -> tuple[dict[str, Path], Path]:
    """The published reports of a run folder (or of its eval/ folder), by repo path (the
    run folder's layout under the artifact folder)."""
    path = Path(path)
    if not path.is_dir():
        raise BadInputError(f"--eval {path}: no such folder.")
    given = RunFolder(path)
    run = given if given.eval.is_dir() or given.verify.is_file() else RunFolder(path.parent)
    found = {_in_repo(run, p): p for p in run.reports() if p.is_file()}
    if not found:
        raise BadInputError(
            f"--eval {path}: no eval/bench, eval/safety or verify.json reports there; give "
            "the folder of an orthoedit run (or its eval/ folder)."
        )
    return found, run.path


def _in_repo(run: RunFolder, path: Path) -> str:
    """Where a report of the run folder is published."""
    return f"{ARTIFACT_DIR}/{run.relative(path)}"


def _load(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadInputError(f"{path}: cannot read the report ({err}).") from None


def _evaluated_other_model(bench: dict | None, safety: dict | None, folder: Path):
    """A warning when the reports name a different edited model than the one pushed."""
    named = []
    if bench is not None:
        named.append(bench["settings"].get("edited"))
    if safety is not None:
        named.append(safety["settings"].get("model"))
    others = {n for n in named if n and Path(n).exists() and Path(n).resolve() != folder.resolve()}
    if others:
        return f"the reports evaluated {sorted(others)[0]}, not {folder}"
    return None


def plan_push(cfg: PushConfig) -> PushPlan:
    """Decide every file and the card; no network."""
    _check_repo_id(cfg.repo_id)
    folder = Path(cfg.model_dir).expanduser()
    items = _model_files(folder)
    card = (folder / "README.md").read_text(encoding="utf-8")
    warnings = []
    if cfg.eval is not None:
        reports, found_in = find_reports(Path(cfg.eval).expanduser())
        run = RunFolder(found_in)
        bench = _load(reports.get(_in_repo(run, run.bench.json)))
        safety = _load(reports.get(_in_repo(run, run.safety.json)))
        verify = _load(reports.get(_in_repo(run, run.verify)))
        links = {
            name: _in_repo(run, path)
            for name, path in (
                ("benchmark report", run.bench.md),
                ("safety summary", run.safety.json),
                ("verify report", run.verify),
            )
            if _in_repo(run, path) in reports
        }
        card = with_evaluation(card, evaluation_markdown(bench, safety, verify, links))
        items += [Item(repo, local=local) for repo, local in sorted(reports.items())]
        other = _evaluated_other_model(bench, safety, folder)
        if other:
            warnings.append(other)
    exported, card = _gguf(cfg, folder, card)
    items += exported
    items.append(Item("README.md", data=card.encode("utf-8")))
    items.sort(key=lambda i: i.path_in_repo)
    from huggingface_hub import metadata_load

    meta = _card_metadata(folder / "README.md", metadata_load)
    problem = name_problem(cfg.repo_id, meta)
    if problem:
        if not cfg.ignore_license_name:
            raise BadInputError(
                f"{cfg.repo_id}: {problem}. Rename the repo, or pass --ignore-license-name."
            )
        warnings.append(problem)
    total = sum(i.size for i in items)
    method = cfg.method if cfg.method != "auto" else ("large" if total > LARGE_BYTES else "commit")
    return PushPlan(cfg.repo_id, cfg.revision or "main", items, card, method, warnings)


def _gguf(cfg: PushConfig, folder: Path, card: str) -> tuple[list[Item], str]:
    """The GGUF files of an export (``--gguf``, else ``MODEL_DIR/gguf``) under ``gguf/`` in
    the repo, with their record, and the card listing them."""
    from .export.gguf import read_export

    inside = folder / GGUF_FOLDER
    given = Path(cfg.gguf).expanduser() if cfg.gguf is not None else None
    if given is None and not inside.is_dir():
        return [], card
    if given is not None and inside.is_dir() and given.resolve() != inside.resolve():
        raise BadInputError(
            f"--gguf {given}: {inside} holds GGUF files too; push one export (move the other)."
        )
    if given is not None and not given.is_dir():
        raise BadInputError(f"--gguf {given}: no such folder.")
    export = read_export(given or inside)
    if not export.files:
        raise BadInputError(
            f"{export.folder} holds no .gguf files; run orthoedit export gguf {folder} again."
        )
    items = [Item(f"{GGUF_FOLDER}/{f.name}", local=export.folder / f.name) for f in export.files]
    if (export.folder / GGUF_RECORD).is_file():
        items.append(Item(f"{GGUF_FOLDER}/{GGUF_RECORD}", local=export.folder / GGUF_RECORD))
    rows = [(f"{GGUF_FOLDER}/{f.name}", f.type, f.size) for f in export.files]
    tools = [export.record[k] for k in ("converter", "quantizer") if export.record.get(k)]
    return items, with_gguf(card, gguf_markdown(rows, tools))


def _card_metadata(path: Path, metadata_load) -> dict:
    try:
        return metadata_load(path) or {}
    except ValueError:
        return {}


def _stale(existing: list[str], items: list[Item]) -> list[str]:
    ours = {i.path_in_repo for i in items}
    return sorted(p for p in existing if p not in ours and any(fnmatch(p, pat) for pat in OWNED))


def _remote_error(err: BaseException, repo_id: str, method: str) -> Exception:
    """A one-line message for what the Hub or the network said."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return BadInputError(
            "the Hub refused the token (401): log in with `hf auth login` or set HF_TOKEN."
        )
    if status == 403 or isinstance(err, RepositoryNotFoundError):
        return BadInputError(f"no write access to {repo_id} with this token.")
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, HfHubHTTPError) and status is not None and status < 500:
        return BadInputError(f"the Hub refused the upload to {repo_id}: {first}")
    done = (
        "nothing was committed"
        if method == "commit"
        else "the files committed so far stay on the branch"
    )
    return RemoteError(
        f"upload to {repo_id} failed ({first}); {done}. Run the same command again: files "
        "the Hub already holds are not sent again."
    )


def _stage_folder(plan: PushPlan, folder: Path) -> Path:
    """A folder laid out like the repo, hard-linked to the checkpoint (upload_large_folder
    uploads a folder as it is). Kept on failure: it holds the upload's resume state."""
    stage = folder.parent / f".{folder.name}.push-staging"
    wanted = {Path(i.path_in_repo) for i in plan.items}
    if stage.is_dir():  # left by an earlier try: drop what this plan no longer has
        for path in stage.rglob("*"):
            rel = path.relative_to(stage)
            if path.is_file() and rel.parts[0] != ".cache" and rel not in wanted:
                path.unlink()
    for item in plan.items:
        dest = stage / item.path_in_repo
        dest.parent.mkdir(parents=True, exist_ok=True)
        if item.data is not None:
            if not dest.is_file() or dest.read_bytes() != item.data:
                dest.write_bytes(item.data)
            continue
        if dest.exists() and os.path.samefile(dest, item.local):
            continue
        dest.unlink(missing_ok=True)
        try:
            os.link(item.local, dest)
        except OSError:
            shutil.copy2(item.local, dest)
    return stage


def push(cfg: PushConfig, log: Callable[[str], None] = print) -> PushResult:
    """Publish (or, with ``dry_run``, only plan) the checkpoint. Raises BadInputError for
    what the user can fix, RemoteError when the upload broke off."""
    plan = plan_push(cfg)
    for warning in plan.warnings:
        log(f"warning: {warning}")
    result = PushResult(plan)
    if cfg.dry_run:
        return result
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

    if get_token() is None:
        raise BadInputError("no Hugging Face token: run `hf auth login` or set HF_TOKEN.")
    api = HfApi()
    message = cfg.message or f"orthoedit: upload {Path(cfg.model_dir).name}"
    try:
        url = api.create_repo(cfg.repo_id, repo_type="model", private=cfg.private, exist_ok=True)
        log(f"repo {url}")
        if plan.revision != "main":
            api.create_branch(cfg.repo_id, branch=plan.revision, exist_ok=True)
        existing = api.list_repo_files(cfg.repo_id, revision=plan.revision)
        result.deleted = _stale(existing, plan.items)
        deletes = [CommitOperationDelete(p) for p in result.deleted]
        if plan.method == "large":
            _upload_large(api, cfg, plan, result, deletes, message)
        else:
            ops = [
                CommitOperationAdd(i.path_in_repo, i.data if i.data is not None else str(i.local))
                for i in plan.items
            ]
            info = api.create_commit(
                cfg.repo_id, ops + deletes, commit_message=message, revision=plan.revision
            )
            result.url, result.commit = info.commit_url, info.oid
    except BadInputError:
        raise
    except Exception as err:
        remote = _remote_cause(err)
        if remote is not None:
            raise _remote_error(remote, cfg.repo_id, plan.method) from None
        raise
    return result


def _upload_large(api, cfg: PushConfig, plan, result: PushResult, deletes, message: str) -> None:
    """--method large: the files laid out in a staging folder beside the checkpoint and
    uploaded resumably, in several commits."""
    folder = Path(cfg.model_dir).expanduser()
    try:
        stage = _stage_folder(plan, folder)
    except OSError as err:
        raise BadInputError(
            f"cannot lay out the upload beside {folder} ({err.strerror or err}); "
            "use --method commit."
        ) from None
    if hasattr(api, "upload_large_folder"):  # huggingface_hub < 2
        api.upload_large_folder(
            cfg.repo_id,
            stage,
            repo_type="model",
            revision=plan.revision,
            private=cfg.private,
            print_report=False,
        )
        if deletes:
            api.create_commit(
                cfg.repo_id,
                deletes,
                commit_message="orthoedit: remove stale weight files",
                revision=plan.revision,
            )
        result.url = f"{api.endpoint}/{cfg.repo_id}/tree/{plan.revision}"
    else:  # huggingface_hub >= 2: resumable and in several commits with hf_xet
        info = api.upload_folder(
            repo_id=cfg.repo_id,
            folder_path=stage,
            repo_type="model",
            revision=plan.revision,
            commit_message=message,
            delete_patterns=list(OWNED),
        )
        result.url, result.commit = info.commit_url, info.oid
    shutil.rmtree(stage, ignore_errors=True)


def _remote_cause(err: BaseException | None) -> BaseException | None:
    """The HTTP answer or broken connection behind ``err`` (huggingface_hub wraps some in a
    RuntimeError), from whichever HTTP stack it uses (requests, httpx or httpx2)."""
    from huggingface_hub.errors import HfHubHTTPError

    stacks = {"requests", "urllib3", "httpx", "httpx2", "httpcore", "httpcore2"}
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, (HfHubHTTPError, OSError)) or any(
            k.__module__.split(".")[0] in stacks for k in type(err).__mro__
        ):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None
