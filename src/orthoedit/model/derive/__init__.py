"""Derived tables: a family without a shipped table, read off a tiny instance of its class.

The shipped tables (``architectures/*.yaml``) are the reviewed ones. For any other transformers
class, ``derive_table`` builds a tiny random instance from the same config on the CPU (float64,
eager attention, every 1-D parameter randomized so that a norm handled wrongly cannot pass)
and classifies its parameters by perturbation, never by name (docs/design.md §1):

* the residual points of a block are the module inputs (and the block output) that change by
  exactly the perturbation when the block input is perturbed and every branch's output is held;
* a parameter writes into the residual stream along an axis of length d_model if perturbing
  it by ``v`` along that axis changes some residual point by a per-token multiple of ``v``
  (the edit is exactly such a change: ``W -= u uᵀ W``);
* otherwise, if it changes the input of an RMSNorm that way, the writer passes through that
  norm, whose own output is tested the same way (a chain of norms, innermost first);
* the gain convention of each norm (``x · w`` or ``x · (1 + w)``) is tested on the module;
* a multimodal wrapper (a vision or audio tower) is shown an image (and an audio clip): the
  innermost module whose output is exactly the rows that reach the first block at those
  tokens is its projector's last layer, an ``embed`` writer (media.py, projector.py).

Each parameter is found among the tensors ``save_pretrained`` writes by its values, and the
table is then proved on the instance: ``apply`` with it, edited logits equal the plan's hooks
(≤ 1e-4, float64) and no block input nor the final norm's input carries r (≤ 1e-5), on a text
prompt and on the media prompt (in float32 where a tower runs in no other dtype).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
from pathlib import Path

from pydantic import ValidationError

from ...errors import UnsupportedModelError
from ..architectures import ArchitectureTable, load_tables, table_for_config
from .assemble import classify
from .instance import _TOKENS, build_instance
from .media import Media, media_prompt

#: Tolerances of the proof: as tests/test_families.py holds the shipped tables to.
PROOF_LOGITS, PROOF_LEAK = 1e-4, 1e-5


def _edit(table: ArchitectureTable, folder: Path, work: Path):
    """The full plan of ``table`` for the instance in ``folder``, executed by apply's own
    writer into ``work/out`` (untied): (plan, output folder, direction r)."""
    import torch

    from ...edit.plan import build_plan
    from ...edit.writer import stream_edit
    from ..checkpoint import Checkpoint
    from ..direction import load_directions, save_direction

    config = json.loads((folder / "config.json").read_text())
    d_model, n_layers, _ = table.dims(config)
    r = torch.randn(d_model, generator=torch.Generator().manual_seed(35))
    path = save_direction(work / "r.safetensors", r, {"source": "derive"})
    plan = build_plan(
        table=table,
        checkpoint=Checkpoint.open(folder),
        config=config,
        direction=load_directions([path], d_model, n_layers, None, False),
        source=str(folder),
        tied_policy="untie",
    )
    out = work / "out"
    out.mkdir()
    stream_edit(plan, Checkpoint.open(folder), out)
    untied = json.loads(json.dumps(config)) | {"tie_word_embeddings": False}
    if isinstance(untied.get("text_config"), dict):  # as apply unties a wrapper
        untied["text_config"]["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(untied))
    return plan, out, r


def prove(table: ArchitectureTable, folder: Path, work: Path, media: Media | None = None) -> None:
    """Apply ``table``'s full plan to the instance in ``folder``; the edited logits must
    equal the plan's hooks and the residual stream carry no r, on a text prompt and, for a
    multimodal wrapper, on its media prompt (an image, and audio where it has a tower)."""
    import torch

    from ...runtime.session import load_model
    from ..checkpoint import Checkpoint

    plan, out, r = _edit(table, folder, work)
    ids = torch.randint(3, 200, _TOKENS, generator=torch.Generator().manual_seed(4))
    calls = {"float64": [{"input_ids": ids}]}
    if media is not None:
        calls.setdefault(media.dtype, []).append(media.call)
    for dtype, prompts in calls.items():
        source, edited = load_model(folder, dtype), load_model(out, dtype)
        for call in prompts:
            diff, leak = _compare(source, edited, plan, table, Checkpoint.open(folder), r, call)
            if diff > PROOF_LOGITS or leak > PROOF_LEAK:
                prompt = "a text" if set(call) == {"input_ids"} else "the media"
                raise UnsupportedModelError(
                    f"{table.architectures[0]}: the derived writers are not exact on a tiny "
                    f"instance ({prompt} prompt, edited vs the plan's hooks: max |Δlogit| "
                    f"{diff:.2g}; residual leak {leak:.2g}); a writer was missed or its norms "
                    "misread."
                )


def _compare(source, edited, plan, table, checkpoint, r, call) -> tuple[float, float]:
    """(max |Δlogit| between the edited model and the source with the plan's hooks, the
    largest |r̂·x|/‖x‖ entering a block or the final norm of the edited model) on ``call``."""
    import torch

    from ...runtime.hooks import input_hooks, plan_hooks

    dtype = next(source.parameters()).dtype
    call = {k: v.to(dtype) if v.is_floating_point() else v for k, v in call.items()}
    clamp = source.get_input_embeddings().weight.shape[0] - 1
    call["input_ids"] = call["input_ids"].clamp(max=clamp)
    with torch.no_grad(), plan_hooks(source, plan, checkpoint):
        hooked = source(**call).logits
    unit, worst = (r / r.norm()).double(), [0.0]

    def seen(x):
        x = x.detach().double().reshape(-1, x.shape[-1])
        worst[0] = max(worst[0], float(((x @ unit).abs() / x.norm(dim=-1)).max()))

    paths = [table.blocks.module.format(layer=i) for i in range(plan.n_layers)]
    with torch.no_grad(), input_hooks(edited, [*paths, table.blocks.final_norm], seen):
        diff = float((edited(**call).logits - hooked).abs().max())
    return diff, worst[0]


def derive_table(config: dict) -> ArchitectureTable:
    """The table of ``config``'s class, derived on a tiny instance and proved there."""
    import torch

    with _one_thread():
        model, small, media = build_instance(config, media_prompt)
        with tempfile.TemporaryDirectory(prefix="orthoedit-derive-") as tmp:
            folder = Path(tmp) / "tiny"
            _save(model, folder)
            with torch.no_grad():
                table = _classified(model, small, config, folder, media)
            prove(table, folder, Path(tmp), media)
            _SEEN[table.family] = {_kind(name) for name in _saved_names(folder)}
    return table


