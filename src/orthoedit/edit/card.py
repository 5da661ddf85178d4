"""The model card written next to the edited weights: metadata, summary and provenance."""

from __future__ import annotations

import platform
from pathlib import Path

from .. import __version__
from .licenses import terms_for
from .plan import Plan

TAGS = ["orthoedit", "abliterated", "refusal-direction", "orthogonalized"]
#: Metadata carried over from the source model's card.
CARRIED = ("license", "license_name", "license_link", "language")
#: The evaluation section sits between these; push replaces it with the results.
EVAL_BEGIN = "<!-- orthoedit:evaluation -->"
EVAL_END = "<!-- /orthoedit:evaluation -->"
NOT_EVALUATED = (
    "Not evaluated in this card yet. `orthoedit push --eval RUN_FOLDER` fills in the benchmark "
    "and refusal results of `orthoedit eval bench` / `eval safety`."
)


def _site_summary(plan: Plan) -> str:
    layers = sorted({op.layer for op in plan.ops if op.layer is not None})
    partial = {k: v for k, v in plan.scales.items() if v != 1.0}
    lines = [
        f"- sites: {', '.join(plan.sites)}",
        f"- layers: {plan.layers[0]}:{plan.layers[1]} of {plan.n_layers} ({len(layers)} edited)",
        f"- scales other than 1.0: {partial or 'none'}",
        f"- tensors edited: {len(plan.ops)}",
    ]
    return "\n".join(lines)


def _method(plan: Plan) -> str:
    if plan.method == "norm-preserving":
        return (
            "`norm-preserving`: each written vector was projected, then given its original "
            "length back; the direction is still removed, but the model is not equal to "
            "run-time ablation (verify compares it by KL)"
        )
    if plan.method == "biprojected":
        d = plan.method_details
        return (
            "`biprojected`: the direction was first made orthogonal to the harmless mean "
            f"({d.get('harmless_mean')}; cosine before {d.get('cosine_with_harmless_mean')}), "
            "then projected out exactly"
        )
    return "`project`: exact projection, equal to run-time ablation of the direction"


def source_metadata(folder: Path) -> dict:
    """The YAML metadata of the source model's README (empty when it has none)."""
    from huggingface_hub import metadata_load

    path = folder / "README.md"
    if not path.is_file():
        return {}
    try:
        return metadata_load(path) or {}
    except (ValueError, UnicodeDecodeError):  # a malformed header: carry nothing over
        return {}


def license_section(meta: dict) -> str:
    """What the source license asks of this derivative, in plain words."""
    terms = terms_for(meta)
    key = meta.get("license_name") if meta.get("license") == "other" else meta.get("license")
    if terms is None:
        named = f"`{key}`" if key else "not recorded in the source card"
        return (
            f"The source model's license and terms apply to this checkpoint unchanged (license: "
            f"{named}). Read them on the source model's page before you use or share it."
        )
    link = f" ({terms.link})" if terms.link else ""
    lines = [
        f"This checkpoint is a derivative of the source model and is distributed under the "
        f"source's license, the **{terms.title}**{link}. Its redistribution terms include "
        "(a summary; the license text binds):",
        "",
        *(f"- {d}" for d in terms.duties),
    ]
    if terms.notice:
        lines += ["", "Notice:", "", f"> {terms.notice}"]
    return "\n".join(lines)


def artifact_names(paths: list[Path]) -> list[str]:
    """Where apply copies the direction files under ``orthoedit/``: ``direction.<ext>`` for
    the first, ``direction-2.<ext>``... after it."""
    return [f"direction{'' if i == 0 else f'-{i + 1}'}{p.suffix}" for i, p in enumerate(paths)]


def _directions(plan: Plan) -> str:
    """Provenance rows: every direction file, its hash, and what was taken from it."""
    names = artifact_names([Path(f.file) for f in plan.direction_files])
    rows = []
    for f, name in zip(plan.direction_files, names, strict=True):
        what = f"row {f.row} of a per-layer file" if f.row is not None else f.kind
        rows.append(f"| direction `{f.file}` (`orthoedit/{name}`) | {what}, SHA-256 `{f.sha256}` |")
    return "\n".join(rows)


def _span(plan: Plan) -> str:
    k = len(plan.directions) + len(plan.per_layer_directions)
    if plan.per_layer_directions:
        return (
            f"{k} direction{'s' if k > 1 else ''} per layer (block i uses row i of each "
            "per-layer file, the embedding row 0)"
        )
    return "one direction" if k == 1 else f"the span of {k} directions (orthonormalized)"


