"""What a search reads: the measure folder, the prompts, the space; checked and resolved
before any model loads (``prepare``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import SearchConfig
from ..errors import BadInputError
from ..folders import MeasureFolder
from ..runtime.session import load_tokenizer, run_dtype
from .space import (
    Space,
    nonempty,
)

#: Bump when the search space or the way a trial is judged changes: a stored study made
#: under another version is not continued.
SPACE_VERSION = 3


@dataclass
class Ready:
    """Everything resolved and checked before the model is loaded."""

    folder: Path
    revision: str | None
    config: dict
    table: object
    checkpoint: object
    tok: object
    candidates: np.ndarray  # [n_layers, n_pos, d_model] float64
    space: Space
    baseline_direction: object
    harmful_rows: list[list[int]]
    harmless_rows: list[list[int]]
    settings: dict
    harmful_prompts: list[str]
    safety_judge: object  # a judging.judges.JudgeSpec with --judge, else None
    eval_task: object = None  # an evalbench.LoadedTask with --eval-task

    @property
    def n_layers(self) -> int:
        return self.candidates.shape[0]


def _read_candidates(folder: MeasureFolder, d_model: int, n_layers: int) -> np.ndarray:
    candidates = folder.read_candidates(d_model, n_layers)
    if not np.isfinite(candidates).all() or not nonempty(candidates).any():
        raise BadInputError(f"{folder.candidates}: the candidates are all zero or not finite.")
    return candidates


def _prompts(cfg: SearchConfig, kind: str) -> list[str]:
    """The prompts given for ``kind`` (a val split where they are named), else measure's
    validation prompts, in order."""
    from ..prompts import prompt_texts

    source = getattr(cfg, kind)
    if source is None:
        items = prompt_texts(MeasureFolder(Path(cfg.candidates)).validation(kind))
    else:
        items = prompt_texts(source, kind, "val", column=cfg.column, split=cfg.split)
    return items[: cfg.n] if cfg.n else items


def _measure_folder(path: str | Path) -> MeasureFolder:
    """``--candidates``: a folder written by measure, with every file search reads."""
    folder = Path(path)
    if not folder.is_dir():
        raise BadInputError(
            f"--candidates {folder} is not a folder; pass the --out folder of orthoedit measure."
        )
    missing = MeasureFolder(folder).missing()
    if missing:
        raise BadInputError(
            f"--candidates {folder} lacks {', '.join(missing)}: is it a folder written by "
            "orthoedit measure?"
        )
    return MeasureFolder(folder)


def prepare(cfg: SearchConfig) -> Ready:
    """Validate every input; loads only the tokenizer."""

    from ..judging.judges import check_judge
    from ..model.derive import table_or_derived
    from ..model.direction import load_direction
    from ..model.source import open_checkpoint, read_config, resolve_model
    from ..runtime.session import chat_ids, post_instruction_ids

    safety_judge = check_judge(cfg)
    if cfg.confirm:  # the confirmation's backend, refused now rather than after the trials
        from ..runtime.vllm_engine import resolved

        resolved(cfg, lambda _: None)
    eval_task = None
    if cfg.eval_task is not None:  # built now: an unknown task is bad input before any loading
        from ..evals.tasks import load_task

        eval_task = load_task(cfg.eval_task)
    folder_in = _measure_folder(cfg.candidates)
    folder, revision = resolve_model(cfg.model, cfg.revision)
    config = read_config(folder)
    table = table_or_derived(config)
    d_model, n_layers, _ = table.dims(config)
    candidates = _read_candidates(folder_in, d_model, n_layers)
    baseline = load_direction(folder_in.direction, d_model, n_layers)
    ok = nonempty(candidates)
    n_pos = candidates.shape[1]
    positions = [p - n_pos for p in range(n_pos) if ok[:, p].any()]
    space = _space(cfg, n_layers, positions)
    record = folder_in.read_record() or {}
    system = cfg.system if cfg.system is not None else record.get("system")
    tok = load_tokenizer(folder, cfg.template)
    post = post_instruction_ids(tok, system)
    if len(post) != n_pos:
        raise BadInputError(
            f"{folder_in.path}: candidates at {n_pos} positions, but this model's template has "
            f"{len(post)} post-instruction tokens; measure it with the same template."
        )
    prompts = {kind: _prompts(cfg, kind) for kind in ("harmful", "harmless")}
    rows = {kind: chat_ids(tok, p, post, system) for kind, p in prompts.items()}
    settings = _settings(cfg, folder, folder_in, revision, baseline, prompts, system, space)
    return Ready(
        folder,
        revision,
        config,
        table,
        open_checkpoint(folder),
        tok,
        candidates,
        space,
        baseline,
        rows["harmful"],
        rows["harmless"],
        settings,
        prompts["harmful"],
        safety_judge,
        eval_task,
    )


def _settings(cfg: SearchConfig, folder, folder_in, revision, baseline, prompts, system, space):
    """Every setting that changes what a trial measures (the study is named after them)."""
    from ..model.direction import sha256_file
    from ..model.source import config_digest
    from ..prompts import prompt_digest

    return {
        "space_version": SPACE_VERSION,
        "model": cfg.model,
        "revision": revision,
        "config_sha256": config_digest(folder),
        "candidates_sha256": sha256_file(folder_in.candidates),
        "baseline_direction_sha256": baseline.sha256,
        "prompt_hashes": {kind: prompt_digest(p) for kind, p in prompts.items()},
        "counts": {kind: len(p) for kind, p in prompts.items()},
        "system": system,
        "template_sha256": None
        if cfg.template is None
        else hashlib.sha256(cfg.template.read_bytes()).hexdigest(),
        "max_new_tokens": cfg.max_new_tokens,
        "judge": cfg.judge,
        # (an openai: judge's model; absent otherwise, so older studies still resume)
        **({"judge_model": cfg.judge_model} if cfg.judge else {}),
        "max_surprisal": cfg.max_surprisal,
        "eval_task": cfg.eval_task,
        "eval_limit": cfg.eval_limit if cfg.eval_task else None,
        "seed": cfg.seed,
        "startup_trials": cfg.startup_trials,
        "dtype": run_dtype(folder, cfg),  # auto resolved: trials in another dtype differ
        "space": asdict(space),
        "objective": cfg.objective,
        # what a budget objective's value depends on (in a front search, only the choice)
        **(
            {"max_failure": cfg.max_failure, "failure_cost": cfg.failure_cost}
            if cfg.objective == "budget"
            else {}
        ),
    }


def _space(cfg: SearchConfig, n_layers: int, measured: list[int]) -> Space:
    """The search space ``cfg`` asks for, checked against the model and the candidates."""
    top = float(n_layers - 1)
    layers = cfg.direction_layers or (0.0, top)
    if layers[1] > top:
        raise BadInputError(
            f"--direction-layers {layers[0]:g}:{layers[1]:g} goes past the last layer "
            f"({top:g}); the model has {n_layers} layers, numbered from 0."
        )
    positions = measured
    if cfg.positions is not None:
        unknown = [p for p in cfg.positions if p not in measured]
        if unknown:
            raise BadInputError(
                f"--positions {unknown[0]}: no measured candidate there (measured: "
                f"{', '.join(map(str, measured))})."
            )
        positions = list(cfg.positions)
    embed = {"search": [False, True], "on": [True], "off": [False]}[cfg.embed]
    return Space((float(layers[0]), float(layers[1])), positions, cfg.profile, embed)


def study_name(settings: dict) -> str:
    """Derived from every setting that changes what a trial measures, so that a search with
    other settings never continues this one."""
    blob = json.dumps(settings, sort_keys=True).encode()
    return f"orthoedit-search-{hashlib.sha256(blob).hexdigest()[:16]}"
