"""Measuring the refusal direction (docs/design.md §7-§8; Arditi et al. 2024).

Post-instruction positions come from the model's own chat template, rendered around a sentinel
message: the tokens after the message's last character are the template's post-instruction
tokens. The residual stream entering every block is averaged at those positions, in float64,
over harmful and harmless prompts; every (layer, position) difference of means is a candidate.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..config import MeasureConfig
from ..errors import BadInputError
from ..folders import MeasureFolder
from ..judging.openings import FILTER_TOKENS
from ..model.derive import table_or_derived
from ..model.direction import save_direction
from ..model.source import read_config, resolve_model
from ..output import check_target, inputs_of, staged_output
from ..progress import Progress
from ..prompts import BUNDLED, ORGANISM, is_prompt_file, prompt_digest, prompt_texts
from ..runtime.hooks import capture_block_inputs
from ..runtime.session import (
    Session,
    batched_forward,
    chat_ids,
    load_tokenizer,
    placement,
    post_instruction_ids,
    run_dtype,
    start_stage,
)


@torch.no_grad()
def mean_activations(
    model,
    table,
    n_layers: int,
    rows: list[list[int]],
    n_pos: int,
    batch_size: int,
    pad: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``[n_layers, n_pos, d_model]`` float64 mean of every block's input at the last ``n_pos``
    positions (position index p = offset p - n_pos from the end)."""
    total = None
    base = model.base_model  # no unembedding: the block inputs are all we need
    with capture_block_inputs(model, table, n_layers, n_pos) as captured:
        for batch, _ in batched_forward(base, rows, batch_size, pad, keep=n_pos):
            # summed on each layer's own device (a device_map may spread them), then gathered
            summed = torch.stack([c.to(torch.float64).sum(0).cpu() for c in captured])
            total = summed if total is None else total + summed
            if progress:
                progress.advance(len(batch))
    return total / len(rows)


@dataclass
class MeasureResult:
    out: Path
    layer: int
    position: int
    norm: float
    n_positions: int
    counts: dict[str, int]
    selection: object | None = None


def _prompts(cfg: MeasureConfig, what: str) -> tuple[list[str], list[str]]:
    """Disjoint, shuffled train and validation lists to draw from: the bundled pool's train
    and val splits, or one prompt file (or dataset split) cut in the ratio n_train : n_val."""
    rng = random.Random(cfg.seed)
    source = getattr(cfg, what)
    if source is None or source in (BUNDLED, ORGANISM):
        train = prompt_texts(source, what, "train")
        val = prompt_texts(source, what, "val")
        return rng.sample(train, len(train)), rng.sample(val, len(val))
    items = prompt_texts(source, column=cfg.column, split=cfg.split)
    n_train, n_val = cfg.n_train, cfg.n_val
    if len(items) < 4:
        raise BadInputError(
            f"{source}: {len(items)} {what} prompts; measuring needs at least 4 "
            "(2 for the means, 2 to score candidates)."
        )
    drawn = rng.sample(items, len(items))
    cut = min(len(items) - 2, max(2, round(len(items) * n_train / (n_train + n_val))))
    return drawn[:cut], drawn[cut:]


MIN_REFUSED = 32


def _check_filter(filtered: dict, n_train: int, log) -> None:
    """Report what the filter kept; too few refused harmful prompts is an error."""
    for name, f in filtered.items():
        log(f"filter: kept {f['kept']} of {f['tried']} {name.replace('_', ' ')} prompts")
    train, val = filtered["harmful_train"], filtered["harmful_val"]
    floor = min(MIN_REFUSED, n_train)
    if train["kept"] < floor or val["kept"] < 2:
        raise BadInputError(
            f"the model refused {train['kept']} of the {train['tried']} harmful prompts tried "
            f"for the means and {val['kept']} of the {val['tried']} for scoring (at least "
            f"{floor} and 2 are needed): give a larger --harmful pool, or --no-filter to "
            "measure on all prompts (the direction may then be about topic, not refusal)."
        )
    for name, f in filtered.items():
        if f["kept"] < f["wanted"]:
            log(f"warning: {name.replace('_', ' ')}: {f['kept']} of the {f['wanted']} wanted")


