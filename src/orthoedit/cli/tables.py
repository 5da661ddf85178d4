"""The tables commands print: each takes a stage's result and returns a rich Table."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

CHOSEN = "[bold green]chosen[/]"


def _columns(table: Table, names, left=()) -> Table:
    for name in names:
        table.add_column(name, justify="left" if name in left else "right", overflow="fold")
    return table


def plan(plan) -> Table:
    """apply --dry-run: every planned tensor, by full name (the plan must stay greppable)."""
    k = len(plan.directions) + len(plan.per_layer_directions)
    span = "" if plan.single else f", span of {k} directions" + (" per layer" * (not plan.shared))
    derived = ", table derived" if plan.derived else ""
    title = f"plan: {len(plan.ops)} tensors ({plan.family}{derived}, d_model {plan.d_model}{span})"
    table = Table(title=title)
    for col in ("tensor", "site", "layer", "axis", "scale", "vector"):
        table.add_column(col, overflow="fold")
    for op in plan.ops:
        layer = "-" if op.layer is None else str(op.layer)
        label = op.vector_label if plan.single else op.vector_label.replace("r", "U", 1)
        table.add_row(op.tensor, op.site, layer, str(op.axis), f"{op.scale:g}", label)
    return table


def verify(result, edited) -> Table:
    """verify's checks and their values."""
    table = Table(title=f"verify {escape(str(edited))} ({result.storage_dtype})")
    table.add_column("check")
    table.add_column("value", justify="right")
    leak = f"{result.residual_leak:.3g}" + ("" if result.leak_checked else " (partial plan)")
    rows = [
        ("max |Δlogit| vs plan hooks", _bounded(result.max_logit_diff, result.max_logit_bound)),
        ("mean KL vs plan hooks", _bounded(result.mean_kl, result.mean_kl_bound)),
        ("max ‖uᵀW‖/‖W‖ (edited tensors)", f"{result.max_weight_residual:.3g}"),
        ("residual leak max |r̂ᵀx|/‖x‖", leak),
        ("unedited tensors byte-identical", str(result.unedited_identical)),
        ("shard headers identical", str(result.headers_identical)),
    ]
    optional = (
        ("max |Δlogit| vs residual ablation", result.paper_ablation_max_logit_diff),
        ("KL vs contribution projection (post-norm)", result.contribution_kl),
        ("max change of a written vector's length", result.max_norm_change),
        ("max ‖uᵀW‖/‖W‖ (planned tensors stored in float)", result.max_float_weight_residual),
        ("max ‖U(W' − PW)‖ / the format's rounding bound", result.max_rounding_ratio),
        ("max |Δlogit| from one fresh rounding (R)", result.rounding_max_logit_diff),
        ("mean KL from one fresh rounding", result.rounding_mean_kl),
    )
    rows += [(name, f"{value:.3g}") for name, value in optional if value is not None]
    for r in result.readers:  # a GGUF's other readers (llama.cpp)
        rows.append((f"{r['reader']}: max |Δlogit| vs plan hooks",
                     _bounded(r["max_logit_diff"], r["max_logit_bound"])))  # fmt: skip
        rows.append((f"{r['reader']}: its own max |Δlogit| on the source (C)",
                     f"{r['own_max_logit_diff']:.3g}"))  # fmt: skip
    if result.method == "norm-preserving":
        table.caption = (
            "method norm-preserving: not equal to run-time ablation by design, so the logits "
            "and KL against the hooks are reported, not judged"
        )
    for row in rows:
        table.add_row(*row)
    return table


def verify_export(result, edited) -> Table:
    """verify's check of an exported GGUF: each reader's logits against the folder's model."""
    types = ", ".join(f"{n} {t}" for t, n in sorted(result.types.items()))
    table = Table(title=f"verify {escape(str(edited))} (exported; {types})")
    table.add_column("check")
    table.add_column("value", justify="right")
    for r in result.readers:
        table.add_row(f"{r.reader}: max |Δlogit| vs the edited checkpoint",
                      _bounded(r.max_logit_diff, r.max_logit_bound))  # fmt: skip
        table.add_row(f"{r.reader}: mean KL", _bounded(r.mean_kl, r.mean_kl_bound))
    if result.readers_skipped:
        table.caption = "not run: " + "; ".join(result.readers_skipped)
    return table


def _bounded(value: float, bound: float) -> str:
    """A judged value and what it was judged against."""
    return f"{value:.3g}" + ("" if bound != bound else f" (≤ {bound:.3g})")  # NaN: not judged


