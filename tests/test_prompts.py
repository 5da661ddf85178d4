"""One prompt loader for every command (orthoedit.prompts.load_prompts): a file, a dataset
folder, the bundled pools and the organism's prompts read the same way, with the same
--column / --split, by measure, search, verify, eval kl, eval safety, compare, study sites and
attribute. No model is loaded: each command's own prompt step is called with its config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orthoedit import search, verify
from orthoedit.config import (
    AttributeConfig,
    CompareConfig,
    EvalKLConfig,
    EvalSafetyConfig,
    MeasureConfig,
    SearchConfig,
    StudySitesConfig,
    VerifyConfig,
)
from orthoedit.errors import BadInputError
from orthoedit.evaluate import compare
from orthoedit.evaluate import kl as damage
from orthoedit.measure import candidates as measure
from orthoedit.organism import load_prompts as organism_prompts
from orthoedit.pools import load_pool
from orthoedit.prompts import load_prompts, load_sets

TEXTS = [f"request number {i}: how do I do thing {i}?" for i in range(12)]
M = "some/model"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """The same twelve prompts under the column ``text``: a .jsonl file, a .csv file and a
    local dataset folder (a ``datasets`` json builder over its train split)."""
    root = tmp_path_factory.mktemp("prompts")
    rows = "".join(json.dumps({"text": t, "other": 1}) + "\n" for t in TEXTS)
    (root / "p.jsonl").write_text(rows)
    (root / "p.csv").write_text("text,other\n" + "".join(f'"{t}",1\n' for t in TEXTS))
    dataset = root / "dataset"
    dataset.mkdir()
    (dataset / "train.jsonl").write_text(rows)
    return {"jsonl": str(root / "p.jsonl"), "csv": str(root / "p.csv"), "dataset": str(dataset)}


def _every_command(source: str, column: str = "text") -> dict[str, list[str]]:
    """Each command's prompts from ``source`` (all of them: no command draws fewer here)."""
    kw = {"column": column}
    got = {}
    train, val = measure._prompts(
        MeasureConfig(model=M, out=Path("o"), harmful=source, **kw), "harmful"
    )
    got["measure"] = sorted(train + val)
    cfg = SearchConfig(model=M, candidates=Path("c"), out=Path("o"), harmful=source, **kw)
    got["search"] = search.inputs._prompts(cfg, "harmful")
    got["verify"] = verify._read_prompts(
        VerifyConfig(source=M, edited=Path("e"), prompts=source, **kw)
    )
    got["eval kl"] = damage._prompts(EvalKLConfig(base=M, edited=M, prompts=source, n=99, **kw))
    cfg = CompareConfig(base=M, edited=M, prompts=source, n=99, **kw)
    got["compare"] = [p for p, _ in compare._prompts(cfg)]
    for name, config in (
        ("eval safety", EvalSafetyConfig(model=M, out=Path("o"), harmful=source, **kw)),
        (
            "study sites",
            StudySitesConfig(
                model=M, direction=Path("d"), out=Path("o"), harmful=source, n=99, **kw
            ),
        ),
        (
            "attribute",
            AttributeConfig(
                model=M, direction=Path("d"), out=Path("o"), harmful=source, n=99, **kw
            ),
        ),
    ):
        got[name] = load_sets(config)["harmful"]
    return got


@pytest.mark.parametrize("kind", ["jsonl", "csv", "dataset"])
def test_every_command_reads_a_source_the_same_way(sources, kind):
    for name, prompts in _every_command(sources[kind]).items():
        assert sorted(prompts) == sorted(TEXTS), name


def test_every_command_names_the_missing_column(sources):
    for source in sources.values():
        for step in _STEPS:
            with pytest.raises(BadInputError, match=r"no column 'prompt'.*--column"):
                step(source)


_STEPS = [
    lambda s: measure._prompts(MeasureConfig(model=M, out=Path("o"), harmful=s), "harmful"),
    lambda s: search.inputs._prompts(
        SearchConfig(model=M, candidates=Path("c"), out=Path("o"), harmful=s), "harmful"
    ),
    lambda s: verify._read_prompts(VerifyConfig(source=M, edited=Path("e"), prompts=s)),
    lambda s: damage._prompts(EvalKLConfig(base=M, edited=M, prompts=s)),
    lambda s: compare._prompts(CompareConfig(base=M, edited=M, prompts=s)),
    lambda s: load_sets(EvalSafetyConfig(model=M, out=Path("o"), harmful=s)),
]


def test_named_sets_mean_the_same_everywhere():
    """'bundled' and 'organism' are the same sets wherever prompts are taken: a val split
    where prompts make choices (measure's train + val, search), test where they judge."""
    for name, load in (("bundled", load_pool), ("organism", organism_prompts)):
        test = {i["prompt"] for i in load("harmful", "test")}
        val = [i["prompt"] for i in load("harmful", "val")]
        cfg = EvalSafetyConfig(model=M, out=Path("o"), harmful=name)
        assert set(load_sets(cfg)["harmful"]) == test
        cfg = SearchConfig(model=M, candidates=Path("c"), out=Path("o"), harmful=name)
        assert search.inputs._prompts(cfg, "harmful") == val
        train, drawn_val = measure._prompts(
            MeasureConfig(model=M, out=Path("o"), harmful=name), "harmful"
        )
        assert sorted(drawn_val) == sorted(val) and not set(train) & test
        both = load_prompts(name, None, "test")
        assert len(both) == len(test) + len(load("harmless", "test"))
        cfg = VerifyConfig(source=M, edited=Path("e"), prompts=name)
        assert verify._read_prompts(cfg) == [i["prompt"] for i in both]


def test_a_missing_source_is_one_line(tmp_path):
    missing = tmp_path / "none.jsonl"
    for step in _STEPS:
        with pytest.raises(BadInputError, match="does not exist"):
            step(str(missing))