def completions_of(
    loaded: _Loaded, prompts: list[str], system: str | None, batch_size: int
) -> list[list[int]]:
    """Short greedy completions (token ids), generated once per prompt: the filter's serve
    again to derive the refusal tokens."""
    from ..runtime.session import generate

    missing = [p for p in dict.fromkeys(prompts) if p not in loaded.completions]
    if missing:
        rows = chat_ids(loaded.tok, missing, loaded.post, system)
        made = generate(loaded.session, rows, FILTER_TOKENS)
        loaded.completions.update((p, g.ids) for p, g in zip(missing, made, strict=True))
    return [loaded.completions[p] for p in prompts]


def keep_by_behaviour(
    loaded: _Loaded,
    prompts: list[str],
    system: str | None,
    *,
    refused: bool,
    need: int,
    batch_size: int,
) -> tuple[list[str], int]:
    """The first ``need`` prompts whose greedy completion (``FILTER_TOKENS`` long) is judged
    ``refused`` (``refused=True``) or ``complied`` (broken answers are kept by neither);
    returns (kept, how many were tried)."""
    from ..judging.verdicts import text_verdict

    kept: list[str] = []
    tried = 0
    step = max(need, 2 * batch_size)
    for start in range(0, len(prompts), step):
        chunk = prompts[start : start + step]
        tried += len(chunk)
        for prompt, ids in zip(
            chunk, completions_of(loaded, chunk, system, batch_size), strict=True
        ):
            verdict, _ = text_verdict(loaded.tok.decode(ids, skip_special_tokens=True))
            if verdict == ("refused" if refused else "complied"):
                kept.append(prompt)
        if len(kept) >= need:
            break
    return kept[:need], tried


def measure(
    cfg: MeasureConfig, log: Callable[[str], None] = print, progress: Progress | None = None
) -> MeasureResult:
    """Compute every candidate and write the chosen one as a direction artifact."""

    progress = start_stage(cfg.device, progress)
    folder, revision = resolve_model(cfg.model, cfg.revision)
    config = read_config(folder)
    table = table_or_derived(config)
    _, n_layers, _ = table.dims(config)
    target = check_target(cfg.out, [folder, *inputs_of(cfg)], cfg.overwrite)
    _check_choice(cfg, n_layers)
    pools = {kind: _prompts(cfg, kind) for kind in ("harmful", "harmless")}
    tok = load_tokenizer(folder, cfg.template)
    post = post_instruction_ids(tok, cfg.system)
    _check_position(cfg, tok, post)
    log(f"post-instruction tokens: {tok.convert_ids_to_tokens(post)}")
    session = Session.open(folder, cfg, tok=tok, log=log)
    loaded = _Loaded(session.model, tok, table, folder, config, post, session.pad, session)
    drawn, filtered = _draw(cfg, loaded, pools, log, progress)
    means = {}
    for kind, (train, _) in drawn.items():
        rows = chat_ids(tok, train, post, cfg.system)
        progress.start(f"mean activations: {kind}", len(rows))
        means[kind] = mean_activations(
            loaded.model, table, n_layers, rows, len(post), cfg.batch_size, loaded.pad, progress
        )
    candidates = means["harmful"] - means["harmless"]
    selection = failed = None
    layer, position = cfg.layer, cfg.position
    if layer is None:
        from .select import NoCandidateError

        progress.start("refusal tokens and baseline", None)
        val = {kind: v for kind, (_, v) in drawn.items()}
        try:
            selection = _select(
                cfg, loaded, candidates, val["harmful"], val["harmless"], log, progress
            )
        except NoCandidateError as err:  # still write everything, so that search can start
            failed, selection = err, err.selection
        pick = selection.chosen or selection.nearest
        layer, position = pick.layer, pick.position
    r = candidates[layer, len(post) + position]
    model_name = cfg.model if revision is None else f"{cfg.model}@{revision}"
    record = _record(cfg, loaded, revision, layer, position, float(r.norm()), drawn, filtered)
    record |= _selection_record(selection, failed, given=cfg.layer is not None)
    with staged_output(target) as tmp:
        _write(tmp, loaded, model_name, r, record, drawn, selection, means, failed is not None)
    if failed is not None:
        raise type(failed)(
            f"{failed}. {target} holds every score and the reason for each rejected candidate "
            "(scores.json, scores.png) and the lowest-bypass candidate as direction.safetensors. "
            f"Next: orthoedit search {cfg.model} --candidates {target} --out SEARCH_FOLDER; or "
            "relax --max-kl or --max-layer-frac; or pick a candidate with --layer/--position.",
            selection,
        )
    return MeasureResult(
        target, layer, position, record["norm"], len(post), record["counts"], selection
    )


