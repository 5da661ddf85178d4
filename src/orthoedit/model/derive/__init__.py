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
* the gain convention of each norm (``x · w`` or ``x · (1 + w)``) is tested on the module.

Each parameter is found among the tensors ``save_pretrained`` writes by its values, and the
table is then proved on the instance: ``apply`` with it, edited logits equal the plan's hooks
(≤ 1e-4, float64) and no block input nor the final norm's input carries r (≤ 1e-5).
"""

from __future__ import annotations

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
    path = save_direction(work / "direction.safetensors", r, {"source": "derive"})
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
    (out / "config.json").write_text(json.dumps(config | {table.config.tie: False}))
    return plan, out, r


def prove(table: ArchitectureTable, folder: Path, work: Path) -> None:
    """Apply ``table``'s full plan to the instance in ``folder``; the edited logits must
    equal the plan's hooks and the residual stream carry no r."""
    import torch

    from ...runtime.hooks import input_hooks, plan_hooks
    from ...runtime.session import load_model
    from ..checkpoint import Checkpoint

    plan, out, r = _edit(table, folder, work)
    source, edited = load_model(folder, "float64"), load_model(out, "float64")
    ids = torch.randint(3, 200, _TOKENS, generator=torch.Generator().manual_seed(4))
    ids = ids.clamp(max=source.get_input_embeddings().weight.shape[0] - 1)
    with torch.no_grad(), plan_hooks(source, plan, Checkpoint.open(folder)):
        hooked = source(input_ids=ids).logits
    unit, worst = (r / r.norm()).double(), [0.0]

    def seen(x):
        x = x.detach().double().reshape(-1, x.shape[-1])
        worst[0] = max(worst[0], float(((x @ unit).abs() / x.norm(dim=-1)).max()))

    paths = [table.blocks.module.format(layer=i) for i in range(plan.n_layers)]
    with torch.no_grad(), input_hooks(edited, [*paths, table.blocks.final_norm], seen):
        diff = float((edited(input_ids=ids).logits - hooked).abs().max())
    if diff > PROOF_LOGITS or worst[0] > PROOF_LEAK:
        raise UnsupportedModelError(
            f"{table.architectures[0]}: the derived writers are not exact on a tiny instance "
            f"(edited vs the plan's hooks: max |Δlogit| {diff:.2g}; residual leak "
            f"{worst[0]:.2g}); a writer was missed or its norms misread."
        )


def derive_table(config: dict) -> ArchitectureTable:
    """The table of ``config``'s class, derived on a tiny instance and proved there."""
    import torch
    from transformers.utils import logging as hf_logging

    model, small = build_instance(config)
    with tempfile.TemporaryDirectory(prefix="orthoedit-derive-") as tmp:
        folder = Path(tmp) / "tiny"
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(folder)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        model.to(torch.float64)
        with torch.no_grad():
            table = _classified(model, small, config, folder)
        prove(table, folder, Path(tmp))
        _SEEN[table.family] = {_kind(name) for name in _saved_names(folder)}
    return table


def _kind(name: str) -> str:
    """A tensor name with every index (layer, expert) replaced by ``#``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "#", name)


def _saved_names(folder: Path) -> list[str]:
    from .assemble import DiskNames

    return sorted(DiskNames(folder).names)


def check_coverage(table: ArchitectureTable, names) -> None:
    """A derived table was read off a tiny instance: a checkpoint tensor of a kind that
    instance did not have (a layer kind it did not build, extra modules) may write into the
    residual stream unseen, so the edit is refused rather than leave it unedited."""
    seen = _SEEN.get(table.family)
    if not table.derived or seen is None:
        return
    unseen = sorted(n for n in names if _kind(n) not in seen)
    if unseen:
        raise UnsupportedModelError(
            f"{unseen[0]} (and {len(unseen) - 1} more) is of a kind the tiny instance of "
            f"{table.architectures[0]} did not have, so derivation cannot tell whether it writes "
            "into the residual stream; this family needs a table."
        )


def _classified(model, small: dict, config: dict, folder: Path) -> ArchitectureTable:
    """The table read off the instance; whatever goes wrong there is a refusal, with why."""
    arch = config["architectures"][0]
    try:
        return ArchitectureTable.model_validate(classify(model, small, config, folder))
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
