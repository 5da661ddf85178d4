"""``orthoedit export gguf``: types, bad inputs, the staged folder and its record, the pinned
converter's fetch, and the recipe stage, with a stand-in converter (tests/fake_llama_cpp);
llama.cpp's quantizer where llama-cpp-python is installed. The real converter's tests
(tests/test_export_llama_cpp.py) run where it is found."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import folder_digest, leftovers
from orthoedit.config import ApplyConfig, ExportGgufConfig
from orthoedit.edit.apply import apply
from orthoedit.edit.plan import Plan
from orthoedit.errors import BadInputError
from orthoedit.export import llama_cpp
from orthoedit.export.gguf import RECORD, export_gguf, read_export
from orthoedit.output import MARKER
from test_cli import cli, one_line_error, wide_consoles  # noqa: F401

FAKE = Path(__file__).resolve().parent / "fake_llama_cpp"


@pytest.fixture(scope="module")
def edited(tiny_model, direction_file, tmp_path_factory) -> Path:
    """An edited tiny llama (read-only for tests)."""
    out = tmp_path_factory.mktemp("export") / "edited"
    apply(ApplyConfig(model=str(tiny_model("llama")), direction=direction_file, out=out))
    return out


@pytest.fixture
def tools(monkeypatch):
    """sentencepiece and llama-cpp-python count as installed (the stand-in converter needs
    neither); ``tools[name] = False`` takes one away."""
    present = {"sentencepiece": True, "llama_cpp": llama_cpp.installed("llama_cpp")}
    monkeypatch.setattr(llama_cpp, "installed", lambda name: present[name])
    monkeypatch.delenv(llama_cpp.ENV, raising=False)
    return present


def _fake_quantize(source: Path, dest: Path, kind: str, log: Path) -> None:
    """The quantizer's stand-in: a copy of its input, relabelled as ``kind``."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(dest, "llama")
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{kind}"].value)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- types --------------------------------------------------------------------------------------


def test_types_are_named_as_llama_cpp_names_them(tmp_path):
    cfg = ExportGgufConfig(model_dir=tmp_path, types=["q4_k_m", "Q4_K_M", "f16", "bf16"])
    assert cfg.types == ["Q4_K_M", "F16", "BF16"]
    assert ExportGgufConfig(model_dir=tmp_path).types == ["Q8_0"]
    with pytest.raises(ValidationError, match="is not a type export writes"):
        ExportGgufConfig(model_dir=tmp_path, types=["q4_k_x"])
    with pytest.raises(ValidationError, match="needs an importance matrix"):
        ExportGgufConfig(model_dir=tmp_path, types=["iq2_xs"])
    assert set(llama_cpp.CONVERTED) & set(llama_cpp.QUANTIZED) == set()


@pytest.mark.skipif(not llama_cpp.installed("llama_cpp"), reason="needs llama-cpp-python")
def test_every_quantized_type_is_a_llama_cpp_file_type():
    import gguf
    import llama_cpp as lib

    for kind in llama_cpp.QUANTIZED + llama_cpp.NEED_IMATRIX:
        value = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{kind}")
        assert gguf.LlamaFileType(value).name == f"MOSTLY_{kind}"  # what the card reads back


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "is not a folder"),
        ("no-config", "has no config.json"),
        ("out-exists", "already exists; pass --overwrite"),
        ("out-inside", "which this command reads"),
        ("no-script", "no convert_hf_to_gguf.py there"),
        ("bad-type", "is not a type export writes"),
        ("imatrix", "needs an importance matrix"),
        ("bad-name", "give a file name stem"),
        ("no-sentencepiece", "pip install 'orthoedit[export]'"),
        ("no-quantizer", "pip install 'orthoedit[llama]'"),
        ("converter-fails", "BPE pre-tokenizer was not recognized"),
    ],
)
def test_bad_inputs(case, needle, edited, tools, tmp_path, monkeypatch):
    model, out = edited, tmp_path / "gguf"
    args = ["--type", "Q8_0", "--llama-cpp", FAKE]
    if case == "missing":
        model = tmp_path / "none"
    elif case == "no-config":
        model = tmp_path / "empty"
        model.mkdir()
    elif case == "out-exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    elif case == "out-inside":
        out = edited / "elsewhere"
    elif case == "no-script":
        args[-1] = tmp_path / "no-llama-cpp"
        args[-1].mkdir()
    elif case in ("bad-type", "imatrix"):
        args[1] = "q4_k_x" if case == "bad-type" else "iq1_s"
    elif case == "bad-name":
        args += ["--name", "a/b"]
    elif case == "no-sentencepiece":
        tools["sentencepiece"] = False
    elif case == "no-quantizer":
        tools["llama_cpp"], args[1] = False, "q4_k_m"
    elif case == "converter-fails":
        monkeypatch.setenv("FAKE_CONVERTER", "fail")
    before = folder_digest(edited)
    line = one_line_error(cli("export", "gguf", model, "--out", out, *args))
    assert needle in line
    assert folder_digest(edited) == before  # the checkpoint is untouched
    assert (out / "mine.txt").is_file() if case == "out-exists" else not out.exists()
    assert leftovers(tmp_path) == [] and leftovers(edited) == [MARKER]
    if case == "converter-fails":  # the converter's log is kept, and named
        log = Path(line.split("its log: ")[1].rstrip(")."))
        assert "NotImplementedError" in log.read_text()


