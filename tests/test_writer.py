"""The streaming writer at its seams: many tiles, many output blocks, many copy pieces.

Tiny models fit in one tile, so here the writer's block sizes are shrunk until every tensor
spans several tiles (with a ragged last one), several ``pwrite`` blocks and several copy pieces,
across three shards and all three storage dtypes. The result must be the in-memory projection
rounded once to storage, with every other byte of every shard unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import orthoedit.edit.writer
from orthoedit.edit.ortho import orthogonalize
from orthoedit.edit.plan import EditOp
from orthoedit.model.checkpoint import INDEX_NAME, Checkpoint

D = 48
ULP = {"F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _shards(folder, gen):
    """Three shards; each has edited tensors of both axes between unedited ones."""
    weight_map = {}
    for i, dtype in enumerate(("BF16", "F16", "F32")):
        t = TORCH[dtype]
        tensors = {
            f"s{i}.before": torch.randn(37, 11, generator=gen).to(t),
            f"s{i}.columns": torch.randn(D, 83, generator=gen).to(t),  # [d_model, in]: axis 0
            f"s{i}.middle": torch.randn(5, 7, generator=gen).to(t),
            f"s{i}.rows": torch.randn(101, D, generator=gen).to(t),  # embedding-like: axis 1
            f"s{i}.bias": torch.randn(D, generator=gen).to(t),
            f"s{i}.after": torch.randn(29, generator=gen).to(t),
        }
        save_file(tensors, str(folder / f"shard-{i}.safetensors"), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, f"shard-{i}.safetensors"))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index))


def _ops():
    ops = {}
    for i in range(3):
        for name, axis in (("columns", 0), ("rows", 1), ("bias", 0)):
            tensor = f"s{i}.{name}"
            ops[tensor] = EditOp(
                tensor=tensor, site="mlp", layer=i, axis=axis, scale=1.0, module="m"
            )
    return ops


@pytest.mark.parametrize("tile_bytes", [1, 700, 1 << 20], ids=["row-tiles", "ragged", "one-tile"])
def test_tiled_stream_equals_in_memory_projection(tmp_path, monkeypatch, tile_bytes):
    monkeypatch.setattr(orthoedit.edit.writer, "TILE_BYTES", tile_bytes)
    monkeypatch.setattr(orthoedit.edit.writer, "OUT_BYTES", 1000)
    monkeypatch.setattr(orthoedit.edit.writer, "COPY_BLOCK", 96)
    gen = torch.Generator().manual_seed(7)
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    _shards(src, gen)
    checkpoint = Checkpoint.open(src)
    ops = _ops()
    u = torch.randn(D, generator=gen, dtype=torch.float64).numpy()
    u /= np.linalg.norm(u)
    vectors = dict.fromkeys(ops, u)
    jobs = [(shard, out / shard.path.name) for shard in checkpoint.files]

    orthoedit.edit.writer.stream_shards(jobs, ops, vectors)

    (out / INDEX_NAME).write_bytes((src / INDEX_NAME).read_bytes())
    edited = Checkpoint.open(out)
    for shard in checkpoint.files:
        before = shard.path.read_bytes()
        after = (out / shard.path.name).read_bytes()
        assert len(after) == len(before)
        pos = 0
        for info in sorted(shard.tensors.values(), key=lambda t: t.start):
            if info.name not in ops:
                continue
            assert after[pos : info.start] == before[pos : info.start]  # header + unedited
            pos = info.end
            op = ops[info.name]
            w = checkpoint.read(info.name)
            expect = orthogonalize(w, u, op.axis)
            got = edited.read(info.name)
            # Rounded once to storage: within one unit in the last place of the expected value.
            bound = ULP[info.dtype] * np.maximum(np.abs(expect), 2.0**-14) + 1e-12
            assert np.all(np.abs(got - expect) <= bound), info.name
            along = np.moveaxis(got, op.axis, -1) @ u
            assert np.linalg.norm(along) <= 4 * ULP[info.dtype] * np.linalg.norm(w), info.name
        assert after[pos:] == before[pos:]


def test_copy_error_stops_and_propagates(tmp_path, monkeypatch):
    """A failing copy piece ends the run with its error; no thread keeps going."""
    monkeypatch.setattr(orthoedit.edit.writer, "COPY_BLOCK", 64)
    calls = []

    def broken(src, dst, offset, length, stop):
        calls.append(offset)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(orthoedit.edit.writer, "copy_bytes", broken)
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    _shards(src, torch.Generator().manual_seed(0))
    checkpoint = Checkpoint.open(src)
    ops = _ops()
    u = np.ones(D) / D**0.5
    jobs = [(shard, out / shard.path.name) for shard in checkpoint.files]
    with pytest.raises(OSError, match="Input/output error"):
        orthoedit.edit.writer.stream_shards(jobs, ops, dict.fromkeys(ops, u))
    assert len(calls) <= 2  # one piece per thread at most, then both stopped
