"""Bad input: a clear one-line error, exit code 2, nothing written, nothing lost.

Every case runs through the CLI (exit code, one ``error:`` line on stderr) and, where the error
is raised by the library, through ``orthoedit.edit.apply.apply`` too (exception type and message).
After each case: no output folder at the target, no temporary folder beside it, and the source
folder byte-identical to what it was before.
"""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import orthoedit.edit.writer
import orthoedit.output
from conftest import D_MODEL, folder_digest, leftovers
from orthoedit.cli import app
from orthoedit.config import ApplyConfig
from orthoedit.edit.apply import apply
from orthoedit.edit.plan import Plan
from orthoedit.errors import BadInputError, UnsupportedModelError
from orthoedit.model.checkpoint import INDEX_NAME, Checkpoint
from orthoedit.model.direction import save_direction

runner = CliRunner()
O_PROJ = "model.layers.0.self_attn.o_proj.weight"


def cli(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The single ``error:`` line a failed command must print (and nothing else)."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def expect_bad(
    src: Path | str,
    direction: Path,
    out: Path,
    needles: list[str],
    exc: type[Exception] = BadInputError,
    *,
    args: tuple[str, ...] = (),
    library: dict | None = None,
) -> str:
    """Run the library and the CLI on one bad input; check both fail cleanly, write nothing."""
    local = Path(src).exists()
    before = folder_digest(src) if local else None
    existed = out.exists() or out.is_symlink()
    if library is not None:
        cfg = ApplyConfig(model=str(src), direction=direction, out=out, **library)
        with pytest.raises(exc) as info:
            apply(cfg)
        assert type(info.value) is exc
        message = str(info.value)
        assert "\n" not in message
    line = error_line(cli("apply", src, "--direction", direction, "--out", out, *args))
    if library is not None:
        assert line == f"error: {message}"
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    if before is not None:
        assert folder_digest(src) == before, "the source folder changed"
    if not existed:
        assert not out.exists(), f"{out} was created"
    parent = out.parent if out.parent.exists() else out.parent.parent
    assert leftovers(parent) == []
    return line


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    """A target path (absent) in its own parent folder, so that leftovers are easy to see."""
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent / "edited"


def shard_of(folder: Path, tensor: str) -> Path:
    index = json.loads((folder / INDEX_NAME).read_text())
    return folder / index["weight_map"][tensor]


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


# --- the direction -------------------------------------------------------------------------


def _vec(fill: float | None = None, size: int = D_MODEL) -> torch.Tensor:
    v = torch.randn(size, generator=torch.Generator().manual_seed(0))
    if fill is not None:
        v[3] = fill
    return v


DIRECTIONS = {
    # name: (writer(path_stem) -> Path, words the message must contain)
    "wrong-size": (
        lambda p: save_direction(p.with_suffix(".safetensors"), _vec(size=16)),
        ["size 16", "hidden size is 32"],
    ),
    "wrong-size-npy": (
        lambda p: (np.save(p.with_suffix(".npy"), _vec(size=48).numpy()), p.with_suffix(".npy"))[1],
        ["size 48", "32"],
    ),
    "nan": (lambda p: save_direction(p.with_suffix(".safetensors"), _vec(float("nan"))), ["NaN"]),
    "inf": (lambda p: save_direction(p.with_suffix(".safetensors"), _vec(float("inf"))), ["Inf"]),
    "inf-pt": (
        lambda p: (torch.save(_vec(float("-inf")), p.with_suffix(".pt")), p.with_suffix(".pt"))[1],
        ["Inf"],
    ),
    "zero-norm": (
        lambda p: save_direction(p.with_suffix(".safetensors"), torch.zeros(D_MODEL)),
        ["zero norm"],
    ),
    "per-layer-without-row": (
        lambda p: save_direction(p.with_suffix(".safetensors"), torch.randn(2, D_MODEL)),
        ["one direction per layer", "--direction-layer"],
    ),
    "span-dependent": (
        lambda p: save_direction(
            p.with_suffix(".safetensors"),
            torch.stack([_vec(), 2 * _vec(), torch.randn(D_MODEL)]),
            {"kind": "span"},
        ),
        ["linearly dependent", "vector 2", "drop it"],
    ),
    "unknown-extension": (
        lambda p: (p.with_suffix(".txt").write_text("0.1 0.2\n"), p.with_suffix(".txt"))[1],
        ["unknown direction format", ".safetensors", ".pt", ".npy"],
    ),
    "missing-file": (lambda p: p.with_suffix(".safetensors"), ["does not exist"]),
    "no-direction-tensor": (
        lambda p: (
            save_file({"vector": _vec()}, str(p.with_suffix(".safetensors"))),
            p.with_suffix(".safetensors"),
        )[1],
        ["no tensor named 'direction'", "vector"],
    ),
}