# --- the folder ---------------------------------------------------------------------------------


def test_export_writes_each_type_into_the_checkpoint_folder(edited, tools, tmp_path, monkeypatch):
    import orthoedit.export.gguf as stage

    model = tmp_path / "edited"
    shutil.copytree(edited, model)
    monkeypatch.setattr(stage, "quantize", _fake_quantize)
    tools["llama_cpp"] = True
    before = folder_digest(model)
    result = cli("export", "gguf", model, "--type", "q4_k_m", "--type", "f16", "--llama-cpp", FAKE)
    assert result.exit_code == 0, result.output
    folder = model / "gguf"
    exported = read_export(folder)
    stem = f"{Path(Plan.load(model).source).name}-orthoedit"
    assert [(f.name, f.type) for f in exported.files] == [
        (f"{stem}-F16.gguf", "F16"),
        (f"{stem}-Q4_K_M.gguf", "Q4_K_M"),
    ]
    written = exported.record["files"]
    assert written[f"{stem}-Q4_K_M.gguf"]["from"] == "F32"  # the checkpoint's own float type
    assert written[f"{stem}-F16.gguf"]["by"] == "llama.cpp's converter"
    # the quantizer's F32 input is gone; the marker lets --overwrite replace the folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MARKER, RECORD, *(f.name for f in exported.files)]
    )
    assert f"{stem}-Q4_K_M.gguf" in result.output and "wrote" in result.output
    shutil.rmtree(folder)
    assert folder_digest(model) == before  # nothing else in the checkpoint changed
    cli("export", "gguf", model, "--type", "f16", "--llama-cpp", FAKE)
    again = cli("export", "gguf", model, "--type", "bf16", "--llama-cpp", FAKE)
    assert "already exists; pass --overwrite" in one_line_error(again)
    replaced = cli("export", "gguf", model, "--type", "bf16", "--llama-cpp", FAKE, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert [f.type for f in read_export(folder).files] == ["BF16"]


def test_a_file_whose_header_says_another_type_is_refused(edited, tools, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CONVERTER", "mislabel")
    cfg = ExportGgufConfig(model_dir=edited, types=["BF16"], out=tmp_path / "g", llama_cpp=FAKE)
    from orthoedit.errors import CheckFailedError

    with pytest.raises(CheckFailedError, match="is F16 by its header, not BF16"):
        export_gguf(cfg, log=lambda m: None)
    assert not (tmp_path / "g").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(not llama_cpp.installed("llama_cpp"), reason="needs llama-cpp-python")
def test_llama_cpp_quantizes_from_the_float_file(tiny_model, tmp_path, tools):
    """llama.cpp's own quantizer, on a converted tiny model with rows of 256 (K-quant blocks):
    the file says Q4_K_M by its header and transformers loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    from orthoedit.model.direction import save_direction

    model = tmp_path / "edited"
    d = save_direction(tmp_path / "d.safetensors", torch.randn(256), {"source": "test"})
    apply(ApplyConfig(model=str(tiny_model("qwen2", hidden=256)), direction=[d], out=model))
    cfg = ExportGgufConfig(model_dir=model, types=["Q4_K_M", "Q6_K"], llama_cpp=FAKE, name="t")
    exported = export_gguf(cfg, log=lambda m: None)
    assert [(f.name, f.type) for f in exported.files] == [
        ("t-Q4_K_M.gguf", "Q4_K_M"),
        ("t-Q6_K.gguf", "Q6_K"),
    ]
    assert exported.record["quantizer"].startswith("llama.cpp's quantizer from llama-cpp-python")
    loaded = AutoModelForCausalLM.from_pretrained(model / "gguf", gguf_file="t-Q4_K_M.gguf")
    assert loaded.config.hidden_size == 256


# --- the pinned converter ----------------------------------------------------------------------


def _sdist(path: Path) -> Path:
    """An sdist laid out as llama-cpp-python's, with more than the converter in it."""
    files = {
        "PKG-INFO": "Name: llama_cpp_python\nVersion: 0.3.36\n",
        "vendor/llama.cpp/convert_hf_to_gguf.py": "print('converter')\n",
        "vendor/llama.cpp/LICENSE": "MIT\n",
        "vendor/llama.cpp/conversion/__init__.py": "",
        "vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
        "vendor/llama.cpp/ggml/src/ggml.c": "int main;\n",
        "llama_cpp/__init__.py": "",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


def test_fetch_checks_the_pin_and_keeps_only_the_converter(tmp_path, monkeypatch):
    sdist = _sdist(tmp_path / llama_cpp.SDIST)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()

    def download(dest: Path) -> Path:
        (dest / llama_cpp.SDIST).write_bytes(sdist.read_bytes())
        return dest / llama_cpp.SDIST

    monkeypatch.setattr(llama_cpp, "download_sdist", download)
    cache = tmp_path / "cache"
    target = cache / "llama-cpp-python-0.3.36"
    with pytest.raises(BadInputError, match="not the pinned"):
        llama_cpp.fetch_converter(target, log=lambda m: None)
    assert not target.exists() and list(cache.iterdir()) == []
    monkeypatch.setattr(llama_cpp, "SDIST_SHA256", digest)
    assert llama_cpp.fetch_converter(target, log=lambda m: None) == target
    kept = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert kept == [
        "LICENSE",
        "conversion/__init__.py",
        "convert_hf_to_gguf.py",
        "gguf-py/gguf/__init__.py",
    ]
    monkeypatch.setattr(llama_cpp, "download_sdist", lambda dest: pytest.fail("fetched again"))
    assert llama_cpp.fetch_converter(target, log=lambda m: None) == target
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the cache is $XDG_CACHE_HOME/orthoedit
    monkeypatch.delenv(llama_cpp.ENV, raising=False)
    cache.rename(tmp_path / "orthoedit")
    found = llama_cpp.find_converter(None, log=lambda m: None)
    assert found.script == tmp_path / "orthoedit" / target.name / llama_cpp.SCRIPT
    assert "(PyPI sdist, sha256" in found.origin


def test_a_given_converter_folder_or_sdist(tmp_path, monkeypatch):
    with tarfile.open(_sdist(tmp_path / "s.tar.gz")) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "llama_cpp_python-0.3.36"
    found = llama_cpp.find_converter(root)
    assert found.script == root / "vendor" / "llama.cpp" / llama_cpp.SCRIPT
    assert found.origin == "llama.cpp's converter from llama-cpp-python 0.3.36 (sdist)"
    monkeypatch.setenv(llama_cpp.ENV, str(FAKE))
    found = llama_cpp.find_converter(None)
    assert found.script == FAKE / llama_cpp.SCRIPT
    assert str(FAKE) not in found.origin  # the record is published: no local paths
    monkeypatch.setenv(llama_cpp.ENV, str(tmp_path / "nowhere"))
    with pytest.raises(BadInputError, match=r"\$ORTHOEDIT_LLAMA_CPP .*no convert_hf_to_gguf.py"):
        llama_cpp.find_converter(None)


# --- the recipe stage ---------------------------------------------------------------------------


def test_recipe_stage_exports_beside_the_model_and_publish_takes_it(
    tiny_model, direction_file, tools, tmp_path
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_model('llama')}\ndirection: {direction_file}\nverify: null\n"
        f"gguf: {{types: [f16], llama_cpp: {FAKE}}}\n"
        "publish: {repo_id: acme/tiny-llama-orthoedit, dry_run: true}\n"
    )
    out = tmp_path / "run"
    first = cli("run", recipe, "--out", out)
    assert first.exit_code == 0, first.output
    (gguf_file,) = (out / "gguf").glob("*.gguf")
    state = json.loads((out / "run.json").read_text())
    assert state["stages"]["gguf"]["files"] == {gguf_file.name: "F16"}
    files = json.loads((out / "publish.json").read_text())["files"]
    assert f"gguf/{gguf_file.name}" in files and f"gguf/{RECORD}" in files
    again = cli("run", recipe, "--out", out)
    assert again.exit_code == 0 and "gguf: up to date, skipped" in again.stderr
