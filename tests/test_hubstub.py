"""The Hub stub (tests/hubstub.py) against the real huggingface_hub client, over plain HTTP/LFS."""

from __future__ import annotations

import hashlib
import random
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

import hubstub
from hubstub import FAKE_TOKEN, is_commit, is_lfs_put

hub = hubstub.hub  # the fixture

# huggingface_hub hands the LFS PUT body to httpx as ``data=<file>``; httpx deprecates that.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO = "acme/tiny-edit"


def _blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _inputs() -> dict[str, bytes]:
    return {
        "README.md": b"---\nlicense: apache-2.0\n---\n# tiny edit\n",
        "config.json": b'{"model_type": "llama", "hidden_size": 32}\n',
        "model.safetensors": _blob(1_200_000, seed=1),
    }


def _ops(files: dict[str, bytes]) -> list[CommitOperationAdd]:
    return [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in files.items()]


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_create_repo_twice_and_branch(hub):
    api = HfApi()
    url = api.create_repo(REPO, private=True, exist_ok=True)
    assert url.repo_id == REPO and url.startswith(hub.endpoint)
    again = api.create_repo(REPO, private=False, exist_ok=True)  # 409 from the stub, handled
    assert again.repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert hub.repos[REPO].private is True  # the flag of the first call sticks

    api.create_branch(REPO, branch="orthoedit", exist_ok=True)
    api.create_branch(REPO, branch="orthoedit", exist_ok=True)
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main", "orthoedit"}
    assert api.list_repo_files(REPO, revision="orthoedit") == [".gitattributes"]

    assert hub.authorizations and set(hub.authorizations) == {f"Bearer {FAKE_TOKEN}"}
    assert not hub.unexpected and not hub.errors


def test_wrong_token_is_rejected(hub):
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").create_repo(REPO)
    assert err.value.response.status_code == 401
    assert REPO not in hub.repos


def test_create_commit_regular_and_lfs_files(hub, tmp_path):
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    api.create_branch(REPO, branch="orthoedit")
    inputs = _inputs()

    info = api.create_commit(
        REPO, operations=_ops(inputs), revision="orthoedit", commit_message="orthoedit: apply"
    )

    assert hub.files(REPO, "orthoedit") == inputs
    assert hub.files(REPO, "main") == {}  # other branches untouched
    repo = hub.repos[REPO]
    assert repo.lfs_paths["orthoedit"] == {"model.safetensors"}
    assert repo.commits[-1].summary == "orthoedit: apply" and info.oid == repo.heads["orthoedit"]
    sha = hashlib.sha256(inputs["model.safetensors"]).hexdigest()
    assert hub.lfs == {sha: inputs["model.safetensors"]}
    assert len(hub.lfs_puts(sha)) == 1 and hub.lfs_puts()[0].authorization is None  # "S3" PUT
    assert len(hub.calls("POST", is_commit)) == 1

    # Read back through the client.
    assert sorted(api.list_repo_files(REPO, revision="orthoedit")) == sorted(
        [".gitattributes", *inputs]
    )
    assert api.repo_info(REPO, revision="orthoedit").sha == info.oid
    entry = api.get_paths_info(REPO, ["model.safetensors"], revision="orthoedit")[0]
    assert entry.lfs is not None and entry.lfs.sha256 == sha
    local = hf_hub_download(REPO, "model.safetensors", revision="orthoedit", cache_dir=tmp_path)
    assert Path(local).read_bytes() == inputs["model.safetensors"]

    # The same files again: the client sees equal oids in preupload and makes no commit.
    api.create_commit(REPO, operations=_ops(inputs), revision="orthoedit", commit_message="noop")
    assert len(hub.calls("POST", is_commit)) == 1
    assert not hub.unexpected and not hub.errors


