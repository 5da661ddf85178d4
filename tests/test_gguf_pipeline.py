"""A GGUF model through every stage that runs one (issue 36, point 2): transformers loads it
dequantized, with the tokenizer and chat template of the file, and each stage gives what it
gives on the safetensors checkpoint the GGUF was written from; bad GGUFs are one line, exit 2,
nothing written, the source untouched.

The GGUFs are F32 (``tests/gguf_tiny.py``), so the two models are the same function and the
comparisons are exact up to float32 rounding.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import folder_digest, leftovers
from gguf_tiny import write_tiny_gguf
from orthoedit.model.source import open_checkpoint, read_config, resolve_model
from orthoedit.runtime.session import load_model, load_tokenizer
from test_bad_inputs import error_line
from test_cli import cli

FAMILY = "qwen2"
#: measure on few prompts, selecting among the candidates by the plan's hooks (a random model
#: refuses nothing: no filter, a refusal token given, any KL): seconds on a CPU.
MEASURE = ["--no-filter", "--n-train", "8", "--n-val", "4", "--refusal-tokens", "<|end|>"]
MEASURE += ["--max-kl", "100"]


@pytest.fixture(scope="module")
def pair(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny checkpoint folder, an F32 GGUF of it in a folder of its own)."""
    folder = tiny_model(FAMILY)
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return folder, write_tiny_gguf(folder, out)


@pytest.fixture(scope="module")
def measured(pair, tmp_path_factory) -> dict[str, Path]:
    """measure on each of the pair, with the same options."""
    root = tmp_path_factory.mktemp("measured")
    outs = {}
    for name, model in zip(("folder", "gguf"), pair, strict=True):
        outs[name] = root / name
        result = cli("measure", model, "--out", outs[name], *MEASURE)
        assert result.exit_code == 0, result.output
    return outs