@pytest.mark.parametrize("case", list(DIRECTIONS))
def test_bad_direction(case, tiny_model, tmp_path, outdir):
    write, needles = DIRECTIONS[case]
    path = write(tmp_path / "dir")
    line = expect_bad(tiny_model("llama"), path, outdir, needles, library={})
    assert path.name in line  # the message names the file


def test_per_layer_row_out_of_range(tiny_model, tmp_path, outdir):
    path = save_direction(tmp_path / "d.safetensors", torch.randn(2, D_MODEL))
    expect_bad(
        tiny_model("llama"),
        path,
        outdir,
        ["--direction-layer 5", "0..1"],
        args=("--direction-layer", "5"),
        library={"direction_layer": 5},
    )


def test_empty_sites_is_an_error_not_every_site(tiny_model, direction_file, outdir):
    expect_bad(tiny_model("llama"), direction_file, outdir, ["--sites"], args=("--sites", ""))


@pytest.mark.parametrize("spec", ["1:99", "-9:", ":5"])
def test_layers_outside_the_model_are_refused_not_clipped(tiny_model, direction_file, outdir, spec):
    n_layers = 2  # the tiny models' depth: 1:99 used to edit 1:2 without a word
    expect_bad(
        tiny_model("llama"),
        direction_file,
        outdir,
        [f"--layers {spec!r}", f"{n_layers}-layer model"],
        args=("--layers", spec),
        library={"layers": spec},
    )


def test_error_text_with_brackets_is_printed_verbatim(tiny_model, tmp_path, outdir):
    folder = tmp_path / "[run]"
    folder.mkdir()
    path = save_direction(folder / "d.safetensors", torch.randn(2, 2, D_MODEL))
    with pytest.raises(BadInputError) as info:
        apply(ApplyConfig(model=str(tiny_model("llama")), direction=path, out=outdir))
    assert "[k, d_model] or [n_layers, d_model]" in str(info.value)
    line = error_line(cli("apply", tiny_model("llama"), "--direction", path, "--out", outdir))
    assert line == f"error: {info.value}"


# --- the model -----------------------------------------------------------------------------


def test_unsupported_architecture(model_copy, direction_file, outdir):
    src = model_copy("llama")
    edit_config(src, architectures=["FooForCausalLM"], model_type="foo")
    line = expect_bad(
        src,
        direction_file,
        outdir,
        ["FooForCausalLM", "not supported", "supported:"],
        UnsupportedModelError,
        library={},
    )
    for supported in ("LlamaForCausalLM", "Gemma2ForCausalLM", "GPT2LMHeadModel"):
        assert supported in line


def test_unknown_model_type_without_architectures(model_copy, direction_file, outdir):
    src = model_copy("llama")
    edit_config(src, architectures=None, model_type="foo")
    expect_bad(
        src,
        direction_file,
        outdir,
        ["'foo'", "LlamaForCausalLM"],
        UnsupportedModelError,
        library={},
    )