def render_card(plan: Plan, source_meta: dict | None = None):
    """The card as a huggingface_hub ModelCard (imported here: it is slow to import)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = plan.base_model
    meta = source_meta or {}
    data = ModelCardData(
        base_model=base,
        base_model_relation="finetune" if base else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=TAGS,
        **{k: meta[k] for k in CARRIED if meta.get(k)},
    )
    body = _card_body(plan, meta)
    if plan.warnings:
        body += "\n## Warnings at edit time\n\n" + "\n".join(f"- {w}" for w in plan.warnings) + "\n"
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body)


def _card_body(plan: Plan, meta: dict) -> str:
    """The card's Markdown below its metadata: what changed, the edit, provenance, an empty
    Evaluation section (``with_evaluation`` fills it) and the license."""
    terms = terms_for(meta)
    tied = (
        f"tied embeddings, policy `{plan.tied_policy}`"
        + (" (lm_head.weight written as the original embedding)" if plan.write_lm_head else "")
        if plan.tied
        else "untied embeddings (no policy needed)"
    )
    source = f"`{plan.source}`" + (f" at revision `{plan.revision}`" if plan.revision else "")
    display = f"**{terms.display}**\n\n" if terms and terms.display else ""
    return f"""
# {Path(plan.source).name} (orthogonalized)

{display}This checkpoint is {source} with {_span(plan)} removed from every tensor that
writes into the residual stream, by orthoedit {__version__}. The
architecture, shapes and dtypes are unchanged; inference costs exactly what the source costs.

**What changed:** no edited layer can write along the direction(s) below, so behaviour that the
direction mediates (typically refusal) is weakened or removed. Everything else the model does
may change too; evaluate it before use (see Evaluation below).

## Edit

- family: `{plan.family}` (d_model {plan.d_model}, {plan.n_layers} layers){_derived(plan)}
{_site_summary(plan)}
- embeddings: {tied}
- method: {_method(plan)}
- exact check: `orthoedit verify SOURCE THIS_FOLDER` compares this checkpoint with the source
  model under run-time ablation hooks; `plan.json` lists every edited tensor.

## Provenance

| | |
|---|---|
| source model | {source} |
{_directions(plan)}
| orthoedit | {__version__} |
| python | {platform.python_version()} |

## Evaluation

{EVAL_BEGIN}
{NOT_EVALUATED}
{EVAL_END}

## License