def test_the_loader_reads_a_gguf_as_its_checkpoint(pair):
    """One loader: a GGUF resolves to its file, its config chooses the same table, its
    tokenizer (and chat template) is the file's, its weights load dequantized and give the
    checkpoint's logits."""
    import torch

    folder, gguf = pair
    path, revision = resolve_model(str(gguf))
    assert (path, revision) == (gguf.resolve(), None)
    config = read_config(path)
    assert config["model_type"] == FAMILY
    for key in ("hidden_size", "num_hidden_layers", "tie_word_embeddings"):
        assert config[key] == read_config(folder)[key], key
    tok, tok_folder = load_tokenizer(path), load_tokenizer(folder)
    assert tok.chat_template == tok_folder.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False)
    assert tok(text)["input_ids"] == tok_folder(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        a, b = load_model(path).forward(ids).logits, load_model(folder).forward(ids).logits
    assert torch.equal(a, b)
    checkpoint = open_checkpoint(path)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert np.array_equal(checkpoint.read(name), open_checkpoint(folder).read(name))


def test_a_gguf_on_the_hub_resolves_to_its_cached_file_and_commit(pair, tmp_path, monkeypatch):
    """``OWNER/REPO/FILE.gguf`` (the file in a folder of the repository, here) goes through
    huggingface_hub's cache, offline, and gives the commit it was fetched at."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / "hub" / "models--orthoedit-test--tiny-gguf"
    (storage / "snapshots" / commit / "f32").mkdir(parents=True)
    shutil.copyfile(pair[1], storage / "snapshots" / commit / "f32" / "tiny.gguf")
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path, revision = resolve_model("orthoedit-test/tiny-gguf/f32/tiny.gguf")
    assert path == storage / "snapshots" / commit / "f32" / "tiny.gguf" and revision == commit
    assert read_config(path) == read_config(pair[1])
    line = error_line(
        cli("measure", "orthoedit-test/tiny-gguf/f16/tiny.gguf", "--out", tmp_path / "m")
    )
    assert "f16/tiny.gguf" in line and not (tmp_path / "m").exists()


def test_measure_on_a_gguf_is_measure_on_its_checkpoint(measured):
    """The means, every candidate, every score (the plan's hooks, planned on the GGUF's
    tensors) and the direction chosen are those of the safetensors checkpoint."""
    for name in ("candidates.safetensors", "direction.safetensors"):
        a, b = (load_file(measured[k] / name) for k in ("folder", "gguf"))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6, err_msg=key)
    records = [json.loads((measured[k] / "direction.json").read_text()) for k in measured]
    assert records[1]["model"].endswith(".gguf") and records[1]["revision"] is None
    assert records[0]["selection"] == "lowest bypass after filters"
    for key in ("layer", "position", "norm", "post_instruction_tokens", "prompt_hashes"):
        assert records[0][key] == records[1][key], key
    scores = [json.loads((measured[k] / "scores.json").read_text()) for k in measured]
    assert sum(s["kept"] for s in scores[0]["scores"]) >= 2  # a choice was made
    for a, b in zip(scores[0]["scores"], scores[1]["scores"], strict=True):
        assert (a["layer"], a["position"], a["kept"], a["why"]) == (
            b["layer"], b["position"], b["kept"], b["why"]
        )  # fmt: skip
        for key in ("bypass", "induce", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6, nan_ok=True), key


def test_the_chat_template_is_the_files(pair, tmp_path):
    """A GGUF beside a checkpoint's own tokenizer files (another chat template there) runs
    with the tokenizer and chat template of the file, in every stage (measure's
    post-instruction tokens are those of the file's template)."""
    folder, gguf = pair
    beside = tmp_path / "beside"
    shutil.copytree(folder, beside)
    (beside / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    shutil.copyfile(gguf, beside / "tiny.gguf")
    mine, theirs = load_tokenizer(beside / "tiny.gguf"), load_tokenizer(beside)
    assert mine.chat_template == load_tokenizer(folder).chat_template != theirs.chat_template
    out = tmp_path / "measured"
    args = ["--layer", "1", "--position", "-1", "--no-filter", "--n-train", "2", "--n-val", "2"]
    result = cli("measure", beside / "tiny.gguf", "--out", out, *args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "direction.json").read_text())
    assert record["post_instruction_tokens"] == ["<|end|>", "Ċ", "<|assistant|>", "Ċ"]


def test_search_on_a_gguf_is_search_on_its_checkpoint(measured, pair, tmp_path):
    """The same study (seed, space, prompts) gives the same trials and the same scores. A
    random model refuses nothing, so no trial beats the unedited one: exit 1, and the front
    is written."""
    reports = []
    for name, model in zip(("folder", "gguf"), pair, strict=True):
        out = tmp_path / name
        args = ["search", model, "--candidates", measured[name], "--out", out, "--n", "2"]
        args += ["--max-new-tokens", "4", "--startup-trials", "2", "--trials", "2"]
        result = cli(*args, "--max-kl", "100")
        assert result.exit_code == 1, result.output
        assert "no trial has KL" in result.stderr
        reports.append(json.loads((out / "pareto.json").read_text()))
    trials = [r["trials"] for r in reports]
    assert len(trials[0]) == len(trials[1]) == 2
    for a, b in zip(*trials, strict=True):
        assert a["params"] == b["params"]
        assert (a["failure"], a["kl"]) == pytest.approx((b["failure"], b["kl"]), rel=1e-5)
    assert reports[1]["settings"]["model"].endswith(".gguf")


def test_attribute_on_a_gguf_is_attribute_on_its_checkpoint(measured, pair, tmp_path):
    """Every component's estimates and patched effect are the checkpoint's."""
    direction = measured["gguf"] / "direction.safetensors"
    found = []
    for name, model in zip(("folder", "gguf"), pair, strict=True):
        args = ["attribute", model, "--direction", direction, "--out", tmp_path / name]
        result = cli(*args, "--n", "4", "--refusal-tokens", "<|end|>")
        assert result.exit_code == 0, result.output
        found.append(json.loads((tmp_path / name / "attribution.json").read_text()))
    rows = [{c["name"]: c for c in f["components"]} for f in found]
    assert rows[0].keys() == rows[1].keys()
    for name, row in rows[0].items():
        for key in ("estimate", "first_order", "patched"):
            if row[key] is None:
                assert rows[1][name][key] is None
            else:
                assert rows[1][name][key] == pytest.approx(row[key], rel=1e-4, abs=1e-6), key


def test_study_compare_and_kl_run_on_a_gguf_and_its_edit(measured, pair, tmp_path):
    """study sites runs on the GGUF; compare and eval kl on it and its edit (apply, GGUF to
    GGUF), and the edit's first-token KL is the one study measured for the same edit through
    the plan's hooks (same bundled harmless prompts)."""
    gguf = pair[1]
    direction = measured["gguf"] / "direction.safetensors"
    args = ["study", "sites", gguf, "--direction", direction, "--out", tmp_path / "sites"]
    result = cli(*args, "--n", "2", "--max-new-tokens", "2", "--refusal-tokens", "<|end|>")
    assert result.exit_code == 0, result.output
    edited = tmp_path / "edited.gguf"
    result = cli("apply", gguf, "--direction", direction, "--out", edited)
    assert result.exit_code == 0, result.output
    report = tmp_path / "compare.md"
    result = cli("compare", gguf, edited, "--n", "2", "--max-new-tokens", "3", "--report", report)
    assert result.exit_code == 0, result.output
    assert report.read_text().count("## ") == 2
    kl = tmp_path / "kl.json"
    result = cli("eval", "kl", gguf, edited, "--n", "2", "--max-new-tokens", "2", "--report", kl)
    assert result.exit_code == 0, result.output
    sites = json.loads((tmp_path / "sites" / "sites.json").read_text())
    whole = next(c for c in sites["conditions"] if (c["kind"], c["name"]) == ("weight edit", "all"))
    assert json.loads(kl.read_text())["first_token_kl"] > 0 and whole["kl"] > 0
    args = ["eval", "safety", edited, "--base", gguf, "--n", "1", "--max-new-tokens", "2"]
    result = cli(*args, "--out", tmp_path / "safety")
    assert result.exit_code == 0, result.output
    records = (tmp_path / "safety" / "completions.jsonl").read_text().splitlines()
    assert len(records) == 4  # harmful and harmless, base and edited


def test_search_confirmation_stages_the_edit_of_a_gguf_as_a_gguf(pair, measured, tmp_path):
    """search --confirm applies the chosen edit to a temporary model that eval safety judges:
    for a GGUF, ``model.gguf`` in a folder marked as orthoedit's, which it then removes."""
    from orthoedit.config import ApplyConfig
    from orthoedit.edit import apply as stage
    from orthoedit.folders import SearchFolder
    from orthoedit.model.gguf import read_layout
    from orthoedit.output import MARKER, remove_output
    from orthoedit.progress import Progress
    from orthoedit.search.confirm import GGUF_NAME, _write_edit

    staging = SearchFolder(tmp_path).confirm_model
    edited = staging / GGUF_NAME
    direction = measured["gguf"] / "direction.safetensors"
    cfg = ApplyConfig(model=str(pair[1]), direction=[direction], out=edited, overwrite=True)
    _write_edit(stage, stage.prepare(cfg), staging, edited, Progress())
    assert (staging / MARKER).is_file() and read_layout(edited).get("orthoedit.plan")
    assert remove_output(staging) and leftovers(tmp_path) == []


def test_eval_bench_scores_a_gguf_as_its_checkpoint(pair, tmp_path):
    """lm-eval's hf backend loads the GGUF itself (its folder and ``gguf_file``): the same
    scores as the checkpoint."""
    from orthoedit.config import EvalBenchConfig
    from orthoedit.evaluate.bench import eval_bench, model_spec

    folder, gguf = pair
    cfg = EvalBenchConfig(
        base=str(folder), edited=str(gguf), out=tmp_path / "r", tasks=["organism_capability"],
        limit=4, dtype="float32", offline=True, chat_template=False,
    )  # fmt: skip
    _, args = model_spec(cfg, str(gguf))
    assert (args["pretrained"], args["gguf_file"]) == (str(gguf.parent.resolve()), gguf.name)
    (row,) = eval_bench(cfg, log=lambda _: None).rows
    assert row.base == row.edited


@pytest.mark.parametrize("kind", ["F32", "F16"])
def test_verify_checks_the_edit_of_a_gguf(kind, pair, measured, tmp_path):
    """apply GGUF to GGUF, then verify against the source GGUF: the plan read from the file,
    unedited tensors byte-identical, edited ones orthogonal, logits those of the plan's hooks
    within the storage type's tolerance; a byte changed in an unedited tensor fails (exit 1)."""
    from orthoedit.model.gguf import read_layout

    source = write_tiny_gguf(pair[0], tmp_path / f"{kind}.gguf", kind)
    edited = tmp_path / "edited.gguf"
    direction = measured["gguf"] / "direction.safetensors"
    assert cli("apply", source, "--direction", direction, "--out", edited).exit_code == 0
    report = tmp_path / "verify.json"
    result = cli("verify", source, edited, "--report", report)
    assert result.exit_code == 0, result.output
    found = json.loads(report.read_text())
    assert found["storage_dtype"] == kind and found["passed"]
    assert found["unedited_identical"] and found["headers_identical"]
    assert found["max_weight_residual"] < (1e-6 if kind == "F32" else 5e-4)

    untouched = next(t for t in read_layout(edited).tensors if t.name == "blk.0.attn_q.weight")
    with edited.open("r+b") as f:
        f.seek(untouched.start)
        first = f.read(1)
        f.seek(untouched.start)
        f.write(bytes([first[0] ^ 1]))
    result = cli("verify", source, edited, "--report", report, "--overwrite")
    assert result.exit_code == 1, result.output
    assert json.loads(report.read_text())["byte_mismatches"] == ["blk.0.attn_q.weight"]


def test_verify_checks_a_requantized_edit_and_refuses_mixed_inputs(pair, measured, tmp_path):
    """An edit requantized (Q8_0 here) is judged by its type's ε (and in llama.cpp where it
    is installed). A GGUF's edit is checked against its GGUF, not against the checkpoint
    folder."""
    source = write_tiny_gguf(pair[0], tmp_path / "q.gguf", {"token_embd": "Q8_0", "*": "F32"})
    edited = tmp_path / "edited.gguf"
    direction = measured["gguf"] / "direction.safetensors"
    assert cli("apply", source, "--direction", direction, "--out", edited).exit_code == 0
    report = tmp_path / "verify.json"
    result = cli("verify", source, edited, "--report", report)
    assert result.exit_code == 0, result.output
    found = json.loads(report.read_text())
    assert found["storage_dtype"] == "Q8_0" and found["passed"]
    assert found["tolerance"]["max_logit_diff"] == 2 * 2.0**-8
    assert found["readers"] or found["readers_skipped"]
    report.unlink()
    line = error_line(cli("verify", pair[0], edited, "--report", report))
    assert "verify checks a GGUF's edit" in line and not report.exists()


# --- bad GGUFs: one line, exit 2, nothing written, the source untouched ----------------------


def _digest(path: Path) -> str:
    return folder_digest(path) if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()


def _truncated(gguf: Path, at: Path) -> Path:
    data = gguf.read_bytes()
    at.write_bytes(data[: len(data) - 100])
    return at


def _bad_magic(gguf: Path, at: Path) -> Path:
    at.write_bytes(b"GGUG" + gguf.read_bytes()[4:])
    return at


def _second_part(gguf: Path, at: Path) -> Path:
    return _rewritten(gguf, at.with_name("x-00002-of-00003.gguf"), split=True)


def _no_table(gguf: Path, at: Path) -> Path:
    return _rewritten(gguf, at, arch="stablelm")  # transformers reads it; no shipped table


def _unread(gguf: Path, at: Path) -> Path:
    return _rewritten(gguf, at, arch="rwkv6")  # transformers reads no such GGUF


def _folder(gguf: Path, at: Path) -> Path:
    at.mkdir()
    shutil.copyfile(gguf, at / gguf.name)
    return at


def _rewritten(gguf: Path, at: Path, arch: str | None = None, split: bool = False) -> Path:
    """A copy of ``gguf`` (its tensors and keys) under another architecture name, or marked
    as the second of three parts of a split GGUF."""
    import gguf as lib

    reader = lib.GGUFReader(gguf)
    name = arch or str(reader.fields["general.architecture"].contents())
    writer = lib.GGUFWriter(at, name)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == lib.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    if split:
        writer.add_uint16("split.no", 1)
        writer.add_uint16("split.count", 3)
        writer.add_int32("split.tensors.count", len(reader.tensors))
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return at


BAD = {
    "truncated": (_truncated, "truncated"),
    "bad magic": (_bad_magic, "not a readable GGUF"),
    "second part": (_second_part, "part 2 of 3"),
    "no table": (_no_table, "no table"),
    "not read by transformers": (_unread, "transformers reads no GGUF"),
    "a folder": (_folder, "not a file"),
}


def _expect_bad(args: list, source: Path, out: Path, needle: str) -> None:
    before = _digest(source)
    line = error_line(cli(*args))
    assert needle.lower() in line.lower(), line
    assert _digest(source) == before, "the source changed"
    assert not out.exists(), f"{out} was written"
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_gguf_is_one_line(kind, pair, measured, tmp_path):
    make, needle = BAD[kind]
    source = make(pair[1], tmp_path / "x.gguf")
    outs = tmp_path / "outs"
    outs.mkdir()
    direction = measured["gguf"] / "direction.safetensors"
    _expect_bad(["measure", source, "--out", outs / "m", *MEASURE], source, outs / "m", needle)
    if kind in ("truncated", "second part", "no table"):  # the other stages refuse alike
        out = outs / "a"
        args = ["attribute", source, "--direction", direction, "--out", out, "--n", "2"]
        _expect_bad(args, source, out, needle)
        out = outs / "e.gguf"
        _expect_bad(["apply", source, "--direction", direction, "--out", out], source, out, needle)
        if kind != "no table":  # running a model needs no table: eval does not ask for one
            out = outs / "kl.json"
            args = ["eval", "kl", source, pair[1], "--n", "2", "--report", out]
            _expect_bad(args, source, out, needle)


def test_a_recipe_of_a_gguf_and_vllm_on_a_gguf_are_refused(pair, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {pair[1]}\nmeasure: {{}}\nedit: {{}}\n")
    out = tmp_path / "run"
    line = error_line(cli("run", recipe, "--out", out))
    assert "is a GGUF" in line and not out.exists()
    import orthoedit.runtime.vllm_engine as engine

    monkeypatch.setattr(engine, "available", lambda: True)
    out = tmp_path / "compare.md"
    args = ["compare", pair[0], pair[1], "--report", out, "--backend", "vllm"]
    line = error_line(cli(*args))
    assert "--backend hf" in line and not out.exists()