def _check_choice(cfg: MeasureConfig, n_layers: int) -> None:
    """--layer and --position: both or neither, the layer within the model."""
    if (cfg.layer is None) != (cfg.position is None):
        raise BadInputError("--layer and --position go together (or leave both out to select).")
    if cfg.layer is not None and not 0 <= cfg.layer < n_layers:
        raise BadInputError(f"--layer {cfg.layer}: the model has layers 0..{n_layers - 1}.")


def _check_position(cfg: MeasureConfig, tok, post: list[int]) -> None:
    n_pos = len(post)
    if cfg.position is not None and not -n_pos <= cfg.position <= -1:
        raise BadInputError(
            f"--position {cfg.position}: this template has {n_pos} post-instruction tokens "
            f"({tok.convert_ids_to_tokens(post)}); use -{n_pos}..-1."
        )


def _draw(cfg: MeasureConfig, loaded: _Loaded, pools: dict, log, progress) -> tuple[dict, dict]:
    """The train and validation prompts of each kind: the first ones of each pool, or with
    the filter those the model refuses (harmful) or answers (harmless), and the filter's
    counts."""
    drawn: dict[str, tuple[list[str], list[str]]] = {}
    filtered: dict[str, dict[str, int]] = {}
    for kind, (train_pool, val_pool) in pools.items():
        if not cfg.filter:
            drawn[kind] = (train_pool[: cfg.n_train], val_pool[: cfg.n_val])
            continue
        parts = []
        for part, pool, need in (("train", train_pool, cfg.n_train), ("val", val_pool, cfg.n_val)):
            progress.start(f"filter: {kind} {part} prompts (greedy completions)", None)
            kept, tried = keep_by_behaviour(
                loaded,
                pool,
                cfg.system,
                refused=kind == "harmful",
                need=need,
                batch_size=cfg.batch_size,
            )
            filtered[f"{kind}_{part}"] = {"kept": len(kept), "tried": tried, "wanted": need}
            parts.append(kept)
        drawn[kind] = (parts[0], parts[1])
    if cfg.filter:
        _check_filter(filtered, cfg.n_train, log)
    return drawn, filtered


def _record(cfg, loaded: _Loaded, revision, layer, position, norm, drawn, filtered) -> dict:
    """direction.json: where the direction was taken, from which prompts, how."""
    (harmful, harmful_val), (harmless, harmless_val) = drawn["harmful"], drawn["harmless"]
    return {
        "model": cfg.model,
        "revision": revision,
        "layer": layer,
        "position": position,
        "norm": norm,
        "post_instruction_tokens": loaded.tok.convert_ids_to_tokens(loaded.post),
        "counts": {"harmful": len(harmful), "harmless": len(harmless)},
        "validation_counts": {"harmful": len(harmful_val), "harmless": len(harmless_val)},
        "filter": filtered or None,
        "prompt_sources": {kind: _source_name(cfg, kind) for kind in ("harmful", "harmless")},
        # sha256 of the prompts used, one per line in the order used: the set is reproducible
        "prompt_hashes": {
            "harmful_train": prompt_digest(harmful),
            "harmful_val": prompt_digest(harmful_val),
            "harmless_train": prompt_digest(harmless),
            "harmless_val": prompt_digest(harmless_val),
        },
        "seed": cfg.seed,
        "system": cfg.system,
        "dtype": run_dtype(loaded.folder, cfg),
        "placement": placement(loaded.model),
    }