def scores(selection) -> Table:
    """The fully scored candidates; the others (pruned, too deep) are counted in the caption."""
    chosen = selection.chosen
    table = Table(title="scored candidates (refusal log-odds; lower bypass is better)")
    for name in ("layer", "position", "bypass", "induce", "KL", "kept"):
        table.add_column(name, justify="right" if name != "kept" else "left")
    scored = [s for s in selection.scores if s.bypass == s.bypass]  # not NaN
    at = (chosen.layer, chosen.position) if chosen else None
    for s in scored:
        mark = CHOSEN if (s.layer, s.position) == at else ""
        kept = mark or ("yes" if s.kept else escape("; ".join(s.why)))
        table.add_row(
            str(s.layer), str(s.position), f"{s.bypass:.2f}", f"{s.induce:.2f}", f"{s.kl:.3g}", kept
        )
    base = selection.baseline
    table.caption = (
        f"without intervention: harmful {base['harmful_log_odds']:.2f}, "
        f"harmless {base['harmless_log_odds']:.2f}; "
        f"{len(selection.scores) - len(scored)} more candidates not fully scored "
        "(pruned, too deep or no difference: see scores.json)"
    )
    return table


def front(result) -> Table:
    """search: the Pareto front, the chosen trial marked, and the baselines."""
    chosen = result.chosen
    table = Table(
        title=f"Pareto front: {len(result.front)} of {len(result.trials)} trials",
        caption="failure: refused or broken answers to the harmful validation prompts; "
        "KL: first token, harmless validation prompts",
    )
    drop = result.front and result.front[0].user_attrs.get("drop") is not None
    names = ("trial", "failure", "refused", "broken", "KL", *(["drop"] if drop else []), "")
    for name in names:
        table.add_column(name, justify="right" if name not in ("trial", "") else "left")

    def cells(o: dict) -> list[str]:
        row = [f"{o['failure']:.1%}", str(o["refused"]), str(o["broken"]), f"{o['kl']:.4g}"]
        return row + ([f"{o['drop']:.3g}"] if drop else [])

    for t in result.front:
        mark = CHOSEN if chosen is not None and t.number == chosen.number else ""
        table.add_row(str(t.number), *cells(t.user_attrs), mark)
    for name, o in result.baselines.items():
        what = "measure's selection" if name == "measure" else "unedited"
        table.add_row(what, *cells(o), "")
    return table


def bench(result) -> Table:
    """eval bench: every metric, base and edited, and the verdict."""
    table = Table(
        title="benchmark regression (edited − base)",
        caption="* beyond noise: |delta| > 2 × stderr (the two runs combined)",
    )
    names = ("task", "metric", "base", "edited", "delta", "± stderr", "result")
    _columns(table, names, left=("task", "metric", "result"))
    for r in result.rows:
        metric = r.metric if r.filter == "none" else f"{r.metric} ({r.filter})"
        verdict = (
            "[red]REGRESSION[/]" if r.regressed else ("ok" if r.threshold is not None else "–")
        )
        table.add_row(
            r.task,
            escape(metric),
            f"{r.base:.4f}",
            f"{r.edited:.4f}",
            f"{r.delta:+.4f}" + (" *" if r.beyond_noise else ""),
            "–" if r.stderr is None else f"{r.stderr:.4f}",
            verdict,
        )
    return table


def kl(report) -> Table:
    """eval kl: the damage numbers."""
    table = Table(title=f"damage on {report.prompts} harmless prompts")
    table.add_column("metric")
    for name in ("base", "edited", "change"):
        table.add_column(name, justify="right")
    table.add_row("first-token KL (base ‖ edited)", "", "", f"{report.first_token_kl:.4g}")
    table.add_row(
        f"cross-entropy on base answers ({report.answer_tokens} tokens), nats/token",
        f"{report.cross_entropy_base:.4f}",
        f"{report.cross_entropy_edited:.4f}",
        f"{report.cross_entropy_delta:+.4f}",
    )
    return table


def safety(result, judged: bool) -> Table:
    """eval safety: share of answers refused, broken (and unsafe) per model and prompt set."""
    table = Table(title="safety (share of answers)")
    table.add_column("prompts")
    table.add_column("metric")
    roles = list(result.summary)
    for role in roles:
        table.add_column(role, justify="right")
    keys = ["refusal", "broken"] + (["unsafe", "judge_errors"] if judged else [])
    for kind in ("harmful", "harmless"):
        for key in keys:
            cells = []
            for role in roles:
                value = result.summary[role][kind]["overall"].get(key)
                if key == "judge_errors":
                    cells.append(str(value))
                else:
                    cells.append("–" if value is None else f"{100 * value:.1f}%")
            table.add_row(kind, key.replace("_", " "), *cells)
    return table


def confirmation(found: dict) -> Table:
    """search --confirm: the chosen edit and the unedited model on the held-out prompts: the
    failure a trial is judged by, then eval safety's rates."""
    trial = f"trial {found['trial']}"
    table = Table(title=f"confirmation of {trial} on held-out prompts")
    _columns(table, ("prompts", "metric", "unedited", trial), left=("prompts", "metric"))
    failure = found["failure"]
    table.add_row("harmful", "failure", *(f"{100 * failure[r]:.1f}%" for r in ("base", "model")))
    keys = ["refusal", "broken"] + (["unsafe"] if found["judge"] else [])
    for kind in ("harmful", "harmless"):
        for key in keys:
            values = [found["summary"][role][kind].get(key) for role in ("base", "model")]
            table.add_row(kind, key, *("–" if v is None else f"{100 * v:.1f}%" for v in values))
    return table


