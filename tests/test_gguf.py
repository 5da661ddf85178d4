"""The edit of a GGUF, GGUF to GGUF (``orthoedit apply MODEL.gguf --out EDITED.gguf``).

Tiny GGUFs are written in-process (``tests/gguf_tiny.py``) from tiny checkpoints; the F32 ones
load in transformers with the checkpoint's own logits, which proves their layout. Then:

- the GGUF edit of an F32 GGUF equals orthoedit's safetensors edit of the checkpoint it came
  from, tensor for tensor (Gemma 3's post-norm writers included: its norms are stored as 1 + w);
- every unedited tensor and every metadata byte is copied verbatim, plus provenance keys;
- quantized tensors stay in their type (the gguf package's quantizers) and equal the
  requantized projection of the dequantized source to within the type's own rounding; K-quants
  fall back to Q8_0 with a note where llama.cpp is not installed;
- bad inputs: one line, exit 2, nothing at the final path, the source untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gguf_tiny import write_tiny_gguf
from orthoedit.cli import app
from orthoedit.config import ApplyConfig
from orthoedit.edit import feedback, gguf_types
from orthoedit.edit.apply import apply
from orthoedit.edit.ortho import orthogonalize
from orthoedit.edit.plan import Plan
from orthoedit.model.checkpoint import Checkpoint
from orthoedit.model.direction import save_direction
from orthoedit.model.gguf import GgufCheckpoint, dequantized, layout_config, read_layout

runner = CliRunner()
HIDDEN = 64


def _direction(tmp: Path, size: int = HIDDEN, seed: int = 7) -> Path:
    v = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return save_direction(tmp / f"direction-{size}-{seed}.safetensors", v)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _open(path: Path) -> GgufCheckpoint:
    layout = read_layout(path)
    return GgufCheckpoint.open(layout, layout_config(layout)["num_hidden_layers"])


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory):
    """``built(family, types="F32", **kwargs) -> (checkpoint folder, GGUF path)``, cached."""
    root, cache = tmp_path_factory.mktemp("gguf"), {}

    def get(family: str, types="F32", **kwargs):
        key = (family, json.dumps(types, sort_keys=True), *sorted(kwargs.items()))
        if key not in cache:
            folder = tiny_model(family, hidden=kwargs.pop("hidden", HIDDEN), **kwargs)
            out = root / f"{family}-{len(cache)}.gguf"
            cache[key] = folder, write_tiny_gguf(folder, out, types)
        return cache[key]

    return get


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_tiny_gguf_is_its_checkpoint_in_transformers(built, family):
    """The layout check of the fixture: transformers loads the F32 GGUF with the logits of the
    checkpoint it was written from."""
    from transformers import AutoModelForCausalLM

    folder, path = built(family)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                  dtype=torch.float32)  # fmt: skip
    ids = torch.tensor([[5, 17, 200, 31, 44, 9]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, loaded(ids).logits)


def _edited_pair(built, family, tmp_path, **kwargs):
    folder, path = built(family, **kwargs)
    direction = _direction(tmp_path, kwargs.get("hidden", HIDDEN))
    plan_st, st = apply(ApplyConfig(model=str(folder), direction=direction, out=tmp_path / "st"))
    plan_g, out = apply(
        ApplyConfig(model=str(path), direction=direction, out=tmp_path / "edited.gguf")
    )
    return folder, path, st, out, plan_st, plan_g


@pytest.mark.parametrize(
    ("family", "kwargs"),
    [("qwen2", {}), ("llama", {"tie": True}), ("gemma3", {})],
    ids=["qwen2", "llama-tied", "gemma3-post-norms"],
)
def test_gguf_edit_equals_safetensors_edit(built, family, kwargs, tmp_path):
    _, path, st, out, plan_st, plan_g = _edited_pair(built, family, tmp_path, **kwargs)
    assert {op.tensor for op in plan_g.ops} == {op.tensor for op in plan_st.ops}
    edited, source, ckpt_st = _open(out), _open(path), Checkpoint.open(st)
    for op in plan_g.ops:
        mine = edited.read(op.tensor)
        theirs = ckpt_st.read(op.tensor)
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6 * np.abs(theirs).max())
        assert not np.allclose(mine, source.read(op.tensor))  # the edit did something
    if plan_g.write_lm_head:  # untied: output.weight is the original embedding, verbatim
        lm_head = next(t for t in edited.layout.tensors if t.name == "output.weight")
        embed = next(t for t in source.layout.tensors if t.name == "token_embd.weight")
        assert _bytes(edited, lm_head) == _bytes(source, embed)


def _bytes(ckpt: GgufCheckpoint, tensor) -> bytes:
    with open(ckpt.layout.path, "rb") as f:
        f.seek(tensor.start)
        return f.read(tensor.nbytes)


def test_unedited_tensors_and_metadata_are_copied_verbatim(built, tmp_path):
    _, path, _, out, _, plan = _edited_pair(built, "qwen2", tmp_path)
    source, edited = read_layout(path), read_layout(out)
    assert edited.kv_bytes.startswith(source.kv_bytes)
    assert edited.kv_count == source.kv_count + 3
    assert edited.get("orthoedit.direction.sha256") == plan.direction_files[0].sha256
    assert Plan.model_validate_json(edited.get("orthoedit.plan")).ops == plan.ops
    assert edited.get("orthoedit.version")
    planned = {t.name for t in _open(out).layout.tensors} - {
        _open(out).source[op.tensor][0].name for op in plan.ops
    }
    src, dst = _open(path), _open(out)
    by_name = {t.name: t for t in src.layout.tensors}
    copied = [t for t in dst.layout.tensors if t.name in planned]
    assert copied and all(_bytes(dst, t) == _bytes(src, by_name[t.name]) for t in copied)
    assert [t.name for t in dst.layout.tensors] == [t.name for t in src.layout.tensors]


def _component(w: np.ndarray, r: np.ndarray, axis: int) -> float:
    return float(np.linalg.norm(np.moveaxis(w, axis, -1) @ r))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q5_1", "F16", "BF16"])
def test_quantized_tensors_stay_in_their_type(built, kind, tmp_path):
    """Each edited tensor keeps its type, stays within about its type's own rounding of the
    exact projection of its dequantized source, and carries less of r than that rounding would
    leave (the requantization's feedback; F16/BF16 round once)."""
    _, path, _, out, _, plan = _edited_pair(built, "qwen2", tmp_path, types=kind)
    src, dst = _open(path), _open(out)
    r = np.asarray(plan.directions[0], dtype=np.float64)
    r /= np.linalg.norm(r)
    lefts, plains, floors = [], [], []
    for op in plan.ops:
        tensor = src.source[op.tensor][0]
        assert dst.source[op.tensor][0].type_name == tensor.type_name
        if tensor.type_name == "F32":  # vectors stay F32
            continue
        exact = orthogonalize(src.read(op.tensor), r, op.axis).astype(np.float32)
        qtype = gguf.GGMLQuantizationType[kind]
        rounded = gguf.dequantize(gguf.quants.quantize(exact, qtype), qtype)
        got = dst.read(op.tensor)
        own = np.linalg.norm(rounded - exact)
        assert np.linalg.norm(got - exact) <= 1.25 * own + 1e-6 * np.linalg.norm(exact)
        left, plain = _component(got, r, op.axis), _component(rounded, r, op.axis)
        floor = feedback.FLOOR * np.linalg.norm(exact)
        assert left <= max(plain, floor) + 1e-9, (op.tensor, left, plain)
        lefts, plains, floors = [*lefts, left], [*plains, plain], [*floors, floor]
    if kind not in ("F16", "BF16"):  # the feedback: half of plain rounding's, or bf16's floor
        assert sum(lefts) <= max(0.5 * sum(plains), sum(floors)), (lefts, plains, floors)


def test_k_quants_fall_back_to_q8_0_without_llama_cpp(built, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_types, "ggml", lambda: None)
    _, _, _, out, _, plan = _edited_pair(built, "qwen2", tmp_path, types="Q4_K", hidden=256)
    dst = _open(out)
    kinds = {dst.source[op.tensor][0].type_name for op in plan.ops if op.tensor.endswith("weight")}
    assert kinds == {"Q8_0"}
    note = [w for w in plan.warnings if "written as Q8_0" in w]
    assert len(note) == 1 and "Q4_K" in note[0] and "not installed" in note[0]
    untouched = [t for t in dst.layout.tensors if t.name.endswith("attn_q.weight")]
    assert untouched and all(t.type_name == "Q4_K" for t in untouched)


@pytest.mark.skipif(gguf_types.ggml() is None, reason="llama-cpp-python is not installed")
def test_k_quants_stay_k_quants_with_llama_cpp(built, tmp_path):
    _, path, _, out, _, plan = _edited_pair(built, "qwen2", tmp_path, types="Q4_K", hidden=256)
    src, dst = _open(path), _open(out)
    r = np.asarray(plan.directions[0], dtype=np.float64)
    r /= np.linalg.norm(r)
    for op in plan.ops:
        if src.source[op.tensor][0].type_name != "Q4_K":
            continue
        assert dst.source[op.tensor][0].type_name == "Q4_K"
        before = _component(src.read(op.tensor), r, op.axis)
        assert _component(dst.read(op.tensor), r, op.axis) < 0.2 * before


def test_dequantized_matches_gguf_reader(built):
    """The metadata-only layout reader finds every tensor where gguf's own reader does."""
    _, path = built("qwen2", types={"attn": "Q8_0", "*": "Q5_0"})
    reader = gguf.GGUFReader(path)
    layout = read_layout(path)
    mine = {t.name: t for t in layout.tensors}
    for tensor in reader.tensors:
        found = mine[tensor.name]
        assert (found.start, found.nbytes) == (tensor.data_offset, tensor.n_bytes)
        expected = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(-1)
        assert np.array_equal(dequantized(layout, found).reshape(-1), expected)


# --- bad input ------------------------------------------------------------------------------


def _minimal(path: Path, arch: str, extra: dict | None = None) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_uint32(f"{arch}.block_count", 1)
    writer.add_uint32(f"{arch}.embedding_length", HIDDEN)
    for key, value in (extra or {}).items():
        writer.add_uint16(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((8, HIDDEN), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _split(tmp: Path) -> Path:
    return _minimal(tmp / "m-00002-of-00003.gguf", "qwen2", {"split.no": 1, "split.count": 3})


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _bad_magic(src: Path, dst: Path) -> Path:
    dst.write_bytes(b"GGUX" + src.read_bytes()[4:])
    return dst


BAD = {
    "truncated": (lambda src, tmp: _truncated(src, tmp / "t.gguf"), ["truncated"]),
    "corrupt": (lambda src, tmp: _bad_magic(src, tmp / "c.gguf"), ["not a readable GGUF"]),
    "split-second-part": (
        lambda src, tmp: _split(tmp),
        ["part 2 of 3", "m-00001-of-00003.gguf"],
    ),
    "no-table": (lambda src, tmp: _minimal(tmp / "s.gguf", "stablelm"), ["no table", "stablelm"]),
    "not-read-by-transformers": (
        lambda src, tmp: _minimal(tmp / "b.gguf", "bert"),
        ["transformers reads no GGUF", "bert"],
    ),
}


def _expect_bad(model: Path, direction: Path, out: Path, needles: list[str]) -> None:
    before = _digest(model) if model.is_file() else None
    result = runner.invoke(app, ["apply", str(model), "--direction", str(direction),
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert not out.exists() or out == model
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    if before is not None:
        assert _digest(model) == before


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_gguf(built, case, tmp_path):
    _, src = built("qwen2")
    make, needles = BAD[case]
    bad = make(src, tmp_path)
    (tmp_path / "out").mkdir()
    _expect_bad(bad, _direction(tmp_path), tmp_path / "out" / "edited.gguf", needles)


def test_bad_direction_size_out_equal_to_input_and_out_suffix(built, tmp_path):
    _, src = built("qwen2")
    model = tmp_path / "model.gguf"
    shutil.copyfile(src, model)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "edited.gguf"
    _expect_bad(model, _direction(tmp_path, size=48), out, ["48", str(HIDDEN)])
    _expect_bad(model, _direction(tmp_path), model, ["is an input"])
    _expect_bad(model, _direction(tmp_path), tmp_path / "out" / "edited", ["*.gguf"])