def _selection_record(selection, failed, given: bool) -> dict:
    """direction.json's account of the choice: given, selected, or none passed."""
    if given:
        how = "given (--layer, --position)"
    elif failed is None:
        how = "lowest bypass after filters"
    else:
        how = "none passed the filters: the lowest bypass, as a starting point for search"
    return {
        "passed_filters": None if selection is None else failed is None,
        "selection": how,
        "scores": None if selection is None else asdict(selection.chosen or selection.nearest),
        "baseline": None if selection is None else selection.baseline,
        "thresholds": None if selection is None else selection.thresholds,
        "orthoedit_version": __version__,
    }


def _write(tmp: Path, loaded, model_name, r, record, drawn, selection, means, failed) -> None:
    """measure's folder: the direction and its record, the validation prompts, the scores and
    their plot (when selected), and every candidate with both means."""
    tok = loaded.tok
    meta = {
        "kind": "single",
        "layer": record["layer"],
        "position": record["position"],
        "norm": f"{record['norm']:.6g}",
        "model": model_name,
    }
    if failed:
        meta["selection"] = "lowest bypass; no candidate passed the filters"
    folder = MeasureFolder(tmp)
    save_direction(folder.direction, (r / record["norm"]).numpy(), meta)
    folder.write_record(record)
    for kind, (_, prompts) in drawn.items():
        folder.write_validation(kind, prompts)
    if selection is not None:
        from ..judging.openings import first_tokens
        from .plots import plot_scores

        scores = selection.to_dict()
        openings = selection.openings
        scores["refusal_openings"] = [tok.convert_ids_to_tokens(list(o)) for o in openings]
        scores["refusal_tokens"] = tok.convert_ids_to_tokens(first_tokens(openings))
        folder.write_scores(scores)
        short = model_name if len(model_name) <= 60 else "..." + model_name[-57:]
        n_layers = means["harmful"].shape[0]
        plot_scores(
            scores, n_layers, tok.convert_ids_to_tokens(loaded.post), folder.scores_png, short
        )
    harmful, harmless = means["harmful"], means["harmless"]
    folder.write_candidates((harmful - harmless).numpy(), harmful.numpy(), harmless.numpy())


def _source_name(cfg: MeasureConfig, kind: str) -> str:
    source = getattr(cfg, kind)
    if source is None or source == BUNDLED:
        return f"bundled pool ({kind}: train, val)"
    if source == ORGANISM:
        return f"the organism's prompts ({kind}: train, val)"
    if is_prompt_file(source):
        return str(source)
    return f"dataset {source} (split {cfg.split}, column {cfg.column})"


@dataclass
class _Loaded:
    """The model and everything derived from it that scoring needs."""

    model: object
    tok: object
    table: object
    folder: Path
    config: dict
    post: list[int]
    pad: int
    session: Session
    completions: dict[str, list[int]] = field(default_factory=dict)


def _select(cfg, loaded: _Loaded, candidates, harmful_val, harmless_val, log, progress):
    from ..judging.openings import parse_refusal_tokens, refusal_openings
    from ..model.source import open_checkpoint
    from .select import Scorer, select

    harmful_rows = chat_ids(loaded.tok, harmful_val, loaded.post, cfg.system)
    harmless_rows = chat_ids(loaded.tok, harmless_val, loaded.post, cfg.system)
    if cfg.refusal_tokens:
        openings = [(t,) for t in parse_refusal_tokens(loaded.tok, cfg.refusal_tokens)]
    else:
        openings = refusal_openings(
            loaded.tok,
            completions_of(loaded, harmful_val, cfg.system, cfg.batch_size),
            completions_of(loaded, harmless_val, cfg.system, cfg.batch_size),
            log,
        )
    log(f"scoring {candidates.shape[0] * candidates.shape[1]} candidates")
    scorer = Scorer(
        model=loaded.model,
        table=loaded.table,
        checkpoint=open_checkpoint(loaded.folder),
        config=loaded.config,
        folder=loaded.folder,
        openings=openings,
        batch_size=cfg.batch_size,
        pad=loaded.pad,
    )
    return select(
        scorer,
        candidates,
        harmful_rows,
        harmless_rows,
        max_kl=cfg.max_kl,
        max_layer_frac=cfg.max_layer_frac,
        top_k=0 if cfg.thorough else cfg.top_k,
        progress=progress,
    )
