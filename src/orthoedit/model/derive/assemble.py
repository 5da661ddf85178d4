"""From the classified parameters to a table: names on disk, templates, layers merged
(model/derive)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from ...errors import UnsupportedModelError
from .instance import (
    _EXPERT_KEYS,
    _LAYER_KEYS,
    _PER_LAYER_LISTS,
    _TOKENS,
    _layer_count,
    special_ids,
    text_part,
    text_prefix,
)
from .probe import (
    Found,
    Probe,
    _mixes_tokens,
    _path_of,
    classify_block,
    classify_outside,
    find_blocks,
    find_final_norm,
)


class DiskNames:
    """The tensors ``save_pretrained`` wrote, found by value (transformers may rename, split
    or transpose them on save)."""

    def __init__(self, folder: Path):
        import numpy as np
        from safetensors.numpy import load_file

        self.by_value: dict = {}
        for path in sorted(folder.glob("*.safetensors")):
            for name, array in load_file(path).items():
                key = (array.shape, hashlib.sha1(np.ascontiguousarray(array).tobytes()).digest())
                self.by_value.setdefault(key, []).append(name)
        self.names = {n for names in self.by_value.values() for n in names}

    def name_of(self, param) -> str | None:
        """The one name on disk holding exactly ``param``'s values (None if not one)."""
        return self._one(param.detach().float().numpy())

    def _one(self, array) -> str | None:
        import numpy as np

        key = (array.shape, hashlib.sha1(np.ascontiguousarray(array).tobytes()).digest())
        names = self.by_value.get(key, [])
        return names[0] if len(names) == 1 else None

    def find(self, name: str, param, axis: int) -> tuple[list[str], int]:
        """(names on disk, axis there): one name, or one per expert of a 3-D tensor saved
        as a tensor per expert."""
        array = param.detach().float().numpy()
        if (name := self._one(array)) is not None:
            return [name], axis
        if array.ndim == 2 and (name := self._one(array.T)) is not None:
            return [name], 1 - axis
        if array.ndim == 3 and axis > 0:
            names = [self._one(a) for a in array]
            if all(names):
                return names, axis - 1
            names = [self._one(a.T) for a in array]
            if all(names):
                return names, 2 - axis
        raise UnsupportedModelError(
            f"parameter {name} of the instance is not among the tensors that "
            "save_pretrained writes, so its name on disk is unknown."
        )


def layer_template(name: str, layer: int | None, list_name: str) -> str:
    """``name`` with the block index replaced by ``{layer}`` (the token after the blocks'
    ModuleList name)."""
    if layer is None:
        return name
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i] == str(layer) and parts[i - 1] == list_name:
            return ".".join([*parts[:i], "{layer}", *parts[i + 1 :]])
    raise UnsupportedModelError(f"tensor {name}: no block index {layer} in its name.")


def expert_template(names: list[str]) -> str:
    """One template for a tensor per expert: the part that differs becomes ``{expert}``."""
    split = [n.split(".") for n in names]
    differ = [i for i in range(len(split[0])) if len({tuple(s)[i] for s in split}) > 1]
    if len({len(s) for s in split}) != 1 or len(differ) != 1:
        raise UnsupportedModelError(f"tensors {names[0]}...: no single expert index in names.")
    parts = split[0]
    parts[differ[0]] = "{expert}"
    return ".".join(parts)


@dataclass(frozen=True)
class _Entry:
    """A writer of one layer, named as on disk (templates)."""

    site: str
    tensor: str
    axis: int
    fused: bool
    per_expert: bool
    module: str
    branch: str
    norms: tuple  # ((tensor template, offset, module template), ...)


