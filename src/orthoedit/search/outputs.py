"""What a search writes: pareto.json/.md/.png and ``chosen/`` (direction, scales, the
apply command, a recipe fragment)."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..config import SearchConfig
from ..folders import ChosenFolder, SearchFolder
from ..model.gguf import is_gguf
from .choice import budget, target_failure
from .inputs import Ready
from .space import (
    SITES_SEARCHED,
    EditParams,
    blend,
    params_of,
)
from .trial import describe


def _trial_dict(t, front_numbers: set[int]) -> dict:
    attrs = t.user_attrs
    return {
        "number": t.number,
        "failure": attrs["failure"],
        "kl": attrs["kl"],
        "refused": attrs["refused"],
        "complied": attrs["complied"],
        "broken": attrs["broken"],
        "evasive": attrs.get("evasive", 0),
        "unjudged": attrs.get("unjudged", 0),
        "implausible": attrs.get("implausible", 0),
        "score": attrs.get("score"),
        "drop": attrs.get("drop"),
        "seconds": attrs["seconds"],
        "direction": attrs["direction"],
        "params": dict(sorted(t.params.items())),
        "pareto": t.number in front_numbers,
        "retry_of": t.system_attrs.get("failed_trial"),
        # in a shared study, the worker (host:pid) that ran it
        **({"worker": attrs["worker"]} if "worker" in attrs else {}),
    }


def apply_args(cfg: SearchConfig, out: Path, params: EditParams, n_layers: int) -> list[str]:
    """``orthoedit apply`` arguments that reproduce a trial's edit (without ``--out``)."""
    sites, _ = params.plan_scales(n_layers)
    chosen = SearchFolder(out).chosen
    args = [cfg.model, "--direction", str(chosen.direction)]
    args += ["--scales", str(chosen.scales), "--sites", ",".join(sites)]
    if cfg.revision:
        args += ["--revision", cfg.revision]
    return args


def _failure_words(cfg: SearchConfig, judging: dict) -> str:
    """What the failure objective counts, in words."""
    return (
        "share of harmful validation prompts answered with a refusal (anywhere in the answer) "
        "or a degenerate answer (greedy, max_new_tokens; word salad: mean surprisal under the "
        f"unedited model above {judging.get('max_surprisal', float('nan')):.3g} nats per token)"
        + ("" if cfg.judge is None else f", or evasive or unjudged by {cfg.judge}")
    )


def report_dict(cfg, study, ready: Ready, trials, front, chosen, baselines, where=None) -> dict:
    """pareto.json's content. ``where``: the study's storage as it may be shown (default
    ``OUT/study.db``; a database URL without its password)."""
    out = Path(cfg.out).expanduser().resolve()
    numbers = {t.number for t in front}
    entry = None
    if chosen is not None:
        params = params_of(chosen.params)
        entry = {
            **_trial_dict(chosen, numbers),
            "scales": params.scales(ready.n_layers),
            "apply_args": apply_args(cfg, out, params, ready.n_layers),
        }
    judging = study.user_attrs.get("judging", {})
    return {
        "study": study.study_name,
        "storage": where or str(SearchFolder(out).study),
        "sampler": "optuna TPESampler (multivariate, "
        + ("one objective" if cfg.objective == "budget" else "multi-objective")
        + "), re-seeded per trial",
        "minimized": (
            f"KL + {cfg.failure_cost:g} per harmful prompt failed beyond the budget "
            f"({budget(cfg, baselines)})"
            if cfg.objective == "budget"
            else "failure and KL"
            + ("" if cfg.eval_task is None else " and drop")
            + " (the Pareto front)"
        ),
        "space": asdict(ready.space),
        "objectives": {
            "failure": _failure_words(cfg, judging),
            "kl": "first-token KL(unedited ‖ edited), harmless validation prompts",
            **(
                {}
                if cfg.eval_task is None
                else {
                    "drop": f"unedited minus edited {cfg.eval_task} score "
                    f"({judging.get('eval_metric')}, {cfg.eval_limit} documents)"
                }
            ),
        },
        "settings": ready.settings,
        "max_kl": cfg.max_kl,
        "max_failure": cfg.max_failure,
        "max_failure_rate": target_failure(cfg.max_failure, baselines),
        "budget": budget(cfg, baselines),
        "max_drop": cfg.max_drop,
        "trials_wanted": cfg.trials,
        "trials_completed": len(trials),
        "judging": judging,
        "baselines": baselines,
        "chosen": entry,
        "pareto": [t.number for t in front],
        "trials": [_trial_dict(t, numbers) for t in trials],
        "orthoedit_version": __version__,
    }


