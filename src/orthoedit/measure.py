"""Measuring the refusal direction (DESIGN ideas 7-8; Arditi et al. 2024).

Post-instruction positions come from the model's own chat template, rendered around a sentinel
message: the tokens after the message's last character are the template's post-instruction
tokens. The residual stream entering every block is averaged at those positions, in float64,
over harmful and harmless prompts; every (layer, position) difference of means is a candidate.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .architectures import table_for_config
from .config import DEVICE_MAPS, MeasureConfig
from .direction import save_direction, save_stable
from .errors import BadInputError
from .hooks import capture_block_inputs
from .output import check_target, inputs_of, staged_output
from .prompts import BUNDLED, ORGANISM, is_prompt_file, prompt_texts
from .source import read_config, resolve_model

SENTINEL = "Orthoedit sentinel message"
THINKING_TAGS = (("<think>", "</think>"), ("<thinking>", "</thinking>"))


class Progress:
    """Where long loops report: a named stage with its size, then steps. Reports nothing; the
    CLI passes one that drives a progress bar."""

    def start(self, name: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


# Templates that print today's date (Llama 3.x: "Today Date: ...") see this one instead, so
# renderings, and everything hashed downstream of them, do not change from day to day. It is
# the date Llama 3.1's own template falls back to.
PINNED_DATE = datetime.date(2024, 7, 26)


def template_kwargs() -> dict:
    """Extra chat-template variables: the pinned date as Llama 3's ``date_string``. (A
    template that calls ``strftime_now`` for itself still sees today: transformers turns
    template variables into strings, so the function cannot be replaced.)"""
    return {"date_string": PINNED_DATE.strftime("%d %b %Y")}


def read_template(path: Path) -> str:
    """A ``--template`` file's text (a Jinja chat template), or a clear error."""
    if not Path(path).is_file():
        raise BadInputError(f"--template {path} does not exist.")
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"--template {path}: cannot read it as UTF-8 text ({err}).") from None


def render(tok, prompt: str, system: str | None = None) -> str:
    """One user turn (after an optional system prompt) and the generation prompt, as text.

    Reasoning models are asked not to think (``enable_thinking=False``, ignored by templates
    that do not know it), so the first generated token is the answer's. Dates are pinned
    (``PINNED_DATE``).
    """
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    try:
        return tok.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=False,
            **template_kwargs(),
        )
    except Exception as err:  # jinja raises for e.g. a system turn the template rejects
        raise BadInputError(f"the chat template cannot render this conversation: {err}") from None


def pad_id(tok) -> int:
    """The token left padding uses: the tokenizer's pad token, else its end of sequence."""
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def post_instruction_ids(tok, system: str | None = None) -> list[int]:
    """Token ids the template puts between the end of the user message and the answer."""
    if not getattr(tok, "chat_template", None):
        raise BadInputError(
            "the tokenizer has no chat template; pass --template FILE with a Jinja chat template."
        )
    text = render(tok, SENTINEL, system)
    at = text.rfind(SENTINEL)
    if at < 0:
        raise BadInputError("the chat template drops the user message; cannot find positions.")
    end = at + len(SENTINEL)
    tail = text[end:]
    for opening, closing in THINKING_TAGS:
        if tail.rfind(opening) > tail.rfind(closing):
            raise BadInputError(
                f"the chat template opens a thinking block ({opening!r}) where the answer should "
                "start, even with enable_thinking=False; first-token scores would measure the "
                "reasoning, not the answer, so this template is not supported (pass --template "
                "FILE with one that closes the block)."
            )
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pairs = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ids = [i for i, (start, _) in pairs if start >= end]
    if not ids:
        raise BadInputError("the chat template adds no tokens after the user message.")
    return ids


def chat_ids(tok, prompts: list[str], post: list[int], system: str | None) -> list[list[int]]:
    """Token ids of each prompt's chat rendering; each must end with the post-instruction ids."""
    out = []
    for prompt in prompts:
        ids = tok(render(tok, prompt, system), add_special_tokens=False)["input_ids"]
        if ids[-len(post) :] != post:
            raise BadInputError(
                f"prompt {prompt[:40]!r}: its rendering does not end with the template's "
                "post-instruction tokens (the tokenizer merges across the message boundary)."
            )
        out.append(ids)
    return out


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar length, so little of each batch is padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def input_device(model) -> torch.device:
    """Where token ids go in: the input embedding's device. With a ``device_map`` that
    offloads to disk, weights sit on the meta device until accelerate's hooks load them, and
    those hooks move inputs to the execution device: such a model takes its ids on the CPU."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def placement(model) -> dict[str, int]:
    """Modules per device of a ``device_map`` (``{"cpu": n}`` when the model was not
    dispatched): the record says where the measurement ran, offload included."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return {str(input_device(model)): 1}
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return dict(sorted(counts.items()))