def _entries(probe: Probe, layer: int, found: list[Found], disk: DiskNames) -> dict:
    """``{_Entry: bias template or None}`` for one layer's writers."""
    list_name = probe.blocks.rsplit(".", 1)[-1]
    block_path = f"{probe.blocks}.{layer}"
    params = dict(probe.model.named_parameters())

    def tmpl(name: str) -> str:
        return layer_template(name, layer, list_name)

    weights = {f.module: f for f in sorted(found, key=lambda f: params[f.param].ndim)}
    out: dict = {}
    for f in weights.values():
        names, axis = disk.find(f.param, params[f.param], f.axis)
        per_expert = len(names) > 1
        tensor = expert_template([tmpl(n) for n in names]) if len(names) > 1 else tmpl(names[0])
        norms = tuple(
            (tmpl(_norm_tensor(probe, path, disk)), offset, tmpl(path)) for path, offset in f.norms
        )
        child = f.module[len(block_path) + 1 :].split(".")[0]
        site = "attn" if _mixes_tokens(probe, layer, child) else "mlp"
        fused = params[f.param].ndim == 3 and not per_expert
        entry = _Entry(site, tensor, axis, fused, per_expert, tmpl(f.module),
                       tmpl(f"{block_path}.{child}"), norms)  # fmt: skip
        out[entry] = None
    for f in found:
        if f is weights[f.module]:
            continue
        entry = next(e for e in out if e.module == layer_template(f.module, layer, list_name))
        names, _ = disk.find(f.param, params[f.param], f.axis)
        out[entry] = expert_template([tmpl(n) for n in names]) if len(names) > 1 else tmpl(names[0])
    return out


def _norm_tensor(probe: Probe, path: str, disk: DiskNames) -> str:
    (name, param), *_ = probe.model.get_submodule(path).named_parameters(recurse=False)
    return disk.find(f"{path}.{name}", param, 0)[0][0]


def _norm_dicts(norms: tuple) -> list[dict]:
    return [{"kind": "rms", "tensor": t, "offset": o, "module": m} for t, o, m in norms]


def _condition(entry: _Entry, others: list[_Entry], layers: dict, disk: DiskNames) -> dict:
    """when/unless: a norm tensor of this variant's chain present in all its layers and none
    of the other variants' (or the reverse)."""

    def present(template: str, layer: int) -> bool:
        return template.format(layer=layer) in disk.names

    mine = layers[entry]
    theirs = [layer for o in others for layer in layers[o]]
    for t, _, _ in entry.norms:
        if all(present(t, i) for i in mine) and not any(present(t, i) for i in theirs):
            return {"when": t}
    for o in others:
        for t, _, _ in o.norms:
            if not any(present(t, i) for i in mine) and all(present(t, i) for i in theirs):
                return {"unless": t}
    raise UnsupportedModelError(
        f"{entry.tensor} passes through different norms in different layers, and no tensor "
        "tells those layers apart."
    )


def _unify_sites(per_layer: list[dict]) -> list[dict]:
    """A writer mixes tokens if it does in any layer (a layer that reuses an earlier layer's
    keys and values mixes none of its own input)."""
    mixing = {e.tensor for entries in per_layer for e in entries if e.site == "attn"}
    return [
        {replace(e, site="attn" if e.tensor in mixing else "mlp"): b for e, b in entries.items()}
        for entries in per_layer
    ]


def _writers(per_layer: list[dict], embed: list[dict], config: dict, disk) -> list[dict]:
    """The table's writers: each layer's entries merged over layers (optional where some
    layer lacks one; when/unless where one tensor's norms differ by layer)."""
    layers: dict = {}
    biases: dict = {}
    for i, entries in enumerate(per_layer):
        for entry, bias in entries.items():
            layers.setdefault(entry, []).append(i)
            biases[entry] = bias or biases.get(entry)
    text, prefix = text_part(config), text_prefix(config)
    experts = [prefix + k for k in _EXPERT_KEYS if isinstance(text.get(k), int)]
    writers = list(embed)
    for entry, where in layers.items():
        w = {"site": entry.site, "tensor": entry.tensor, "axis": entry.axis,
             "module": entry.module}  # fmt: skip
        if entry.fused:
            w["fused"] = True
        if entry.per_expert:
            if not experts:
                raise UnsupportedModelError(
                    f"{entry.tensor}: a tensor per expert, but config.json names no number of "
                    f"experts ({', '.join(_EXPERT_KEYS)})."
                )
            w["experts"] = experts
        if biases[entry]:
            w["bias"] = biases[entry]
        if entry.norms:
            w["post_norm"], *outer = _norm_dicts(entry.norms)
            w["outer_norms"] = outer
        if len(where) < len(per_layer):
            w["optional"] = True
        others = [e for e in layers if e.tensor == entry.tensor and e != entry]
        if others:
            w |= _condition(entry, others, layers, disk)
        writers.append(w)
    return writers


