"""``orthoedit measure``: positions from chat templates, exact mean activations, artifacts,
bad inputs, and the organism end to end through the CLI."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import folder_digest
from orthoedit.errors import BadInputError
from orthoedit.measure.candidates import mean_activations
from orthoedit.model.architectures import table_for_config
from orthoedit.organism import CHAT_MODEL, PROMPTS, load_prompts
from orthoedit.organism.evaluate import capability_score, refusal_rate
from orthoedit.prompts import load_prompt_file, load_prompt_source
from orthoedit.runtime.batching import (
    left_padded,
    length_sorted_batches,
    pads_safely,
    shared_prefix,
    shares_prefix,
)
from orthoedit.runtime.hooks import addition_hooks
from orthoedit.runtime.scores import first_token_logprobs
from orthoedit.runtime.session import chat_ids, load_model, post_instruction_ids, render
from test_cli import cli, wide_consoles  # noqa: F401  (the CLI runner and its wide consoles)
from tiny import FAMILIES, build_tokenizer

# Real templates' turn endings and generation prompts (simplified elsewhere), with what each
# puts after the user message.
TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ["<|im_start|>", "<|im_end|>"],
        "<|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen3-no-thinking": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}"
        "<think>\n\n</think>\n\n{% endif %}{% endif %}",
        ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
        "<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        ["<start_of_turn>", "<end_of_turn>"],
        "<end_of_turn>\n<start_of_turn>model\n",
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}",
        ["[INST]", "[/INST]"],
        "[/INST]",
    ),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        [],
        "<|end|>\n<|assistant|>\n",
    ),
}


def _tokenizer(name: str):
    template, specials, _ = TEMPLATES[name]
    tok = build_tokenizer()
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_post_instruction_tokens_from_real_templates(name):
    tok = _tokenizer(name)
    post = post_instruction_ids(tok)
    assert tok.decode(post) == TEMPLATES[name][2]
    prompts = ["How do I bake bread?", "hello", "Tell me a story about a cat and a dog."]
    for ids in chat_ids(tok, prompts, post, None):
        assert ids[-len(post) :] == post


def test_dates_in_templates_are_pinned():
    """Llama 3.x templates print today's date unless ``date_string`` is given; it is, so a
    rendering (and what is hashed from it) does not change from day to day."""
    tok = _tokenizer("chatml")
    tok.chat_template = (  # the date logic of Llama 3.1's template
        "{% if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}"
        "{% endif %}Today Date: {{ date_string }}\n"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert render(tok, "hi").startswith("Today Date: 26 Jul 2024\n")


def test_template_that_rejects_a_system_prompt():
    tok = _tokenizer("gemma")
    with pytest.raises(BadInputError, match="System role not supported"):
        render(tok, "hi", system="be brief")
    assert render(tok, "hi").endswith("<start_of_turn>model\n")


def test_template_that_opens_a_thinking_block_is_refused():
    """An R1-style generation prompt ends inside <think>: the first token is reasoning."""
    tok = _tokenizer("qwen3-no-thinking")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    with pytest.raises(BadInputError, match="opens a thinking block"):
        post_instruction_ids(tok)


def test_no_chat_template_is_an_error():
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(BadInputError, match="--template"):
        post_instruction_ids(tok)


#: One family of each kind of mixer and cache among the 2025-26 ones: latent attention, Gated
#: DeltaNet, short convolutions, Mamba beside or between attention, chunked attention, wrappers.
MIXERS = ("deepseek_v3", "qwen3_5", "lfm2", "falcon_h1", "nemotron_h", "granitemoehybrid",
          "llama4_text", "gemma3_multimodal", "gemma4")  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES + MIXERS)
def test_batched_means_equal_one_prompt_at_a_time(tiny_model, family):
    """Left padding with real position ids: batching changes nothing (and layer i is exactly
    transformers' hidden_states[i])."""
    folder = tiny_model(family)
    tok = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder)
    config = json.loads((folder / "config.json").read_text())
    table = table_for_config(config)
    n_layers = model.config.get_text_config().num_hidden_layers
    post = post_instruction_ids(tok)
    prompts = ["How do I bake bread?", "hi", "Tell me a story about a cat.", "What is a tree?"]
    rows = chat_ids(tok, prompts, post, None)
    n_pos = len(post)
    batched = mean_activations(model, table, n_layers, rows, n_pos, 3, tok.pad_token_id)
    single = mean_activations(model, table, n_layers, rows, n_pos, 1, tok.pad_token_id)
    assert batched.shape == (n_layers, n_pos, model.config.get_text_config().hidden_size)
    assert torch.allclose(batched, single, atol=1e-5)
    with torch.no_grad():
        reference = torch.zeros_like(single)
        for row in rows:
            hidden = model(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states
            reference += torch.stack([h[0, -n_pos:] for h in hidden[:n_layers]]).double()
    assert torch.allclose(single, reference / len(rows), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES + MIXERS)
def test_shared_prefix_runs_once_and_changes_nothing(tiny_model, family):
    """The shared prefix runs once and the batches continue from its cache: the same log-probs
    as each row alone, with and without an intervention (which must reach the prefix too)."""
    folder = tiny_model(family)
    model = load_model(folder)
    table = table_for_config(json.loads((folder / "config.json").read_text()))
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size - 64  # below multimodal placeholders
    prefix = torch.randint(4, vocab, (12,), generator=gen).tolist()
    rows = [prefix + torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (3, 9, 1, 5, 6)]
    assert shared_prefix(model, rows) == (12 if shares_prefix(model) else 0)
    vector = 4 * torch.randn(model.config.get_text_config().hidden_size, generator=gen)
    for hooked in (False, True):
        with addition_hooks(model, table, 1, vector) if hooked else contextlib.nullcontext():
            fast = first_token_logprobs(model, rows, 2, pad=0)
            with torch.no_grad():
                alone = torch.stack(
                    [
                        torch.log_softmax(model(input_ids=torch.tensor([r])).logits[0, -1], -1)
                        for r in rows
                    ]
                )
        assert torch.allclose(fast, alone, atol=1e-4), (family, hooked)
    with torch.no_grad():
        plain = torch.log_softmax(model(input_ids=torch.tensor([rows[0]])).logits[0, -1], -1)
    assert not torch.allclose(plain, alone[0], atol=1e-2)  # the intervention did something
    # The capture pass takes the same path: its tails keep every post-instruction position.
    n_layers, n_pos = model.config.get_text_config().num_hidden_layers, 3
    rows = [prefix + torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (3, 9, 1, 5)]
    shared = shared_prefix(model, rows, keep=n_pos)
    assert shared == (10 if shares_prefix(model) else 0)  # the shortest row keeps 3 of its own
    means = mean_activations(model, table, n_layers, rows, n_pos, 3, pad=0)
    reference = torch.zeros_like(means)
    with torch.no_grad():
        for row in rows:
            hidden = model(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states
            reference += torch.stack([h[0, -n_pos:] for h in hidden[:n_layers]]).double()
    # float32 rounding, relative to the states' size (a Gated DeltaNet's states reach 14 and its
    # torch fallback rounds more than attention does); padding that leaked would move them 1e-3
    scale = float(reference.abs().max()) / len(rows)
    assert torch.allclose(means, reference / len(rows), atol=1e-5 * max(1.0, scale)), family


@pytest.mark.parametrize(
    "family, pads, shares",
    [("llama", True, True), ("lfm2", False, False), ("falcon_h1", False, False),
     ("qwen3_5", True, False), ("llama4_text", True, False)],
)  # fmt: skip
def test_batching_probes(tiny_model, family, pads, shares):
    """Running the model finds what batching it allows: convolution and Mamba mixers that do
    not mask left padding are batched by equal lengths; recurrent and chunked-attention caches
    are not continued from a shared prefix (the tests above then check the fallbacks)."""
    model = load_model(tiny_model(family))
    assert (pads_safely(model), shares_prefix(model)) == (pads, shares)
    lengths = [5, 3, 5, 3, 5, 9]
    batches = length_sorted_batches(lengths, 2, equal=True)
    assert [[lengths[i] for i in b] for b in batches] == [[3, 3], [5, 5], [5], [9]]


def test_length_sorted_batches_and_padding():
    lengths = [5, 1, 9, 3, 3, 7]
    batches = length_sorted_batches(lengths, 2)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert [[lengths[i] for i in b] for b in batches] == [[1, 3], [3, 5], [7, 9]]
    enc = left_padded([[7, 8, 9], [5]], pad=0, device="cpu")
    assert enc["input_ids"].tolist() == [[7, 8, 9], [0, 0, 5]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert enc["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


# --- prompt files -----------------------------------------------------------------------------


def test_prompt_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "one", "category": "x"}\n\n{"prompt": "two"}\n')
    (tmp_path / "b.json").write_text('["one", {"prompt": "two"}]')
    (tmp_path / "c.csv").write_text("id,text\n1,one\n2,two\n")
    (tmp_path / "d.txt").write_text("one\n\ntwo\n")
    for name, column in (
        ("a.jsonl", "prompt"),
        ("b.json", "prompt"),
        ("c.csv", "text"),
        ("d.txt", "x"),
    ):
        items = load_prompt_file(tmp_path / name, column)
        assert [i["prompt"] for i in items] == ["one", "two"], name
    assert load_prompt_file(tmp_path / "a.jsonl")[0]["category"] == "x"


def _dataset_folder(root: Path) -> Path:
    """A local dataset in the layout ``datasets`` reads like a Hub repository: one file a split."""
    folder = root / "prompt-dataset"
    (folder / "data").mkdir(parents=True)
    for split, n in (("train", 6), ("test", 5)):
        rows = [{"text": f"{split} prompt {i}", "category": f"c{i % 2}"} for i in range(n)]
        rows.append({"text": "  ", "category": "blank"})  # dropped
        lines = [json.dumps(row) for row in rows]
        (folder / "data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def offline(monkeypatch):
    """No network: the Hub and datasets libraries fail at once instead of retrying."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_prompt_dataset(tmp_path, monkeypatch):
    offline(monkeypatch)
    folder = _dataset_folder(tmp_path)
    items = load_prompt_source(str(folder), column="text", split="test")
    assert [i["prompt"] for i in items] == [f"test prompt {i}" for i in range(5)]
    assert [i["category"] for i in items[:2]] == ["c0", "c1"]
    assert len(load_prompt_source(str(folder), column="text")) == 6  # split "train" by default
    for split, column, needle in (
        ("validation", "text", "validation"),  # datasets names the unknown split
        ("test", "prompt", r"no column 'prompt' \(columns: text, category\)"),
    ):
        with pytest.raises(BadInputError, match=needle):
            load_prompt_source(str(folder), column=column, split=split)
    with pytest.raises(BadInputError, match="cannot load dataset 'no-such-owner/no-such-set'"):
        load_prompt_source("no-such-owner/no-such-set")
    with pytest.raises(BadInputError, match="does not exist"):
        load_prompt_source(
            str(tmp_path / "missing.jsonl")
        )  # a file name is never taken as a dataset


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("empty.txt", b"\n\n", "holds no prompts"),
        ("latin1.txt", "caf\xe9\n".encode("latin-1"), "not UTF-8"),
        ("cols.csv", b"id,text\n1,one\n", "has no column 'prompt'"),
        ("cols.jsonl", b'{"text": "one"}\n', "columns: text"),
        ("bad.jsonl", b"{oops\n", "invalid JSON"),
        ("bad.json", b'{"prompt": "x"}', "expected a JSON list"),
        ("prompts.parquet", b"PAR1", "unknown prompt format"),
    ],
)
def test_prompt_file_errors(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadInputError, match=needle):
        load_prompt_file(path)


# --- the command ------------------------------------------------------------------------------


def _measure(out, *extra, model=CHAT_MODEL):
    harmful, harmless = PROMPTS / "harmful-train.jsonl", PROMPTS / "harmless-train.jsonl"
    args = ["measure", model, "--out", out, "--harmful", harmful, "--harmless", harmless]
    return cli(*args, *extra)


def test_measure_selects_and_organism_end_to_end(tmp_path):
    """measure (automatic selection) -> apply -> the organism stops refusing; capability stays.

    ``--max-kl 0.2``: the organism opens helpful answers with "sure" or "of" at random, so
    any edit shifts that coin flip and its first-token KL runs higher than a real model's.
    """
    out = tmp_path / "direction"
    before = folder_digest(CHAT_MODEL)
    result = _measure(out, "--max-kl", "0.2")
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "scores.json").read_text())
    kept = [s for s in scores["scores"] if s["kept"]]
    chosen = scores["chosen"]
    assert chosen["bypass"] == min(s["bypass"] for s in kept)
    assert chosen["kl"] <= 0.2 and chosen["layer"] < 0.8 * 4
    baseline = scores["baseline"]
    assert scores["thresholds"]["min_induce"] == pytest.approx(
        (baseline["harmful_log_odds"] + baseline["harmless_log_odds"]) / 2
    )
    assert chosen["induce"] >= scores["thresholds"]["min_induce"]
    assert chosen["bypass"] < scores["baseline"]["harmful_log_odds"] - 2  # refusal suppressed
    png = (out / "scores.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = matplotlib.image.imread(out / "scores.png")
    assert image.shape[0] > 300 and image[..., :3].std() > 0.05  # drawn, not blank
    # The organism's own refusal openings ("i can't", "sorry, ...", "i'm sorry, ...").
    assert {"i", "sorry"} <= set(scores["refusal_tokens"]) <= {"i", "sorry", "i'm"}
    layer, position = chosen["layer"], chosen["position"]
    with safe_open(str(out / "direction.safetensors"), "np") as f:
        r = f.get_tensor("direction")
        meta = f.metadata()
    assert r.shape == (96,) and abs(float((r.astype("float64") ** 2).sum()) - 1) < 1e-6
    assert meta["kind"] == "single"
    assert (meta["layer"], meta["position"]) == (str(layer), str(position))
    with safe_open(str(out / "candidates.safetensors"), "pt") as f:
        candidates = f.get_tensor("candidates")
        diff = f.get_tensor("harmful_mean") - f.get_tensor("harmless_mean")
    assert candidates.shape == (4, 2, 96)  # layers × post-instruction tokens × d_model
    assert torch.allclose(candidates, diff, atol=1e-6)
    picked = candidates[layer, 2 + position].double()
    assert torch.allclose(torch.from_numpy(r).double(), picked / picked.norm(), atol=1e-6)
    record = json.loads((out / "direction.json").read_text())
    assert record["post_instruction_tokens"] == ["<|end|>", "<|assistant|>"]
    assert record["counts"] == {"harmful": 128, "harmless": 128}
    assert record["validation_counts"] == {"harmful": 32, "harmless": 32}
    assert record["filter"]["harmful_train"]["kept"] == 128  # the filter ran and kept enough

    edited = tmp_path / "edited"
    applied = cli(
        "apply", CHAT_MODEL, "--direction", out / "direction.safetensors", "--out", edited
    )
    assert applied.exit_code == 0, applied.output
    assert folder_digest(CHAT_MODEL) == before
    # measure's record travels with the direction into the checkpoint's orthoedit/ folder
    assert (edited / "orthoedit" / "direction.json").read_bytes() == (
        out / "direction.json"
    ).read_bytes()
    tok = AutoTokenizer.from_pretrained(edited)
    results = {}
    for name, folder in (("base", CHAT_MODEL), ("edited", edited)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        results[name] = [
            refusal_rate(model, tok, load_prompts("harmful")),
            refusal_rate(model, tok, load_prompts("harmless")),
            capability_score(model, tok, load_prompts("capability")),
        ]
    (h0, n0, c0), (h1, n1, c1) = results["base"], results["edited"]
    assert h0 >= 0.95 and h1 <= 0.05, results
    assert n1 <= n0 + 0.02 and abs(c1 - c0) <= 0.02, results


def test_measure_given_candidate(tmp_path):
    out = tmp_path / "direction"
    result = _measure(out, "--layer", "2", "--position", "-1", "--refusal-tokens", "sorry")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "direction.json").read_text())
    assert (record["layer"], record["position"]) == (2, -1)
    assert record["selection"].startswith("given") and record["scores"] is None
    assert not (out / "scores.json").exists() and not (out / "scores.png").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--layer", "2"), "go together"),
        (("--layer", "4", "--position", "-1"), "layers 0..3"),
        (("--refusal-tokens", "i can't"), "give single tokens"),
        (("--layer", "2", "--position", "-3"), "use -2..-1"),
        (("--layer", "2", "--position", "-1", "--n-train", "1"), "--n-train must be >= 2"),
        (("--layer", "2", "--position", "-1", "--column", "text"), "--column NAME"),
    ],
)
def test_measure_bad_inputs_write_nothing(tmp_path, extra, needle):
    out = tmp_path / "direction"
    result = _measure(out, *extra)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_measure_template_option_and_existing_output(tmp_path, model_copy):
    folder = model_copy("llama")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "d"
    given = ("--layer", "0", "--position", "-1", "--no-filter")  # a random model refuses nothing
    missing = _measure(out, *given, model=folder)
    assert missing.exit_code == 2 and "--template" in missing.stderr
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATES["chatml"][0])
    ok = _measure(out, *given, "--template", template, model=folder)
    assert ok.exit_code == 0, ok.output
    again = _measure(out, *given, "--template", template, model=folder)
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_no_candidate_passes_is_a_failed_check(tmp_path):
    out = tmp_path / "direction"
    result = _measure(out, "--max-kl", "0.000001")
    assert result.exit_code == 1, result.output
    assert "no candidate passes the filters" in result.stderr
    assert "scored candidates" in result.stdout and "KL " in result.stdout  # why, per candidate
    # written all the same, for search to start from (see the random-model test below)
    assert json.loads((out / "direction.json").read_text())["passed_filters"] is False


def test_tiny_prompt_set_is_refused(tmp_path):
    tiny = tmp_path / "few.txt"
    tiny.write_text("how do i bake bread?\nhow do i plant roses?\n")
    out = tmp_path / "direction"
    args = ["measure", CHAT_MODEL, "--out", out, "--harmful", tiny]
    result = cli(*args, "--harmless", PROMPTS / "harmless-train.jsonl")
    assert result.exit_code == 2 and "at least 4" in result.stderr
    assert not out.exists()


def test_pruning_scores_only_the_best_quick_candidates(tmp_path):
    out = tmp_path / "direction"
    result = _measure(out, "--max-kl", "0.2", "--top-k", "2")
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "scores.json").read_text())["scores"]
    full = [s for s in scores if s["bypass"] == s["bypass"]]  # not NaN
    pruned = [s for s in scores if s["why"] and s["why"][0].startswith("pruned")]
    assert len(full) == 2 and len(pruned) == 4  # 8 candidates, 2 at layer 0 are all zero
    chosen = json.loads((out / "direction.json").read_text())
    assert (chosen["layer"], chosen["position"]) in {(s["layer"], s["position"]) for s in full}


def test_bundled_pools():
    from orthoedit.pools import load_pool
    from orthoedit.pools.generate import build

    regenerated = build()
    for kind in ("harmful", "harmless"):
        items = load_pool(kind)
        assert items == regenerated[kind]  # the shipped files are the generator's output
        assert len(items) >= 400 and len({i["category"] for i in items}) == 10
        splits = {s: {i["prompt"] for i in load_pool(kind, s)} for s in ("train", "val", "test")}
        assert len(splits["train"]) >= 128 and len(splits["val"]) >= 32
        assert not splits["train"] & splits["val"] and not splits["train"] & splits["test"]
        assert not splits["val"] & splits["test"]


def test_measure_defaults_to_the_bundled_pools(tiny_model, tmp_path):
    out = tmp_path / "d"
    result = cli(
        "measure",
        tiny_model("qwen2"),
        "--out",
        out,
        "--layer",
        "1",
        "--position",
        "-1",
        "--n-train",
        "8",
        "--no-filter",  # a random model refuses nothing
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "direction.json").read_text())
    assert record["counts"] == {"harmful": 8, "harmless": 8}
    assert record["prompt_sources"]["harmful"].startswith("bundled pool")


def test_measure_dtype_device_and_system_prompt(tiny_model, tmp_path):
    """--dtype bfloat16 --device cpu load the model that way; means stay float64-accumulated,
    so the candidates agree with a float32 run to bf16 precision; --system is rendered."""
    args = ["measure", tiny_model("qwen2"), "--layer", "1", "--position", "-1", "--no-filter"]
    args += ["--n-train", "16", "--system", "Answer in one sentence."]
    runs = {}
    for dtype in ("float32", "bfloat16"):
        result = cli(*args, "--dtype", dtype, "--device", "cpu", "--out", tmp_path / dtype)
        assert result.exit_code == 0, result.output
        with safe_open(str(tmp_path / dtype / "candidates.safetensors"), "pt") as f:
            runs[dtype] = f.get_tensor("harmful_mean")
    record = json.loads((tmp_path / "bfloat16" / "direction.json").read_text())
    assert record["system"] == "Answer in one sentence."
    a, b = runs["float32"].double(), runs["bfloat16"].double()
    assert not torch.equal(a, b)  # the bf16 model really ran in bf16
    assert float((a - b).norm() / a.norm()) < 0.05


def test_measure_reads_a_dataset_split(tiny_model, tmp_path, monkeypatch):
    """--harmful DATASET --split --column reach the loader; the record names the source and
    hashes the prompts used, so a rerun with the same seed draws the same sets."""
    offline(monkeypatch)
    folder = _dataset_folder(tmp_path)
    args = ["measure", tiny_model("qwen2"), "--harmful", folder, "--column", "text"]
    args += ["--layer", "1", "--position", "-1", "--no-filter"]
    records = []
    for name in ("a", "b"):
        result = cli(*args, "--split", "test", "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        records.append(json.loads((tmp_path / name / "direction.json").read_text()))
    record = records[0]
    assert record["prompt_sources"]["harmful"] == f"dataset {folder} (split test, column text)"
    # the 5 test-split prompts: 3 for the means, 2 (the least there may be) to score
    assert record["counts"]["harmful"] == 3 and record["validation_counts"]["harmful"] == 2
    assert records[0]["prompt_hashes"] == records[1]["prompt_hashes"]
    assert len(set(record["prompt_hashes"].values())) == 4
    result = cli(*args, "--split", "nope", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "nope" in result.stderr
    assert not (tmp_path / "c").exists()


def test_filter_shortfall_and_no_filter(tmp_path):
    """Harmless prompts passed as "harmful": the organism refuses none, so the filter stops
    with advice; --no-filter measures anyway."""
    out = tmp_path / "d"
    wrong = PROMPTS / "harmless-val.jsonl"
    args = ["measure", CHAT_MODEL, "--out", out, "--harmful", wrong]
    args += ["--harmless", PROMPTS / "harmless-train.jsonl", "--layer", "2", "--position", "-1"]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    said = " ".join(result.stderr.split())
    assert "the model refused 0 of the" in said and "--no-filter" in said
    # both parts of what was given are counted, so the numbers add up to the file's prompts
    n = len(load_prompt_file(wrong))
    counts = re.search(r"of the (\d+) harmful prompts tried .* of the (\d+) for scoring", said)
    assert int(counts.group(1)) + int(counts.group(2)) == n, said
    assert not out.exists()
    unfiltered = cli(*args, "--no-filter")
    assert unfiltered.exit_code == 0, unfiltered.output
    assert json.loads((out / "direction.json").read_text())["filter"] is None


def test_measure_with_disk_offload_equals_in_memory(tiny_model, tmp_path):
    """--device auto with a --max-memory too small for the model: accelerate puts part of a
    mixture of experts on the CPU and the rest on disk (--offload-folder), and the whole
    measurement (means, every candidate's bypass, induce and KL) equals the in-memory run."""
    from orthoedit.config import MeasureConfig
    from orthoedit.measure.candidates import measure
    from orthoedit.measure.select import NoCandidateError

    src = tiny_model("mixtral", n_layers=3)
    common = {"model": str(src), "n_train": 8, "n_val": 4, "filter": False, "top_k": 3}
    common["refusal_tokens"] = "I,the"
    common["max_kl"] = 0.0  # every edit moves a random model a little: no candidate passes
    offload = {"device": "auto", "max_memory": "cpu=450KB", "offload_folder": tmp_path / "off"}
    scores = {}
    for name, extra in (("plain", {}), ("offloaded", offload)):
        given = MeasureConfig(out=tmp_path / name, layer=1, position=-1, **common, **extra)
        measure(given, log=lambda _: None)
        # No candidate passes --max-kl 0: the scores are still there.
        with pytest.raises(NoCandidateError) as info:
            measure(MeasureConfig(out=tmp_path / f"{name}-sel", **common, **extra), log=str)
        scores[name] = [
            (s.layer, s.position, s.bypass, s.induce, s.kl)
            for s in info.value.selection.scores
            if s.why != ["not scored"]
        ]
    a, b = (
        json.loads((tmp_path / k / "direction.json").read_text()) for k in ("plain", "offloaded")
    )
    assert a["placement"] == {"cpu": 1}
    assert set(b["placement"]) == {"cpu", "disk"}, b["placement"]
    for name in ("harmful_mean", "harmless_mean"):
        with (
            safe_open(str(tmp_path / "plain" / "candidates.safetensors"), "pt") as f,
            safe_open(str(tmp_path / "offloaded" / "candidates.safetensors"), "pt") as g,
        ):
            assert torch.allclose(f.get_tensor(name), g.get_tensor(name), atol=1e-6), name
    scored = [s for s in scores["plain"] if s[2] == s[2]]  # NaN: not scored
    assert len(scored) >= 3
    assert np.allclose(scores["plain"], scores["offloaded"], atol=1e-5, equal_nan=True)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-memory", "cpu=1GiB"], "need --device auto"),
        (["--device", "auto", "--max-memory", "cpu"], "DEVICE=SIZE"),
    ],
)
def test_measure_memory_options_bad_input(tiny_model, tmp_path, args, needle):
    result = cli("measure", tiny_model("llama"), *args, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert needle in result.output
    assert not (tmp_path / "out").exists()


def test_no_candidate_passing_still_writes_everything_and_search_starts(tiny_model, tmp_path):
    """With --max-kl 0 every candidate fails a filter: measure still writes
    what it computed (scores with the reason per candidate, the plot, the candidates, the
    lowest-bypass candidate as the direction), exits 1 saying what to do next, and search can
    start from that folder."""
    from orthoedit.config import SearchConfig
    from orthoedit.search import prepare

    src = tiny_model("llama")
    out = tmp_path / "d"
    args = ["--n-train", "8", "--n-val", "4", "--no-filter", "--refusal-tokens", "I,the"]
    result = cli("measure", src, "--out", out, *args, "--max-kl", "0")
    assert result.exit_code == 1, result.output
    said = " ".join(result.stderr.split())
    assert "no candidate passes the filters" in said
    assert f"orthoedit search {src} --candidates {out}" in said
    for name in ("candidates.safetensors", "direction.safetensors", "scores.json", "scores.png"):
        assert (out / name).is_file(), name
    scores = json.loads((out / "scores.json").read_text())
    assert scores["chosen"] is None
    scored = [s for s in scores["scores"] if s["bypass"] == s["bypass"]]
    assert all(s["why"] and not s["kept"] for s in scores["scores"])
    nearest = min(scored, key=lambda s: s["bypass"])
    assert (scores["nearest"]["layer"], scores["nearest"]["position"]) == (
        nearest["layer"],
        nearest["position"],
    )
    record = json.loads((out / "direction.json").read_text())
    assert record["passed_filters"] is False
    assert (record["layer"], record["position"]) == (nearest["layer"], nearest["position"])
    with safe_open(str(out / "candidates.safetensors"), "pt") as f:
        r = f.get_tensor("candidates")[nearest["layer"], nearest["position"]].double()
    with safe_open(str(out / "direction.safetensors"), "pt") as f:
        written = f.get_tensor("direction").double()
    assert torch.allclose(written, r / r.norm(), atol=1e-6)
    ready = prepare(SearchConfig(model=str(src), candidates=out, out=tmp_path / "s"))
    assert ready.baseline_direction.metadata["layer"] == str(nearest["layer"])


def test_models_load_with_plain_pytorch_layers(tiny_model):
    """The one loader asks transformers for no Hub kernels: with the `kernels` package
    installed, transformers would otherwise replace layers (rotary, norms, activations) with
    kernels fetched from the Hub when the model is on a GPU, which fails offline and is not the
    model the hooks and verify reason about."""
    from orthoedit.runtime.session import load_model

    model = load_model(tiny_model("llama"))
    assert model.use_kernels is False
