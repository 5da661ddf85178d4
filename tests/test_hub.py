"""MODEL as a Hub id: resolved through huggingface_hub's cache (offline here, as in CI).

The cache is laid out as huggingface_hub writes it (``models--org--name/snapshots/COMMIT`` and
``refs/main``), so the real ``snapshot_download`` code path runs without a network.
"""

from __future__ import annotations

import shutil

import huggingface_hub.constants
import pytest
import yaml

from orthoedit.config import ApplyConfig
from orthoedit.edit.apply import apply
from orthoedit.errors import BadInputError
from orthoedit.model.source import resolve_model

REPO = "orthoedit-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model):
    cache = tmp_path / "hub"
    storage = cache / ("models--" + REPO.replace("/", "--"))
    shutil.copytree(tiny_model("llama", tie=True), storage / "snapshots" / COMMIT)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return storage / "snapshots" / COMMIT


def test_hub_id_resolves_to_cached_snapshot(hub_cache):
    folder, revision = resolve_model(REPO)
    assert folder == hub_cache and revision == COMMIT


def test_apply_on_hub_id_records_provenance(hub_cache, direction_file, tmp_path):
    out = tmp_path / "edited"
    plan, _ = apply(ApplyConfig(model=REPO, direction=direction_file, out=out))
    assert plan.source == REPO and plan.revision == COMMIT and plan.base_model == REPO
    front = (out / "README.md").read_text().split("---")[1]
    assert yaml.safe_load(front)["base_model"] == REPO
    assert COMMIT in (out / "README.md").read_text()
    # Same bytes as editing the local folder directly.
    apply(ApplyConfig(model=str(hub_cache), direction=direction_file, out=tmp_path / "l"))
    for shard in sorted(out.glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "l" / shard.name).read_bytes()


def test_revision_not_in_cache_is_a_clear_error(hub_cache):
    with pytest.raises(BadInputError, match=r"cannot be reached|not found"):
        resolve_model(REPO, revision="v9.9")


def test_revision_with_local_folder_is_refused(tiny_model):
    with pytest.raises(BadInputError, match="--revision"):
        resolve_model(str(tiny_model("llama")), revision="main")