def test_failed_lfs_put_leaves_branch_unchanged_then_retry_skips_done_objects(hub):
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    api.create_branch(REPO, branch="orthoedit")
    head = hub.repos[REPO].heads["orthoedit"]
    shards = {
        "model-00001-of-00002.safetensors": _blob(300_000, seed=2),
        "model-00002-of-00002.safetensors": _blob(200_000, seed=3),
    }
    inputs = {"config.json": _inputs()["config.json"], **shards}
    first, second = (hashlib.sha256(data).hexdigest() for data in shards.values())

    # Every PUT after the first fails: the first shard lands in storage, the second never does.
    # (num_threads=1: the PUTs go in the order of the operations.)
    rule = hub.fail(is_lfs_put, times=None, status=500, skip=1)
    with pytest.raises(Exception, match=r"model-00002-of-00002\.safetensors"):
        api.create_commit(
            REPO, operations=_ops(inputs), revision="orthoedit", commit_message="x", num_threads=1
        )
    assert rule.hits == 6  # 1 try + 5 retries by huggingface_hub's http_backoff
    assert hub.backoff_sleeps == [1, 2, 4, 8, 8]
    assert hub.repos[REPO].heads["orthoedit"] == head  # atomic: nothing committed
    assert hub.files(REPO, "orthoedit") == {}
    assert not hub.calls("POST", is_commit)
    assert set(hub.lfs) == {first}

    hub.clear_failures()
    puts_before = len(hub.lfs_puts())
    api.create_commit(
        REPO, operations=_ops(inputs), revision="orthoedit", commit_message="retry", num_threads=1
    )
    retried = hub.lfs_puts()[puts_before:]
    assert [r.path.rsplit("/", 1)[1] for r in retried] == [second]  # no re-send of done objects
    assert hub.files(REPO, "orthoedit") == inputs
    assert not hub.unexpected and not hub.errors


def test_dropped_connection_on_commit(hub):
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    hub.fail(is_commit, times=1, status=None)  # the commit POST is not retried by the client
    with pytest.raises(Exception):  # noqa: B017  (httpx2.RemoteProtocolError in 2.4.0)
        api.create_commit(REPO, operations=_ops(_inputs()), commit_message="x")
    assert hub.files(REPO) == {}
    api.create_commit(REPO, operations=_ops(_inputs()), commit_message="again")
    assert hub.files(REPO) == _inputs()


def test_lfs_put_with_wrong_content_is_rejected(hub):
    url = f"{hub.endpoint}/__lfs/upload/{hashlib.sha256(b'expected').hexdigest()}"
    request = urllib.request.Request(url, data=b"something else", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    assert hub.lfs == {}


def _write_folder(folder: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"model_type": "llama"}\n',
        "README.md": b"# tiny edit\n",
        "model-00001-of-00002.safetensors": _blob(70_000, seed=4),
        "model-00002-of-00002.safetensors": _blob(50_000, seed=5),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_upload_folder(hub, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    files = _write_folder(folder)
    api = HfApi()
    api.create_repo(REPO, private=True, exist_ok=True)
    api.create_branch(REPO, branch="orthoedit", exist_ok=True)

    api.upload_folder(repo_id=REPO, folder_path=folder, revision="orthoedit")

    assert hub.files(REPO, "orthoedit") == files
    assert hub.repos[REPO].lfs_paths["orthoedit"] == {n for n in files if n.endswith("safetensors")}
    assert _tree(folder) == sorted(files)  # nothing written into the uploaded folder
    assert not hub.unexpected and not hub.errors


@pytest.mark.skipif(
    not hasattr(HfApi, "upload_large_folder"),
    reason=f"huggingface_hub {huggingface_hub.__version__} has no HfApi.upload_large_folder",
)
def test_upload_large_folder(hub, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    files = _write_folder(folder)
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    api.create_branch(REPO, branch="orthoedit")  # upload_large_folder does not create branches

    api.upload_large_folder(
        repo_id=REPO,
        folder_path=folder,
        repo_type="model",
        revision="orthoedit",
        private=True,
        num_workers=1,
        print_report=False,
    )

    assert hub.files(REPO, "orthoedit") == files
    assert hub.repos[REPO].private is False  # private= only applies when it creates the repo
    # It keeps resumable state inside the folder it uploads.
    assert (folder / ".cache" / "huggingface" / "upload").is_dir()
    assert not hub.unexpected and not hub.errors