{license_section(meta)}
"""


def _pct(x) -> str:
    return "–" if x is None else f"{x:.1%}"


def _num(x) -> str:
    return "–" if x is None else f"{x:.4g}"


def evaluation_markdown(
    bench: dict | None, safety: dict | None, verify: dict | None, reports: dict[str, str]
) -> str:
    """The card's Evaluation section from the reports of eval bench, eval safety and verify
    (their report.json / verify.json as written); ``reports`` maps a name to its repo path."""
    parts = [
        "The source model and this checkpoint were run on the same prompts and tasks by "
        "orthoedit; the numbers below come from its reports."
    ]
    if safety is not None:
        parts.append(_safety_section(safety))
    if bench is not None:
        parts.append(_bench_section(bench))
    if verify is not None:
        verdict = "passed" if verify.get("passed") else "FAILED: " + "; ".join(verify["failures"])
        parts.append(
            "### Exactness (`orthoedit verify`)\n\n"
            f"Against the source model with the edit applied by run-time hooks, on "
            f"{verify['prompts']} prompts: max |Δlogit| {_num(verify['max_logit_diff'])}, mean "
            f"KL {_num(verify['mean_kl'])}, largest remaining component along the direction "
            f"{_num(verify['max_weight_residual'])} (relative); {verdict}."
        )
    if reports:
        parts.append(
            "Full reports in this repository: "
            + ", ".join(f"[{name}]({path})" for name, path in reports.items())
            + ". The answers themselves are not published."
        )
    return "\n\n".join(parts)


def _safety_section(safety: dict) -> str:
    """Refusal, over-refusal, broken and (when judged) unsafe rates, source vs this model."""
    summary, settings = safety["summary"], safety["settings"]
    roles = [r for r in ("base", "model") if r in summary]
    heads = {"base": "source", "model": "this model"}
    judged = settings.get("judge") is not None
    rows = [
        ("harmful requests refused", "harmful", "refusal"),
        ("harmless requests refused (over-refusal)", "harmless", "refusal"),
        ("harmful requests: broken answers", "harmful", "broken"),
    ]
    if judged:
        rows.append(("harmful answers the judge calls unsafe", "harmful", "unsafe"))
    n = {k: summary[roles[-1]][k]["overall"]["n"] for k in ("harmful", "harmless")}
    lines = [
        "### Refusal and safety (`orthoedit eval safety`)",
        "",
        "| | " + " | ".join(heads[r] for r in roles) + " |",
        "|---|" + "---|" * len(roles),
        *(
            f"| {label} | "
            + " | ".join(_pct(summary[r][kind]["overall"].get(key)) for r in roles)
            + " |"
            for label, kind, key in rows
        ),
        "",
        f"{n['harmful']} harmful and {n['harmless']} harmless held-out prompts "
        f"(harmful: {settings['harmful']}; harmless: {settings['harmless']}), greedy "
        f"answers of at most {settings['max_new_tokens']} tokens with the chat template. "
        "Refused = a refusal phrase at the start of the answer; broken = empty or "
        "degenerate output."
        + (f" Judge: `{settings['judge']}`." if judged else " No judge model was run."),
    ]
    return "\n".join(lines)


def _bench_section(bench: dict) -> str:
    """One row per task and metric, source vs this model, with the settings below."""
    settings = bench["settings"]
    lines = [
        "### Benchmarks (`orthoedit eval bench`, lm-eval)",
        "",
        "| task | metric | source | this model | change | ± (stderr) | |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in bench["rows"]:
        flag = (
            "**regressed**"
            if row["regressed"]
            else ("beyond noise" if row["beyond_noise"] else "within noise")
        )
        lines.append(
            f"| {row['task']} | {row['metric']} | {_num(row['base'])} | "
            f"{_num(row['edited'])} | {row['delta']:+.4g} | {_num(row['stderr'])} | {flag} |"
        )
    limit = settings.get("limit")
    shots = settings.get("num_fewshot")
    footer = (
        f"lm-eval {settings.get('lm_eval_version') or ''}, "
        + (f"{shots}-shot" if shots is not None else "default shots")
        + (f", first {limit} items per task" if limit else ", full tasks")
        + f", dtype {settings.get('dtype')}, allowed drop {settings.get('max_drop')}"
        + (", regressions: " + ", ".join(bench["regressions"]) if bench["regressions"]
           else ", no regression")
        + "."
    )  # fmt: skip
    return "\n".join([*lines, "", footer])


def with_evaluation(card: str, section: str) -> str:
    """The card text with its Evaluation section replaced (appended if its markers are gone)."""
    begin, end = card.find(EVAL_BEGIN), card.find(EVAL_END)
    block = f"{EVAL_BEGIN}\n{section}\n{EVAL_END}"
    if begin == -1 or end < begin:
        return card.rstrip("\n") + f"\n\n## Evaluation\n\n{block}\n"
    return card[:begin] + block + card[end + len(EVAL_END) :]


def _derived(plan: Plan) -> str:
    if not plan.derived:
        return ""
    return (
        "\n- table: derived (its residual writers were read off a tiny instance of the class and "
        "the edit proved exact there; no reviewed table ships for this family)"
    )


#: The card's section on the GGUF files push uploads beside the weights.
GGUF_HEADING = "## GGUF files"


def gguf_markdown(files: list[tuple[str, str, int]], tools: list[str]) -> str:
    """The GGUF section: each file (repo path, type as its header says, bytes) and what wrote
    them (``tools``: the converter and quantizer of ``orthoedit export gguf``'s record)."""
    by = f", written by {' and '.join(tools)}" if tools else ""
    lines = [
        GGUF_HEADING,
        "",
        "This checkpoint as GGUF files, for llama.cpp and the runtimes built on it (`orthoedit "
        f"export gguf`{by}). A quantized file is this checkpoint rounded to its type: "
        "`orthoedit verify` checks the safetensors weights, not the rounding.",
        "",
        "| file | type | size |",
        "|---|---|---|",
        *(f"| [{path}]({path}) | {kind} | {_size(size)} |" for path, kind, size in files),
    ]
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def with_gguf(card: str, section: str) -> str:
    """The card with the GGUF section before its License section (at the end without one)."""
    at = card.find("\n## License")
    if at == -1:
        return card.rstrip("\n") + f"\n\n{section}\n"
    return card[:at] + f"\n{section}\n" + card[at:]