def _write_file(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(out: Path, report: dict) -> None:
    """pareto.json and pareto.md, each written beside and renamed."""
    from ..report import search_markdown

    folder = SearchFolder(out)
    _write_file(folder.pareto_json, json.dumps(report, indent=2) + "\n")
    _write_file(folder.pareto_md, search_markdown(report))


def write_outputs(out: Path, cfg: SearchConfig, ready: Ready, report: dict, chosen) -> None:
    """pareto.{json,md,png} (each written beside and renamed) and ``chosen/`` (staged and
    renamed as a whole; removed when no trial is within the budget)."""
    from ..output import remove_output, staged_output
    from ..report import search_png

    folder = SearchFolder(out)
    png_tmp = folder.pareto_png.with_name(f".{folder.pareto_png.name}.tmp")
    search_png(report, png_tmp, cfg.model)
    os.replace(png_tmp, folder.pareto_png)
    write_report(out, report)
    if chosen is None:
        remove_output(folder.chosen.path)
        return
    with staged_output(folder.chosen.path) as tmp:
        write_chosen(tmp, cfg, ready, report, chosen)


def chosen_sites(scales_path: Path) -> list[str]:
    """The sites a ``chosen/scales.json`` edits at all (what ``apply.txt`` passes as
    ``--sites``)."""
    raw = json.loads(Path(scales_path).read_text())
    sites = ["embed"] if raw.get("embed", 0) > 0 else []
    return sites + [site for site in SITES_SEARCHED if any(s > 0 for s in raw.get(site, []))]


def write_chosen(folder: Path, cfg: SearchConfig, ready: Ready, report: dict, chosen) -> None:
    """direction.safetensors, scales.json, apply.txt and recipe-fragment.yaml of the chosen
    trial; paths inside point at the final ``OUT/chosen`` folder."""
    from ..model.direction import save_direction

    entry = report["chosen"]
    final = SearchFolder(Path(cfg.out).expanduser().resolve()).chosen
    written = ChosenFolder(folder)
    params = params_of(chosen.params)
    vector, source = blend(ready.candidates, params.layer, params.position)
    meta = {
        "kind": "single",
        "model": cfg.model,
        "search_layer": repr(params.layer),
        "position": params.position,
        "blended_layers": ",".join(map(str, source["layers"])),
        "blend_weights": ",".join(repr(w) for w in source["weights"]),
        "search_study": report["study"],
        "search_trial": chosen.number,
        "candidates_sha256": ready.settings["candidates_sha256"],
    }
    if len(source["layers"]) == 1:  # a measured candidate itself, as measure records it
        meta["layer"] = source["layers"][0]
    save_direction(written.direction, vector, meta)
    written.scales.write_text(json.dumps(params.scales(ready.n_layers), indent=1) + "\n")
    sites, _ = params.plan_scales(ready.n_layers)
    out = "edited.gguf" if is_gguf(cfg.model) else "edited"  # the edit of a GGUF is a GGUF
    command = ["orthoedit", "apply", *entry["apply_args"], "--out", out]
    note = "" if sites else "# the chosen trial edits nothing: there is nothing to apply\n"
    written.apply_command.write_text(note + shlex.join(command) + "\n")
    fragment = (
        f"# orthoedit search: trial {chosen.number}, {describe(entry)}, KL {entry['kl']:.4g} "
        "on the search's validation prompts.\n"
        "# Paste into a recipe (it replaces the measure stage with this direction):\n"
        f"direction: {json.dumps(str(final.direction))}\n"
        "edit:\n"
        f"  sites: [{', '.join(sites)}]\n"
        f"  scales: {json.dumps(str(final.scales))}\n"
    )
    written.recipe_fragment.write_text(fragment)
