"""What orthoedit can edit: every family it has a table for, the architectures it refuses and
why, any other transformers class by a derived table (model/derive), and one model's config
checked without its weights (``orthoedit architectures``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .architectures import ArchitectureTable, Writer, load_tables
from .source import read_config, resolve_config


@dataclass(frozen=True)
class Family:
    """One row of the catalogue: a tabled family, or an architecture refused with a reason."""

    family: str
    status: str  # "tabled", "derived" or "refused"
    architectures: list[str]
    writers: list[str] = field(default_factory=list)
    norms: str = ""
    tied_default: str = ""
    reason: str = ""


def writer_label(writer: Writer) -> str:
    """A writer as one short phrase: its tensor's last parts, how its experts are stored, and
    the norms after it."""
    parts = [p for p in writer.tensor.split(".") if p not in ("{layer}", "{expert}", "weight")]
    name = ".".join(parts[-3:] if writer.experts or writer.fused else parts[-2:])
    if writer.experts:
        name += " (a tensor per expert)"
    elif writer.fused:
        name += " (experts fused)"
    for norm in writer.norms:
        name += f" → {norm.tensor.split('.')[-2]}"
    return f"{writer.site}: {name}"


def _norms(table: ArchitectureTable) -> str:
    offsets = {n.offset for w in table.writers for n in w.norms}
    if not offsets:
        return "pre-norm"
    gains = " and ".join(f"{'1 + w' if o == 1.0 else 'w'}" for o in sorted(offsets))
    return f"post-norm (gain {gains})"


#: The catalogue's row for every transformers class without a table.
DERIVED_ROW = Family(
    "any other",
    "derived",
    ["a transformers model class without a table"],
    reason="writers read off a tiny instance of the class and proved exact there before the "
    "edit (orthoedit architectures MODEL runs that on the config alone; a multimodal "
    "wrapper's projector is found on an image prompt); refused with the module it could not "
    "classify",
)


def _row(table: ArchitectureTable) -> Family:
    return Family(
        table.family,
        "derived" if table.derived else "tabled",
        table.architectures,
        list(dict.fromkeys(writer_label(w) for w in table.writers)),
        _norms(table),
        table.tied_default,
    )


def catalog() -> list[Family]:
    """Every tabled family, the derived ones (those derived in this process, and a row for
    any other class), then every refused architecture, each with its reason."""
    from .derive import derived_tables

    rows, refused = [], []
    for table in load_tables().values():
        rows.append(_row(table))
        refused += [
            Family(table.family, "refused", [arch], reason=why)
            for arch, why in table.unsupported_architectures.items()
        ]
    derived = [_row(t) for t in derived_tables()]
    return rows + derived + [DERIVED_ROW] + refused


@dataclass(frozen=True)
class ModelCheck:
    """One model's config against the catalogue."""

    model: str
    architecture: str | None
    model_type: str | None
    family: str | None
    status: str = "tabled"
    d_model: int | None = None
    n_layers: int | None = None
    tied: bool | None = None
    tied_policy: str | None = None
    writers: list[str] = field(default_factory=list)


def check_model(model: str, revision: str | None = None) -> ModelCheck:
    """Read MODEL's config.json (a local folder, or that one file from the Hub: no weights)
    and choose its table, or derive one on a tiny instance built from that config; raises
    ``UnsupportedModelError`` with the reason where orthoedit would refuse it."""
    from .derive import table_or_derived

    config = read_config(resolve_config(model, revision))
    archs = config.get("architectures") or [None]
    table = table_or_derived(config)
    d_model, n_layers, tied = table.dims(config)
    return ModelCheck(
        model,
        archs[0],
        config.get("model_type"),
        table.family,
        "derived" if table.derived else "tabled",
        d_model,
        n_layers,
        tied,
        table.tied_default if tied else None,
        [writer_label(w) for w in table.writers],
    )