@contextlib.contextmanager
def _one_thread():
    """The tiny instance's matrices are too small for threads to help: on a loaded machine
    they cost 50 times the work, so torch runs on one thread while deriving."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _save(model, folder: Path) -> None:
    """``save_pretrained`` without its progress bar; the model then in float64."""
    import torch
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(torch.float64)


def _kind(name: str) -> str:
    """A tensor name with every index (layer, expert) replaced by ``#``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "#", name)


def _saved_names(folder: Path) -> list[str]:
    from .assemble import DiskNames

    return sorted(DiskNames(folder).names)


def check_coverage(table: ArchitectureTable, names) -> None:
    """A derived table was read off a tiny instance: a checkpoint tensor of a kind that
    instance did not have (a layer kind it did not build, extra modules) may write into the
    residual stream unseen, so the edit is refused rather than leave it unedited. A name
    spelled as one of the table's prefix aliases counts as the instance's spelling."""
    seen = _SEEN.get(table.family)
    if not table.derived or seen is None:
        return
    unseen = sorted(n for n in names if _kind(_saved_spelling(table, n)) not in seen)
    if unseen:
        raise UnsupportedModelError(
            f"{unseen[0]} (and {len(unseen) - 1} more) is of a kind the tiny instance of "
            f"{table.architectures[0]} did not have, so derivation cannot tell whether it writes "
            "into the residual stream; this family needs a table."
        )


def _saved_spelling(table: ArchitectureTable, name: str) -> str:
    """``name`` with a prefix alias put back to the prefix the instance saved."""
    for prefix, aliases in table.checkpoint_prefix_aliases.items():
        for alias in aliases:
            if name.startswith(alias) and not name.startswith(prefix):
                return prefix + name[len(alias) :]
    return name


def _classified(model, small: dict, config: dict, folder: Path, media) -> ArchitectureTable:
    """The table read off the instance; whatever goes wrong there is a refusal, with why."""
    arch = config["architectures"][0]
    try:
        return ArchitectureTable.model_validate(classify(model, small, config, folder, media))
    except UnsupportedModelError:
        raise
    except ValidationError as err:
        first = err.errors()[0]
        raise UnsupportedModelError(
            f"{arch}: the writers derived from a tiny instance make no valid table "
            f"({first['msg']})."
        ) from err
    except Exception as err:  # a class whose forward the probes cannot drive
        raise UnsupportedModelError(
            f"{arch}: its writers could not be derived from a tiny instance "
            f"({type(err).__name__}: {err})."
        ) from err


_DERIVED: dict[tuple[str, str], ArchitectureTable] = {}
#: Per derived family, the kinds of tensor its tiny instance saved (indices as ``#``).
_SEEN: dict[str, set[str]] = {}


def table_or_derived(config: dict) -> ArchitectureTable:
    """The shipped table for config.json, or, for a transformers class without one, a
    derived table (cached per architecture and config)."""
    try:
        return table_for_config(config)
    except UnsupportedModelError:
        archs = config.get("architectures") or [None]
        refused = any(archs[0] in t.unsupported_architectures for t in load_tables().values())
        if archs[0] is None or refused:
            raise
    key = (archs[0], hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest())
    if key not in _DERIVED:
        _DERIVED[key] = derive_table(config)
    return _DERIVED[key]


def derived_tables() -> list[ArchitectureTable]:
    """The tables derived in this process so far."""
    return list(_DERIVED.values())