def _probe(model, small: dict, d: int) -> Probe:
    import torch

    gen = torch.Generator().manual_seed(2)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, max(vocab, 4), _TOKENS, generator=gen)
    ids[torch.isin(ids, torch.tensor(sorted(special_ids(small)) or [-1]))] = 3
    n_layers = _layer_count(small)
    probe = Probe(model, d, ids, find_blocks(model, d, n_layers, ids), n_layers)
    probe.base = {i: probe.observe(i) for i in range(n_layers)}
    return probe


def classify(model, small: dict, config: dict, folder: Path, media=None) -> dict:
    """The table (a dict for ``ArchitectureTable``) read off the instance saved in ``folder``;
    with ``media`` (a multimodal wrapper's prompt), the projectors' writers too."""
    import torch

    d = model.get_input_embeddings().weight.shape[1]
    probe = _probe(model, small, d)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    disk = DiskNames(folder)
    per_layer = []
    for i in range(probe.n_layers):
        per_layer.append(_entries(probe, i, classify_block(probe, i, v, gen), disk))
    per_layer = _unify_sites(per_layer)
    head = model.get_output_embeddings()
    head_path = _path_of(model, head)
    embed, tied_to = _embed_writers(probe, v, gen, disk, head_path)
    if media is not None:
        embed += _media_writers(probe, media, v, gen, disk)
    writers = _writers(per_layer, embed, config, disk)
    head_name = f"{head_path}.weight"
    if head.weight is not model.get_input_embeddings().weight:
        head_name = disk.find(head_name, head.weight, 0)[0][0]
    table = _table_dict(config, probe, writers, head_name, head_path, tied_to, per_layer)
    table["checkpoint_prefix_aliases"] = aliases(model, disk, _templates(table))
    return table


def _embed_writers(probe: Probe, v, gen, disk: DiskNames, head_path: str) -> tuple[list, str]:
    """The writers of the first block's input on a text prompt (the token embedding, learned
    positions), and the token embedding's name on disk."""
    model = probe.model
    embed_param = model.get_input_embeddings().weight
    outside = classify_outside(probe, v, gen, skip={f"{head_path}.weight"})
    params = dict(model.named_parameters())
    embed, tied_to = [], None
    for f in outside:
        names, axis = disk.find(f.param, params[f.param], f.axis)
        embed.append({"site": "embed", "tensor": names[0], "axis": axis, "module": f.module})
        if params[f.param] is embed_param:
            tied_to = names[0]
    if tied_to is None:
        raise UnsupportedModelError("the token embedding does not write into the first block.")
    return embed, tied_to


def _media_writers(probe: Probe, media, v, gen, disk: DiskNames) -> list[dict]:
    """An ``embed`` writer per kind of media token: its projector's last layer."""
    from .projector import media_writers

    params = dict(probe.model.named_parameters())
    writers = []
    for _kind, (weight, *bias) in media_writers(probe.model, media, probe.blocks, v, gen):
        names, axis = disk.find(weight.param, params[weight.param], weight.axis)
        w = {"site": "embed", "tensor": names[0], "axis": axis, "module": weight.module}
        if bias:
            w["bias"] = disk.find(bias[0].param, params[bias[0].param], 0)[0][0]
        writers.append(w)
    return writers