def max_memory(spec: str | None) -> dict | None:
    """``--max-memory "0=70GiB,cpu=120GiB"`` -> accelerate's ``{0: "70GiB", "cpu": "120GiB"}``."""
    if spec is None:
        return None
    limits: dict = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise BadInputError(
                f"--max-memory {spec!r}: expected DEVICE=SIZE pairs, e.g. 0=70GiB,cpu=120GiB."
            )
        limits[int(key) if key.isdigit() else key] = value
    return limits


def check_device(device: str | None) -> None:
    """Bad input, before any model loads: a device this machine does not have. (The options
    only check that torch can name it: a recipe may be validated on another machine.)"""
    if device is None or device in DEVICE_MAPS:
        return
    kind = torch.device(device)
    if kind.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise BadInputError(
                f"--device {device}: this machine has no CUDA device that torch "
                f"{torch.__version__} can use; leave --device out to run on the CPU."
            )
        if kind.index is not None and kind.index >= n:
            raise BadInputError(
                f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}."
            )
    elif kind.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=kind)
        except (RuntimeError, AssertionError) as err:
            raise BadInputError(f"--device {device}: not usable here ({err}).") from None


def load_kwargs(cfg) -> dict:
    """``from_pretrained`` arguments for a command's dtype, device and memory options (the
    device is checked by ``check_device`` where the command starts)."""
    kwargs: dict = {"dtype": getattr(torch, cfg.dtype), "device_map": cfg.device}
    offload = getattr(cfg, "max_memory", None) or getattr(cfg, "offload_folder", None)
    if offload and cfg.device != "auto":
        raise BadInputError("--max-memory and --offload-folder need --device auto.")
    if getattr(cfg, "max_memory", None):
        kwargs["max_memory"] = max_memory(cfg.max_memory)
    if getattr(cfg, "offload_folder", None):
        kwargs["offload_folder"] = str(cfg.offload_folder)
    return kwargs