def test_multimodal_config_without_a_language_model(model_copy, direction_file, outdir):
    src = model_copy("llama")
    edit_config(src, architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3")
    expect_bad(
        src,
        direction_file,
        outdir,
        ["text_config.hidden_size", "gemma3_multimodal"],
        UnsupportedModelError,
        library={},
    )


def test_multimodal_checkpoint_without_a_language_model(model_copy, direction_file, outdir):
    """A wrapper's config over weights that hold no language model where its table looks."""
    src = model_copy("llama")
    config = json.loads((src / "config.json").read_text())
    edit_config(
        src,
        architectures=["Mistral3ForConditionalGeneration"],
        model_type="mistral3",
        text_config={k: config[k] for k in ("hidden_size", "num_hidden_layers")},
    )
    expect_bad(
        src,
        direction_file,
        outdir,
        ["language_model.model.embed_tokens.weight", "mistral3", "missing"],
        UnsupportedModelError,
        library={},
    )


@pytest.mark.parametrize(
    "quant",
    [
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {"quant_method": "awq", "bits": 4, "version": "gemm"},
        {"quant_method": "fp8", "activation_scheme": "dynamic"},
    ],
    ids=lambda q: q["quant_method"],
)
def test_quantized_source(quant, model_copy, direction_file, outdir):
    src = model_copy("llama")
    edit_config(src, quantization_config=quant)
    expect_bad(
        src,
        direction_file,
        outdir,
        ["quantized", quant["quant_method"], "unquantized"],
        UnsupportedModelError,
        library={},
    )


def test_fp8_tensor(model_copy, direction_file, outdir):
    src = model_copy("llama")
    shard = shard_of(src, O_PROJ)
    tensors = load_file(shard)
    tensors[O_PROJ] = tensors[O_PROJ].to(torch.float8_e4m3fn)
    save_file(tensors, str(shard), {"format": "pt"})
    Checkpoint.open(src)  # the index is still consistent: only the dtype is the problem
    expect_bad(
        src,
        direction_file,
        outdir,
        [O_PROJ, "F8_E4M3", "dequantize"],
        UnsupportedModelError,
        library={},
    )


def test_bin_only_checkpoint(model_copy, direction_file, outdir):
    src = model_copy("llama")
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
        shard.unlink()
    (src / INDEX_NAME).unlink()
    torch.save(state, src / "pytorch_model.bin")
    expect_bad(
        src,
        direction_file,
        outdir,
        ["pytorch_model.bin", "safetensors", "save_pretrained"],
        UnsupportedModelError,
        library={},
    )


def test_no_weights_at_all(model_copy, direction_file, outdir):
    src = model_copy("llama")
    for shard in src.glob("*.safetensors"):
        shard.unlink()
    (src / INDEX_NAME).unlink()
    expect_bad(src, direction_file, outdir, ["no model.safetensors"], library={})


def test_no_config(model_copy, direction_file, outdir):
    src = model_copy("llama")
    (src / "config.json").unlink()
    expect_bad(src, direction_file, outdir, ["config.json"], library={})


def test_missing_shard(model_copy, direction_file, outdir):
    src = model_copy("llama")
    shard = shard_of(src, O_PROJ)
    shard.unlink()
    expect_bad(src, direction_file, outdir, [shard.name, "missing", "download"], library={})


def test_index_names_missing_tensor(model_copy, direction_file, outdir):
    src = model_copy("llama")
    index = json.loads((src / INDEX_NAME).read_text())
    shard = index["weight_map"][O_PROJ]
    index["weight_map"]["model.layers.0.self_attn.extra_proj.weight"] = shard
    (src / INDEX_NAME).write_text(json.dumps(index))
    expect_bad(
        src,
        direction_file,
        outdir,
        ["model.layers.0.self_attn.extra_proj.weight", shard, "does not contain"],
        library={},
    )


def test_corrupt_index(model_copy, direction_file, outdir):
    src = model_copy("llama")
    (src / INDEX_NAME).write_text('{"weight_map": {')
    expect_bad(src, direction_file, outdir, [INDEX_NAME, "corrupt index"], library={})


def _cut(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)


def _huge_prefix(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    path.write_bytes(bytes(data))


def _garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = b"\xff" * n
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "header-cut-to-4-bytes": (lambda p: _cut(p, 4), ["truncated", "no header length"]),
    "header-cut-inside-json": (lambda p: _cut(p, 40), ["truncated or corrupt", "header claims"]),
    "header-length-beyond-file": (_huge_prefix, ["header claims", "file has"]),
    "header-not-json": (_garbage_header, ["corrupt safetensors header"]),
    "data-section-truncated": (lambda p: _cut(p, p.stat().st_size - 100), ["truncated", "ends at"]),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_shard(case, model_copy, direction_file, outdir):
    corrupt, needles = CORRUPTIONS[case]
    src = model_copy("llama")
    shard = shard_of(src, O_PROJ)
    corrupt(shard)
    line = expect_bad(src, direction_file, outdir, needles, library={})
    assert shard.name in line


def test_corrupt_single_file(model_copy, direction_file, outdir):
    src = model_copy("llama", tie=True, max_shard_size="1GB")
    _cut(src / "model.safetensors", 4)
    expect_bad(src, direction_file, outdir, ["model.safetensors", "truncated"], library={})


def test_hub_id_that_cannot_be_fetched(monkeypatch, direction_file, outdir):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = "nobody-here/no-such-model-xyz"
    expect_bad(repo, direction_file, outdir, [repo, "local folder"], library={})
    assert not outdir.exists()


def test_model_that_is_neither_folder_nor_hub_id(tmp_path, direction_file, outdir):
    expect_bad(
        str(tmp_path / "no" / "such" / "dir"),
        direction_file,
        outdir,
        ["no such folder", "Hub model id"],
        library={},
    )


# --- the output path -----------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_output_is_the_source(overwrite, model_copy, direction_file):
    src = model_copy("llama")
    flag = ("--overwrite",) if overwrite else ()
    expect_bad(
        src,
        direction_file,
        src,
        ["is an input of this command"],
        args=flag,
        library={"overwrite": overwrite},
    )
    assert leftovers(src) == []


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_output_inside_the_source(overwrite, model_copy, direction_file):
    src = model_copy("llama")
    out = src / "sub" / "edited"
    flag = ("--overwrite",) if overwrite else ()
    expect_bad(
        src,
        direction_file,
        out,
        ["which this command reads"],
        args=flag,
        library={"overwrite": overwrite},
    )
    assert not (src / "sub").exists()


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_output_contains_the_source(overwrite, model_copy, direction_file):
    src = model_copy("llama")
    before = folder_digest(src)
    flag = ("--overwrite",) if overwrite else ()
    expect_bad(
        src,
        direction_file,
        src.parent,
        ["contains", "which this command reads"],
        args=flag,
        library={"overwrite": overwrite},
    )
    assert src.is_dir() and folder_digest(src) == before  # the source survived


def test_output_is_a_symlink_to_the_source(model_copy, direction_file, tmp_path):
    src = model_copy("llama")
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    expect_bad(
        src,
        direction_file,
        link,
        ["is an input of this command"],
        args=("--overwrite",),
        library={"overwrite": True},
    )
    assert link.is_symlink()


def test_source_through_a_symlink_output_inside(model_copy, direction_file, tmp_path):
    src = model_copy("llama")
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    expect_bad(link, direction_file, src / "edited", ["which this command reads"], library={})


def test_output_exists(tiny_model, direction_file, outdir):
    outdir.mkdir()
    (outdir / "keep.txt").write_text("precious")
    before = folder_digest(outdir)
    error = error_line(
        cli("apply", tiny_model("llama"), "--direction", direction_file, "--out", outdir)
    )
    assert "already exists" in error and "--overwrite" in error
    with pytest.raises(BadInputError, match="already exists"):
        apply(ApplyConfig(model=str(tiny_model("llama")), direction=direction_file, out=outdir))
    assert folder_digest(outdir) == before
    assert leftovers(outdir.parent) == []


def test_output_exists_as_a_file(tiny_model, direction_file, outdir):
    outdir.write_text("not a folder")
    error = error_line(
        cli(
            "apply",
            tiny_model("llama"),
            "--direction",
            direction_file,
            "--out",
            outdir,
            "--overwrite",
        )
    )
    assert "not a folder" in error
    assert outdir.read_text() == "not a folder"
    assert leftovers(outdir.parent) == []


def test_overwrite_replaces_the_output(tiny_model, direction_file, outdir):
    src = tiny_model("llama")
    assert cli("apply", src, "--direction", direction_file, "--out", outdir).exit_code == 0
    (outdir / "stale.txt").write_text("old run")
    (outdir / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    result = cli("apply", src, "--direction", direction_file, "--out", outdir, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (outdir / "stale.txt").exists()
    assert not (outdir / "model-00009-of-00009.safetensors").exists()
    plan = Plan.load(outdir)
    edited, source = Checkpoint.open(outdir), Checkpoint.open(src)
    assert set(edited.tensors) == set(source.tensors)
    assert plan.edited <= set(edited.tensors)
    assert any(not np.array_equal(edited.read(name), source.read(name)) for name in plan.edited)
    assert leftovers(outdir.parent) == []


# --- failures while writing ----------------------------------------------------------------


def test_no_write_permission(monkeypatch, tiny_model, direction_file, outdir):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(orthoedit.output.tempfile, "mkdtemp", denied)
    expect_bad(tiny_model("llama"), direction_file, outdir, ["no permission", "--out"], library={})


class _FailingWrites:
    """Stands in for ``orthoedit.edit.writer._write_all``: every call after ``after`` good ones
    fails.

    (The count restarts after each failure, so a second run fails at the same point.)
    """

    def __init__(self, real, after: int, err: int):
        self.real, self.after, self.err, self.calls = real, after, err, 0

    def __call__(self, fd, data, offset):
        self.calls += 1
        if self.calls % (self.after + 1) == 0:
            raise OSError(self.err, "No space left on device" if self.err == errno.ENOSPC else "")
        self.real(fd, data, offset)


@pytest.mark.parametrize(
    ("err", "needles"),
    [(errno.ENOSPC, ["disk full", "nothing was written"]), (errno.EIO, ["cannot write"])],
    ids=["ENOSPC", "EIO"],
)
def test_write_failure_mid_edit(err, needles, monkeypatch, tiny_model, direction_file, outdir):
    failing = _FailingWrites(orthoedit.edit.writer._write_all, after=2, err=err)
    monkeypatch.setattr(orthoedit.edit.writer, "_write_all", failing)
    expect_bad(tiny_model("llama"), direction_file, outdir, needles, library={})
    # Library and CLI each failed at their third write and stopped there; the other writer
    # thread may finish the one job it had under way (a tiny model's job is one write).
    assert 6 <= failing.calls <= 8
    assert list(outdir.parent.iterdir()) == []


def test_disk_full_keeps_existing_output(monkeypatch, tiny_model, direction_file, outdir):
    src = tiny_model("llama")
    first = cli("apply", src, "--direction", direction_file, "--out", outdir)
    assert first.exit_code == 0, first.output
    before = folder_digest(outdir)
    failing = _FailingWrites(orthoedit.edit.writer._write_all, after=2, err=errno.ENOSPC)
    monkeypatch.setattr(orthoedit.edit.writer, "_write_all", failing)
    line = error_line(
        cli("apply", src, "--direction", direction_file, "--out", outdir, "--overwrite")
    )
    assert "disk full" in line
    assert failing.calls > 2
    assert folder_digest(outdir) == before  # the previous output is intact
    assert leftovers(outdir.parent) == []


def test_disk_full_while_copying_small_files(monkeypatch, tiny_model, direction_file, outdir):
    import orthoedit.edit.apply as stage

    real = shutil.copyfile

    def copyfile(a, b, *args, **kwargs):
        if Path(a).name == "tokenizer.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(stage.shutil, "copyfile", copyfile)
    expect_bad(tiny_model("llama"), direction_file, outdir, ["disk full"], library={})


# --- verify --------------------------------------------------------------------------------


def test_verify_folder_without_plan(tiny_model):
    src = tiny_model("llama")
    before = folder_digest(src)
    line = error_line(cli("verify", src, src))
    assert "plan.json" in line and "orthoedit output" in line
    assert folder_digest(src) == before


def test_verify_missing_edited_folder(tiny_model, tmp_path):
    line = error_line(cli("verify", tiny_model("llama"), tmp_path / "nothing"))
    assert "plan.json" in line


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["measure", "M", "--n-train", "1"], "error: --n-train must be >= 2"),
        (["measure", "M", "--max-kl", "-1"], "error: --max-kl must be >= 0"),
        (
            ["apply", "M", "--direction", "d", "--sites", "embed,foo"],
            "error: --sites 'foo': must be",
        ),
        (["search", "M", "--candidates", "c", "--trials", "0"], "error: --trials must be >= 1"),
    ],
)
def test_option_errors_name_the_option_not_the_field(args, line, tmp_path):
    said = error_line(cli(*args, "--out", tmp_path / "o"))
    assert said.startswith(line), said
    assert "Input should" not in said and "_" not in said.split()[1]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["measure", "eval safety"])