def _templates(table: dict) -> set[str]:
    """Every tensor name template the table holds."""
    found = {table["unembed"]["tensor"], table["unembed"]["tied_to"]}
    for w in table["writers"]:
        found |= {w[k] for k in ("tensor", "bias", "when", "unless") if w.get(k)}
        found |= {n["tensor"] for n in [w.get("post_norm"), *w.get("outer_norms", [])] if n}
    return found


def _prefixes(on_disk: str, at_run_time: str) -> tuple[str, str]:
    """The leading parts in which two names of one tensor differ (at least one part each)."""
    a, b = on_disk.split("."), at_run_time.split(".")
    while len(a) > 1 and len(b) > 1 and a[-1] == b[-1]:
        a, b = a[:-1], b[:-1]
    return ".".join(a) + ".", ".".join(b) + "."


def aliases(model, disk: DiskNames, templates: set[str]) -> dict[str, list[str]]:
    """``checkpoint_prefix_aliases``: where ``save_pretrained`` spells a tensor the table
    names otherwise than the model does at run time (a wrapper's nesting), checkpoints may
    hold either spelling."""
    found: dict[str, list[str]] = {}
    for name, param in model.named_parameters():
        on_disk = disk.name_of(param)
        if on_disk is None or on_disk == name:
            continue
        a, b = _prefixes(on_disk, name)
        if a != b and any(t.startswith(a) for t in templates) and b not in found.get(a, []):
            found.setdefault(a, []).append(b)
    return found


def _table_dict(config, probe, writers, head_name, head_path, tied_to, per_layer) -> dict:
    arch, model_type = config["architectures"][0], config.get("model_type") or "unknown"
    branches = {"attn": [], "mlp": []}
    for entries in per_layer:
        for e in entries:
            if e.branch not in branches[e.site]:
                branches[e.site].append(e.branch)
    sites = [{e.site for e in entries} for entries in per_layer]
    keys = _config_keys(config, probe.model, head_path)
    return {
        "family": f"{model_type} (derived)",
        "description": f"{arch}: writers derived from a tiny instance of the class and proved "
        "exact on it; no reviewed table.",
        "architectures": [arch],
        "model_types": [model_type],
        "config": keys,
        "tied_default": "untie",
        "tied_reason": "Derived table: untying is exact in transformers; untested in other "
        "runtimes, which may force tying for this family.",
        "writers": writers,
        "mixers": "each" if all(s == {"attn", "mlp"} for s in sites) else "one",
        "blocks": {
            "module": f"{probe.blocks}.{{layer}}",
            "attn": branches["attn"] or [f"{probe.blocks}.{{layer}}"],
            "mlp": branches["mlp"] or [f"{probe.blocks}.{{layer}}"],
            "final_norm": find_final_norm(probe),
        },
        "unembed": {"tensor": head_name, "module": head_path, "tied_to": tied_to},
        "derived": True,
    }


def _config_keys(config: dict, model, head_path: str) -> dict:
    """Where config.json keeps the sizes (a wrapper's under text_config) and which
    tie_word_embeddings transformers obeys: that of the (sub)model whose tied-weights mapping
    names the head."""
    from ..architectures import config_value

    text, prefix = text_part(config), text_prefix(config)
    tie = "tie_word_embeddings"
    for path, sub in model.named_modules():
        mapping = getattr(sub, "_tied_weights_keys", None)
        if isinstance(mapping, dict) and head_path + ".weight" in {
            f"{path}.{k}" if path else k for k in mapping
        }:
            where = [k for k, c in vars(model.config).items() if c is sub.config]
            tie = f"{where[0]}.{tie}" if sub.config is not model.config and where else tie
            break
    tied = config_value(model.config.to_dict(), tie)
    return {
        "hidden_size": prefix + next((k for k in ("hidden_size", "n_embd", "d_model") if k in text),
                                     "hidden_size"),
        "num_layers": [prefix + k for k in (*_PER_LAYER_LISTS, *_LAYER_KEYS) if k in text]
        or [prefix + "num_hidden_layers"],
        "tie": tie,
        "tie_default": bool(tied),
    }  # fmt: skip
