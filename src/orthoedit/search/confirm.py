"""``search --confirm``: the chosen edit, judged on prompts no choice was made on.

The chosen trial won on measure's validation prompts, so its failure rate there is the best
of many tries and flatters it. The confirmation applies the chosen edit as
``chosen/apply.txt`` does (``edit.apply``, streamed shard by shard) to a temporary checkpoint
in OUT, then judges it beside the unedited model with eval safety's run
(``judging.safety.run_safety``, its report written as eval safety writes it), on held-out
prompts (by default the bundled test split), generating with ``--backend`` (vLLM where it is
installed: it needs a checkpoint, which is why the edit is applied rather than hooked). The
checkpoint is removed afterwards; ``OUT/confirm`` keeps eval safety's report and every answer,
and pareto.json a summary. (The edit of a GGUF is a GGUF: ``model.gguf`` in that folder.)

The edit is confirmed when the held-out harmful prompts fail (every answer not complied, as a
trial counts failure: ``judging.verdicts.failure_rate``) less often with it than without it.
A stored confirmation of the same trial with the same options is not run again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import ApplyConfig, EvalSafetyConfig, SearchConfig
from ..errors import BadInputError
from ..folders import SearchFolder
from ..judging.verdicts import failure_rate
from ..model.gguf import is_gguf
from ..output import check_target, remove_output, staged_output
from .inputs import Ready
from .outputs import chosen_sites

GGUF_NAME = "model.gguf"


def safety_config(cfg: SearchConfig, ready: Ready, model: Path, out: Path) -> EvalSafetyConfig:
    """eval safety's options for the confirmation: every option the two commands share
    (judge, placement, template, word-salad threshold, seed, backend) as the search has it,
    the held-out prompts and budget of ``--confirm-*``, and measure's system prompt where the
    search took it from there. With vLLM, --max-memory / --offload-folder placed only the
    trials' model."""
    shared = {
        name: getattr(cfg, name)
        for name in EvalSafetyConfig.model_fields
        if name in SearchConfig.model_fields
    }
    vllm = cfg.backend == "vllm"
    return EvalSafetyConfig(
        **shared
        | {
            "model": str(model),
            "base": str(ready.folder),
            "out": out,
            "harmful": cfg.confirm_harmful,
            "harmless": cfg.confirm_harmless,
            "n": cfg.confirm_n,
            "max_new_tokens": cfg.confirm_max_new_tokens,
            "system": ready.settings["system"],
            "overwrite": True,
            **({"max_memory": None, "offload_folder": None} if vllm else {}),
        }
    )


def _key(study: str, trial: int, options: EvalSafetyConfig) -> str:
    """What makes a confirmation: the study, the trial and every eval safety option but the
    paths this run makes up."""
    kept = options.model_dump(mode="json", exclude={"model", "out", "overwrite"})
    blob = json.dumps({"study": study, "trial": trial, "options": kept}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def previous(out: Path) -> dict | None:
    """The confirmation the last pareto.json recorded, if its report is still there."""
    try:
        found = json.loads(SearchFolder(out).pareto_json.read_text()).get("confirmation")
    except (OSError, ValueError, AttributeError):
        return None
    return found if found and SearchFolder(out).confirm.json.is_file() else None


def kept(out: Path, study: str, chosen, found: dict | None) -> dict | None:
    """Without ``--confirm``: the last confirmation (``found``, read by ``previous`` before
    pareto.json was rewritten) while it is of the chosen trial of this study; otherwise
    ``OUT/confirm`` (which would describe another edit) is removed."""
    if found and chosen is not None and (found["study"], found["trial"]) == (study, chosen.number):
        return found
    remove_output(SearchFolder(out).confirm.path)
    return None


def confirm(
    cfg: SearchConfig, ready: Ready, out: Path, report: dict, found: dict | None, log, progress
) -> dict | None:
    """Apply the chosen trial's edit to ``OUT/.confirm-model``, judge it against the unedited
    model into ``OUT/confirm`` and remove the checkpoint; the summary pareto.json records.
    ``found``: the last confirmation (``previous``), reused when it has the same key."""
    from ..edit import apply as stage
    from ..judging.judges import check_judge
    from ..judging.safety import run_safety
    from ..report.safety import write_safety
    from ..runtime.vllm_engine import resolved

    trial = report["chosen"]["number"]
    folder = SearchFolder(out)
    staging = folder.confirm_model
    edited = staging / GGUF_NAME if is_gguf(cfg.model) else staging
    options = safety_config(cfg, ready, edited, folder.confirm.path)
    key = _key(report["study"], trial, options)
    if found and found.get("key") == key:
        log(f"confirm: trial {trial} was confirmed with these options; not run again")
        return found
    for path in (folder.confirm.path, staging):  # an earlier confirmation's, or a stranger's
        if not remove_output(path):
            raise BadInputError(
                f"{path} was not written by orthoedit; move it away to confirm in {out}."
            )
    chosen = folder.chosen
    sites = chosen_sites(chosen.scales)
    if not sites:
        log(f"confirm: trial {trial} edits nothing; there is nothing to confirm")
        return None
    edit = ApplyConfig(
        model=cfg.model,
        revision=cfg.revision,
        direction=[chosen.direction],
        scales=chosen.scales,
        sites=sites,
        out=edited,
        overwrite=True,
    )
    try:
        prepared = stage.prepare(edit)
        progress.start(f"confirm: applying trial {trial}", stage.edit_size(prepared))
        _write_edit(stage, prepared, staging, edited, progress)
        label = f"search trial {trial}, applied from {chosen.apply_command}"
        resolved_options = resolved(options, log)
        result = run_safety(resolved_options, check_judge(options), log, progress, label)
        write_safety(check_target(options.out, overwrite=True), label, result)
    finally:
        remove_output(staging)
    return _summary(report["study"], trial, key, options, result, folder)


def _write_edit(stage, prepared, staging: Path, edited: Path, progress) -> None:
    """The edit written as the folder ``staging``; a GGUF's as ``edited`` inside it, so that
    the staging folder is orthoedit's (marked) either way and ``remove_output`` removes it."""
    if edited == staging:
        stage.execute(prepared, staging, True, progress.advance)
        return
    with staged_output(check_target(staging, overwrite=True)) as tmp:
        stage.execute(prepared, tmp / edited.name, True, progress.advance)


def _summary(study: str, trial: int, key: str, options, result, folder: SearchFolder) -> dict:
    """What pareto.json records of a confirmation."""
    failure = {
        role: failure_rate([a for a in result.answers if a.model == role and a.kind == "harmful"])
        for role in ("base", "model")
    }
    settings = result.settings
    return {
        "study": study,
        "trial": trial,
        "key": key,
        "confirmed": failure["model"] < failure["base"],
        "failure": failure,
        "harmful": settings["harmful"],
        "harmless": settings["harmless"],
        "counts": {
            kind: sum(a.model == "base" and a.kind == kind for a in result.answers)
            for kind in ("harmful", "harmless")
        },
        "max_new_tokens": options.max_new_tokens,
        "backend": settings["backend"],
        "judge": options.judge,
        "summary": {
            role: {kind: v["overall"] for kind, v in rates.items()}
            for role, rates in result.summary.items()
        },
        "report": folder.confirm.md.relative_to(folder.path).as_posix(),
    }