def compare(pairs) -> Table:
    """compare: both models' answers side by side, each with its verdict."""
    table = Table(title="base vs edited", show_lines=True)
    table.add_column("prompt", ratio=1, overflow="fold")
    table.add_column("base", ratio=2, overflow="fold")
    table.add_column("edited", ratio=2, overflow="fold")
    for pair in pairs:
        table.add_row(
            escape(pair.prompt) + (f"\n[dim]({pair.kind})[/dim]" if pair.kind else ""),
            f"[dim]{pair.base_verdict}[/dim]\n" + escape(pair.base),
            f"[dim]{pair.edited_verdict}[/dim]\n" + escape(pair.edited),
        )
    return table


def sites(result) -> Table:
    """study sites: the effect of removing the direction at each set of sites."""
    judged = any(o.unsafe is not None for o in result.outcomes)
    table = Table(
        title="removing the direction at each set of sites",
        caption="log-odds: refusal, harmful prompts; share: of the full run-time effect; "
        "KL: first token, harmless prompts. all = residual+attn+mlp at run time, "
        "embed+attn+mlp as a weight edit",
    )
    heads = ["condition", "sites", "log-odds", "Δ", "share", "refusal"]
    heads += ["unsafe"] if judged else []
    for name in [*heads, "KL"]:
        left = name in ("condition", "sites")
        table.add_column(name, justify="left" if left else "right", no_wrap=left)
    for o in result.outcomes:
        where = "–" if o.kind == "baseline" else o.name
        if not o.applicable:
            table.add_row(o.kind, where, *["n/a"] * (len(heads) - 1))
            continue
        share = "–" if o.share is None else f"{100 * o.share:.0f}%"
        cells = [f"{o.log_odds:.3f}", f"{o.delta:+.3f}", share, f"{100 * o.refusal:.1f}%"]
        if judged:
            cells.append("–" if o.unsafe is None else f"{100 * o.unsafe:.1f}%")
        table.add_row(o.kind, where, *cells, f"{o.kl:.4f}")
    return table


def attribution(result, top: int) -> Table:
    """attribute: the components with the largest estimates, and what patching found."""
    table = Table(title="change of refusal log-odds when patched: largest estimates, checked")
    names = ("component", "integrated", "first order", "patched", "proj. harmful",
             "proj. harmless")  # fmt: skip
    _columns(table, names, left=("component",))
    for c in sorted(result.components, key=lambda c: -abs(c.estimate))[: max(10, top)]:
        patched = "–" if c.patched is None else f"{c.patched:+.3f}"
        table.add_row(
            c.name,
            f"{c.estimate:+.3f}",
            f"{c.first_order:+.3f}",
            patched,
            f"{c.harmful_proj:+.3f}",
            f"{c.harmless_proj:+.3f}",
        )
    return table


def run(out, state: dict) -> Table:
    """orthoedit run: each stage's time and output hash."""
    table = Table(title=f"run: {escape(str(out))}")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("output sha256")
    for name, stage in state["stages"].items():
        table.add_row(name, f"{stage['seconds']:.1f}", (stage["outputs"] or "")[:16])
    return table


def upload(plan) -> Table:
    """push --dry-run: the files that would be uploaded."""
    table = Table(title=f"{plan.repo_id} @ {plan.revision} ({plan.method}), not uploaded")
    table.add_column("path in repo")
    table.add_column("bytes", justify="right")
    table.add_column("from")
    for item in plan.items:
        table.add_row(escape(item.path_in_repo), f"{item.size:,}", escape(item.origin))
    return table


def gguf_files(export) -> Table:
    """export gguf: each file, its type (as its header says), size and what wrote it."""
    table = Table(title=f"GGUF files in {escape(str(export.folder))}")
    for name, justify in (("file", "left"), ("type", "left"), ("MB", "right"), ("by", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    written = export.record.get("files", {})
    for file in export.files:
        by = written.get(file.name, {}).get("by", "")
        table.add_row(escape(file.name), file.type, f"{file.size / 1e6:,.1f}", escape(by))
    return table


def families(rows) -> Table:
    names = ("family", "status", "architectures", "writers", "norms", "tied")
    table = _columns(Table(title="Architectures"), names, left=names)
    for row in rows:
        table.add_row(
            row.family,
            row.status,
            "\n".join(row.architectures),
            "\n".join(row.writers) if row.writers else row.reason,
            row.norms,
            row.tied_default,
        )
    return table


def model_check(found) -> Table:
    table = _columns(Table(title=escape(found.model), show_header=False), ("", ""), left=("", ""))
    tied = "no" if not found.tied else f"yes (policy {found.tied_policy})"
    for key, value in (
        ("architecture", found.architecture),
        ("model_type", found.model_type),
        ("family", found.family),
        ("table", found.status),
        ("d_model", found.d_model),
        ("layers", found.n_layers),
        ("tied embeddings", tied),
        ("writers", "\n".join(found.writers)),
    ):
        table.add_row(key, escape(str(value)))
    return table