@pytest.mark.parametrize("kind", ["missing", "binary"])
def test_template_that_cannot_be_read_is_one_line(command, kind, tiny_model, tmp_path):
    template = tmp_path / "t.jinja"
    if kind == "binary":
        template.write_bytes(b"\xff\xfe\x00garbage")
    said = error_line(
        cli(*command.split(), tiny_model("llama"), "--template", template, "--out", tmp_path / "o")
    )
    assert "--template" in said and str(template) in said
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["measure", "eval safety", "eval bench", "study sites"])
@pytest.mark.parametrize("device", ["bogus", "cuda:x"])
def test_device_that_is_not_there_is_one_line_before_loading(command, device, tmp_path):
    """Checked when the options are read: no model is loaded (M does not even exist)."""
    args = [*command.split(), "M", "--device", device, "--out", tmp_path / "o"]
    if command == "eval bench":
        args.insert(3, "E")
    if command == "study sites":
        args += ["--direction", "d.safetensors"]
    said = error_line(cli(*args))
    assert f"--device {device}" in said or f"--device '{device}'" in said
    assert not (tmp_path / "o").exists()


COMMANDS_WITH_DEVICE = [
    "measure",
    "eval safety",
    "eval kl",
    "compare",
    "eval bench",
    "study sites",
    "attribute",
    "search",
]


@pytest.mark.parametrize("command", COMMANDS_WITH_DEVICE)
def test_device_this_machine_lacks_is_one_line_before_loading(command, tiny_model, tmp_path):
    """A device torch can name but this machine does not have: one line, exit 2, nothing
    written, from every command that runs a model (library calls and recipes check it too)."""
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    model = tiny_model("llama")
    args = [*command.split(), model]
    if command in ("eval kl", "compare", "eval bench"):
        args.append(model)
    if command in ("study sites", "attribute"):
        args += ["--direction", tmp_path / "d.safetensors"]
    if command == "search":
        args += ["--candidates", tmp_path / "c"]
    file_output = command in ("eval kl", "compare")  # one file: --report, not --out
    out = tmp_path / ("o.json" if file_output else "o")
    result = cli(*args, "--device", "cuda:7", "--report" if file_output else "--out", out)
    said = error_line(result)
    assert result.exit_code == 2 and said.startswith("error: --device cuda:7: this machine has")
    assert not out.exists()