def left_padded(rows: list[list[int]], pad: int, device) -> dict[str, torch.Tensor]:
    """Left padding keeps the post-instruction tokens at the same offsets from the end; position
    ids count real tokens only, so a padded prompt sees the positions it would see alone."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


MIN_SHARED_PREFIX = 8


def shared_prefix(model, rows: list[list[int]], keep: int = 1) -> int:
    """How many leading tokens all rows share (a chat template's system prompt and turn header)
    and can run once, leaving every row at least ``keep`` tokens of its own; 0 when that is
    too short to matter, or when a sliding attention window could be narrower than a row
    (padding between prefix and tail widens the span in cache positions)."""
    if len(rows) < 2:
        return 0
    limit = min(map(len, rows)) - keep
    n = 0
    while n < limit and all(row[n] == rows[0][n] for row in rows):
        n += 1
    window = getattr(model.config, "sliding_window", None)
    if window and max(map(len, rows)) > window:
        return 0
    return n if n >= MIN_SHARED_PREFIX else 0


@torch.no_grad()
def batched_forward(model, rows: list[list[int]], batch_size: int, pad: int, keep: int = 1, **kw):
    """Yield ``(row indices, output)`` for length-sorted batches of ``rows``.

    The prefix all rows share runs once (through whatever hooks are active), and every batch
    continues from its key/value cache: the tails are left-padded after the prefix, masked,
    with position ids that count real tokens only, so each row sees exactly what it would see
    alone. Chat templates with a default system prompt make that prefix half of every row.
    Outputs cover the tails only; each tail keeps at least ``keep`` tokens.
    """
    device = input_device(model)
    prefix = SharedPrefix(model, rows, keep, **kw)
    for batch in length_sorted_batches([len(r) for r in rows], batch_size):
        enc = left_padded([rows[i][prefix.n :] for i in batch], pad, device)
        extra: dict = {"use_cache": False}
        if prefix.n:
            enc["attention_mask"] = prefix.mask(enc["attention_mask"])
            enc["position_ids"] = enc["position_ids"] + prefix.n
            extra = {"use_cache": True, prefix.cache_name: prefix.cache_for(len(batch))}
        yield batch, model(**enc, **extra, **kw)


class SharedPrefix:
    """The prefix all rows share (``shared_prefix``) run once through ``model`` (and whatever
    hooks are active); each batch continues from a copy of its key/value cache, its tails
    left-padded after it and masked. ``n`` is 0 when there is no prefix worth running."""

    def __init__(self, model, rows: list[list[int]], keep: int = 1, **kw):
        self.n = shared_prefix(model, rows, keep)
        if not self.n:
            return
        device = input_device(model)
        self.ids = torch.tensor([rows[0][: self.n]], device=device)
        ran = model(input_ids=self.ids, use_cache=True, **kw)
        # transformers 5.x names the key/value cache ``cache`` (``past_key_values`` goes away in
        # 5.40); older versions only know ``past_key_values``. Whichever the output has.
        self.cache_name = "cache" if "cache" in ran else "past_key_values"
        self.cache = ran[self.cache_name]

    def cache_for(self, batch: int):
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache

    def mask(self, tail_mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of prefix + left-padded tails."""
        seen = torch.ones((tail_mask.shape[0], self.n), dtype=torch.long, device=tail_mask.device)
        return torch.cat([seen, tail_mask], dim=1)


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
# The filter's generation budget: enough for an opening refusal phrase (the judgement reads
# the first 80 characters), short enough to run on a whole prompt pool.
FILTER_TOKENS = 16


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
    from .refusal import greedy_completions

    missing = [p for p in dict.fromkeys(prompts) if p not in loaded.completions]
    if missing:
        rows = chat_ids(loaded.tok, missing, loaded.post, system)
        made = greedy_completions(loaded.model, rows, batch_size, loaded.pad, FILTER_TOKENS)
        loaded.completions.update(zip(missing, made, strict=True))
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
    from .refusal import judge

    kept: list[str] = []
    tried = 0
    step = max(need, 2 * batch_size)
    for start in range(0, len(prompts), step):
        chunk = prompts[start : start + step]
        tried += len(chunk)
        for prompt, ids in zip(
            chunk, completions_of(loaded, chunk, system, batch_size), strict=True
        ):
            verdict = judge(loaded.tok.decode(ids, skip_special_tokens=True))
            if verdict == ("refused" if refused else "complied"):
                kept.append(prompt)
        if len(kept) >= need:
            break
    return kept[:need], tried


def measure(
    cfg: MeasureConfig, log: Callable[[str], None] = print, progress: Progress | None = None
) -> MeasureResult:
    """Compute every candidate and write the chosen one as a direction artifact."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # ours is the only bar
    progress = progress or Progress()
    check_device(cfg.device)
    folder, revision = resolve_model(cfg.model, cfg.revision)
    config = read_config(folder)
    table = table_for_config(config)
    _, n_layers, _ = table.dims(config)
    target = check_target(cfg.out, [folder, *inputs_of(cfg)], cfg.overwrite)
    given = cfg.layer is not None or cfg.position is not None
    if given and (cfg.layer is None or cfg.position is None):
        raise BadInputError("--layer and --position go together (or leave both out to select).")
    if cfg.layer is not None and not 0 <= cfg.layer < n_layers:
        raise BadInputError(f"--layer {cfg.layer}: the model has layers 0..{n_layers - 1}.")
    harmful, harmful_val = _prompts(cfg, "harmful")
    harmless, harmless_val = _prompts(cfg, "harmless")

    tok = AutoTokenizer.from_pretrained(folder)
    if cfg.template is not None:
        tok.chat_template = read_template(cfg.template)
    post = post_instruction_ids(tok, cfg.system)
    n_pos = len(post)
    if cfg.position is not None and not -n_pos <= cfg.position <= -1:
        raise BadInputError(
            f"--position {cfg.position}: this template has {n_pos} post-instruction tokens "
            f"({tok.convert_ids_to_tokens(post)}); use -{n_pos}..-1."
        )
    log(f"post-instruction tokens: {tok.convert_ids_to_tokens(post)}")
    model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs(cfg)).eval()
    pad = pad_id(tok)
    loaded = _Loaded(model, tok, table, folder, config, post, pad)
    pools = {"harmful": (harmful, harmful_val), "harmless": (harmless, harmless_val)}
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
    (harmful, harmful_val), (harmless, harmless_val) = drawn["harmful"], drawn["harmless"]
    rows = {
        "harmful": chat_ids(tok, harmful, post, cfg.system),
        "harmless": chat_ids(tok, harmless, post, cfg.system),
    }
    means = {}
    for kind, r in rows.items():
        progress.start(f"mean activations: {kind}", len(r))
        means[kind] = mean_activations(
            model, table, n_layers, r, n_pos, cfg.batch_size, pad, progress
        )
    candidates = means["harmful"] - means["harmless"]
    selection = failed = None
    if given:
        layer, position = cfg.layer, cfg.position
    else:
        from .select import NoCandidateError

        progress.start("refusal tokens and baseline", None)
        try:
            selection = _select(cfg, loaded, candidates, harmful_val, harmless_val, log, progress)
        except NoCandidateError as err:  # still write everything, so that search can start
            failed, selection = err, err.selection
        pick = selection.chosen or selection.nearest
        layer, position = pick.layer, pick.position
    r = candidates[layer, n_pos + position]
    norm = float(r.norm())
    model_name = cfg.model if revision is None else f"{cfg.model}@{revision}"
    meta = {
        "kind": "single",
        "layer": layer,
        "position": position,
        "norm": f"{norm:.6g}",
        "model": model_name,
    }
    if failed is not None:
        meta["selection"] = "lowest bypass; no candidate passed the filters"
    record = {
        "model": cfg.model,
        "revision": revision,
        "layer": layer,
        "position": position,
        "norm": norm,
        "post_instruction_tokens": tok.convert_ids_to_tokens(post),
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
        "dtype": cfg.dtype,
        "placement": placement(loaded.model),
        "passed_filters": None if selection is None else failed is None,
        "selection": (
            "given (--layer, --position)"
            if given
            else "lowest bypass after filters"
            if failed is None
            else "none passed the filters: the lowest bypass, as a starting point for search"
        ),
        "scores": None if selection is None else asdict(selection.chosen or selection.nearest),
        "baseline": None if selection is None else selection.baseline,
        "thresholds": None if selection is None else selection.thresholds,
        "orthoedit_version": __version__,
    }
    with staged_output(target) as tmp:
        save_direction(tmp / "direction.safetensors", (r / norm).numpy(), meta)
        (tmp / "direction.json").write_text(json.dumps(record, indent=2) + "\n")
        for kind, prompts in (("harmful", harmful_val), ("harmless", harmless_val)):
            write_prompts(tmp / f"val-{kind}.jsonl", prompts)
        if selection is not None:
            scores = selection.to_dict()
            from .select import first_tokens

            openings = selection.openings
            scores["refusal_openings"] = [tok.convert_ids_to_tokens(list(o)) for o in openings]
            scores["refusal_tokens"] = tok.convert_ids_to_tokens(first_tokens(openings))
            (tmp / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
            from .plots import plot_scores

            tokens = tok.convert_ids_to_tokens(post)
            short = model_name if len(model_name) <= 60 else "..." + model_name[-57:]
            plot_scores(scores, n_layers, tokens, tmp / "scores.png", short)
        arrays = {
            "candidates": candidates,
            "harmful_mean": means["harmful"],
            "harmless_mean": means["harmless"],
        }
        save_stable(
            {k: np.ascontiguousarray(v.numpy(), dtype=np.float32) for k, v in arrays.items()},
            tmp / "candidates.safetensors",
            {"layer_convention": "input of block i", "position_convention": "p - n_positions"},
        )
    if failed is not None:
        raise type(failed)(
            f"{failed}. {target} holds every score and the reason for each rejected candidate "
            "(scores.json, scores.png) and the lowest-bypass candidate as direction.safetensors. "
            f"Next: orthoedit search {cfg.model} --candidates {target} --out SEARCH_FOLDER; or "
            "relax --max-kl or --max-layer-frac; or pick a candidate with --layer/--position.",
            selection,
        )
    return MeasureResult(target, layer, position, norm, n_pos, record["counts"], selection)


def _source_name(cfg: MeasureConfig, kind: str) -> str:
    source = getattr(cfg, kind)
    if source is None or source == BUNDLED:
        return f"bundled pool ({kind}: train, val)"
    if source == ORGANISM:
        return f"the organism's prompts ({kind}: train, val)"
    if is_prompt_file(source):
        return str(source)
    return f"dataset {source} (split {cfg.split}, column {cfg.column})"


def prompt_digest(prompts: list[str]) -> str:
    """sha256 of a prompt list, one per line in order (as ``direction.json`` records them)."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def write_prompts(path: Path, prompts: list[str]) -> None:
    """``{"prompt": ...}`` per line, in order: a prompt file ``--harmful``/``--harmless`` read
    back exactly (ASCII-escaped JSON, so no prompt can contain a line break)."""
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")


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
    completions: dict[str, list[int]] = field(default_factory=dict)


def _select(cfg, loaded: _Loaded, candidates, harmful_val, harmless_val, log, progress):
    from .checkpoint import Checkpoint
    from .select import parse_refusal_tokens, refusal_openings, select

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
    return select(
        model=loaded.model,
        table=loaded.table,
        checkpoint=Checkpoint.open(loaded.folder),
        config=loaded.config,
        folder=loaded.folder,
        candidates=candidates,
        harmful_rows=harmful_rows,
        harmless_rows=harmless_rows,
        openings=openings,
        batch_size=cfg.batch_size,
        pad=loaded.pad,
        max_kl=cfg.max_kl,
        max_layer_frac=cfg.max_layer_frac,
        top_k=0 if cfg.thorough else cfg.top_k,
        progress=progress,
    )
