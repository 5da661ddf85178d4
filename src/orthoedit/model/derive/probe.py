"""Classification by perturbation: where a block's residual stream is, which parameters
write into it, and through which norms (model/derive)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from ...errors import UnsupportedModelError

#: Relative residual of "changed by a per-token multiple of v".
_PROPORTIONAL = 1e-6


def _hidden(args, kwargs):
    import torch

    x = args[0] if args else kwargs.get("hidden_states")
    return x if torch.is_tensor(x) and x.is_floating_point() else None


def _first(output):
    return output[0] if isinstance(output, tuple | list) else output


class _Stop(Exception):
    """Raised once the observed block has run."""


@dataclass
class Probe:
    """The instance and what a block looks like to the perturbations."""

    model: object
    d: int
    ids: object
    blocks: str  # path of the ModuleList of decoder blocks
    n_layers: int
    base: dict = field(default_factory=dict)

    def block(self, layer: int):
        return self.model.get_submodule(f"{self.blocks}.{layer}")

    def observe(self, layer: int, hooks=()) -> dict:
        """Every d-wide input of the block's modules (by path) and its output, flattened to
        ``[tokens, d]``, with extra ``(module, kind, fn)`` hooks in place."""
        seen: dict = {}
        block = self.block(layer)

        def pre(path):
            def hook(_m, args, kwargs):
                x = _hidden(args, kwargs)
                if x is not None and x.shape[-1] == self.d:
                    seen.setdefault(path, []).append(x.detach().reshape(-1, self.d).clone())

            return hook

        def out(_m, _args, output):
            seen["<out>"] = [_first(output).detach().reshape(-1, self.d).clone()]
            raise _Stop  # nothing after the block is observed: the rest of the model is skipped

        with contextlib.ExitStack() as stack:
            for path, mod in block.named_modules():
                h = mod.register_forward_pre_hook(pre(path), with_kwargs=True)
                stack.callback(h.remove)
            stack.callback(block.register_forward_hook(out).remove)
            for module, kind, fn in hooks:
                register = getattr(module, f"register_forward_{kind}")
                kwargs = {"with_kwargs": True} if kind == "pre_hook" else {}
                stack.callback(register(fn, **kwargs).remove)
            with contextlib.suppress(_Stop):
                self.model(input_ids=self.ids)
        return {k: __import__("torch").cat(v) for k, v in seen.items()}

    def changed_along(self, layer: int, after: dict, v) -> set[str]:
        """The points whose change from the unperturbed run is a per-token multiple of v."""
        found = set()
        for path, x in after.items():
            before = self.base[layer].get(path)
            if before is not None and before.shape == x.shape and moved_along(before, x, v):
                found.add(path)
        return found


def moved_along(before, after, v) -> bool:
    """Whether ``after - before`` (``[tokens, d]``) is a nonzero per-token multiple of v."""
    delta = after - before
    size = float(delta.norm())
    if size <= 1e-9 * float(before.norm()):
        return False
    c = delta @ v / (v @ v)
    return float((delta - c[:, None] * v).norm()) <= _PROPORTIONAL * size


def _along_axis(v, shape, axis: int, gen):
    """A perturbation of a tensor of ``shape`` whose every slice along ``axis`` is a multiple
    of v (an edit ``W -= u uᵀ W`` is one, with v = u)."""
    import torch

    other = list(shape)
    other[axis] = 1
    scale = torch.rand(other, generator=gen, dtype=v.dtype) + 0.5
    view = [1] * len(shape)
    view[axis] = -1
    return v.reshape(view) * scale


def _held(probe: Probe, layer: int) -> list:
    """Hooks holding every branch of the block (a direct child with a d-wide output) at its
    unperturbed output, so that a perturbed block input reaches only the residual path."""
    outputs = {}
    children = list(probe.block(layer).named_children())

    def keep(name):
        def hook(_m, _a, output):
            outputs[name] = output

        return hook

    def hold(name):
        def hook(_m, _a, output):
            kept = outputs.get(name)
            ok = kept is not None and _first(kept).shape == _first(output).shape
            return kept if ok and _first(output).shape[-1] == probe.d else output

        return hook

    probe.observe(layer, [(m, "hook", keep(n)) for n, m in children])
    return [(m, "hook", hold(n)) for n, m in children]


def residual_points(probe: Probe, layer: int, v) -> set[str]:
    """Module inputs (and the block output) on the residual stream of one block."""

    def shift(_m, args, kwargs):
        if args:
            return (args[0] + v.to(args[0].dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + v}

    hooks = [(probe.block(layer), "pre_hook", shift), *_held(probe, layer)]
    points = probe.changed_along(layer, probe.observe(layer, hooks), v)
    if "<out>" not in points:
        raise UnsupportedModelError(
            f"block {probe.blocks}.{layer} ({type(probe.block(layer)).__name__}): its output is "
            "not its input plus what its branches add, so its residual stream cannot be found."
        )
    return points


def norm_offset(module, d: int) -> float | None:
    """0.0 if ``module`` computes x / rms(x) · w, 1.0 for x / rms(x) · (1 + w), None if it
    is neither (a LayerNorm, a norm with a bias, or not a norm)."""
    import torch

    params = dict(module.named_parameters(recurse=False))
    if len(params) != 1 or next(iter(params.values())).shape != (d,):
        return None
    w = next(iter(params.values())).detach()
    x = torch.randn(3, 5, d, dtype=w.dtype, generator=torch.Generator().manual_seed(1)) * 100
    with torch.no_grad():
        try:
            y = _first(module(x))
        except Exception:
            return None
    normed = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    for offset in (0.0, 1.0):
        if torch.allclose(y, normed * (offset + w), rtol=1e-6, atol=1e-9):
            return offset
    return None


@dataclass
class Found:
    """One parameter that writes into the residual stream, as the instance names it."""

    param: str  # e.g. model.layers.0.self_attn.o_proj.weight
    module: str
    axis: int
    norms: list[tuple[str, float]]  # (norm module path, gain offset), innermost first
    layer: int | None


def _norm_like(block, d: int) -> dict[str, object]:
    """Modules whose only parameters are d-long vectors (norms, whatever their kind)."""
    found = {}
    for path, mod in block.named_modules():
        params = list(mod.parameters(recurse=False))
        if params and all(p.ndim == 1 and p.shape[0] == d for p in params):
            found[path] = mod
    return found


def _chain(probe: Probe, layer: int, points: set, start: str, v, depth: int = 0) -> list | None:
    """The norms from ``start`` (a norm whose input a parameter changes along v) to the
    residual stream, ``[(path, offset), ...]`` innermost first; None where its output does not
    reach the residual stream along v (a reader's norm: q/k norms)."""
    block = probe.block(layer)
    mod = block.get_submodule(start)

    def add(_m, _a, output):
        return output + v if not isinstance(output, tuple) else (output[0] + v, *output[1:])

    reached = probe.changed_along(layer, probe.observe(layer, [(mod, "hook", add)]), v)
    if reached & points:
        chain = [(start, norm_offset(mod, probe.d))]
    else:
        norms = [p for p in _norm_like(block, probe.d) if p != start and p in reached]
        if len(norms) != 1 or depth > 3:
            return None
        rest = _chain(probe, layer, points, norms[0], v, depth + 1)
        if rest is None:
            return None
        chain = [(start, norm_offset(mod, probe.d)), *rest]
    if chain[0][1] is None:
        raise UnsupportedModelError(
            f"{probe.blocks}.{layer}.{start} ({type(mod).__name__}) normalizes a writer's output "
            "before the residual add and is not an RMSNorm: no weight edit makes that exact."
        )
    return chain


def _perturbed(param, delta, run):
    """``run()`` with ``param`` shifted by ``delta``, restored after."""
    import torch

    kept = param.detach().clone()
    with torch.no_grad():
        param.add_(delta)
    try:
        return run()
    finally:
        with torch.no_grad():
            param.copy_(kept)


def classify_block(probe: Probe, layer: int, v, gen) -> list[Found]:
    """Every writer of one block, with the norms it passes through."""
    block, prefix = probe.block(layer), f"{probe.blocks}.{layer}"
    points = residual_points(probe, layer, v)
    norms = _norm_like(block, probe.d)
    found = []
    for name, param in block.named_parameters():
        module = name.rpartition(".")[0]
        for axis in [a for a, n in enumerate(param.shape) if n == probe.d]:
            delta = _along_axis(v, param.shape, axis, gen)
            delta *= (float(param.norm()) or 1.0) / float(delta.norm())
            after = _perturbed(param, delta, lambda: probe.observe(layer))
            reached = probe.changed_along(layer, after, v)
            if reached & points:
                found.append(Found(f"{prefix}.{name}", f"{prefix}.{module}", axis, [], layer))
                continue
            into = [p for p in norms if p in reached and p != module]
            chain = _chain(probe, layer, points, into[0], v) if len(into) == 1 else None
            if chain is not None:
                chain = [(f"{prefix}.{p}", o) for p, o in chain]
                found.append(Found(f"{prefix}.{name}", f"{prefix}.{module}", axis, chain, layer))
    _check_branches(found, probe, layer)
    return found


def _check_branches(found: list[Found], probe: Probe, layer: int) -> None:
    """Every branch (a direct child with weights of width d_model and a d-wide output) holds a
    writer, or the block adds something derivation could not classify."""
    prefix, block, d = f"{probe.blocks}.{layer}", probe.block(layer), probe.d
    wide: dict[str, bool] = {}

    def width(name):
        def hook(_m, _a, output):
            wide.setdefault(name, _first(output).shape[-1] == d)

        return hook

    hooks = [(mod, "hook", width(name)) for name, mod in block.named_children()]
    probe.observe(layer, hooks)
    writers = {f.module for f in found}
    for child, mod in block.named_children():
        weights = [p for p in mod.parameters() if p.ndim > 1 and d in p.shape]
        path = f"{prefix}.{child}"
        if (
            weights
            and wide.get(child)
            and not any(w == path or w.startswith(path + ".") for w in writers)
        ):
            raise UnsupportedModelError(
                f"{path} ({type(mod).__name__}) has a d_model-wide output but none of its weights "
                "could be classified as a residual writer, directly or through an RMSNorm."
            )


def _path_of(model, target) -> str:
    return next(path for path, mod in model.named_modules() if mod is target)


def find_blocks(model, d: int, n_layers: int, ids) -> str:
    """The ModuleList of decoder blocks: ``n_layers`` members that receive d-wide hidden
    states, each the next one's input."""
    import torch

    lists = [
        (path, mod)
        for path, mod in model.named_modules()
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers
    ]
    for path, mod in lists:
        seen: list = []
        hook = mod[0].register_forward_pre_hook(
            lambda _m, a, k, seen=seen: seen.append(_hidden(a, k)), with_kwargs=True
        )
        try:
            model(input_ids=ids)
        finally:
            hook.remove()
        if seen and seen[0] is not None and seen[0].shape[-1] == d:
            return path
    raise UnsupportedModelError(
        f"{type(model).__name__}: no list of {n_layers} decoder blocks taking d_model-wide "
        "hidden states was found."
    )


def find_final_norm(probe: Probe) -> str:
    """The first module outside the blocks that receives the last block's output."""
    model, calls, last = probe.model, [], probe.block(probe.n_layers - 1)
    inside = {id(m) for m in model.get_submodule(probe.blocks).modules()}
    handles = [last.register_forward_hook(lambda _m, _a, o: calls.append(("<last>", _first(o))))]
    for path, mod in model.named_modules():
        if id(mod) not in inside and path:
            hook = mod.register_forward_pre_hook(
                lambda _m, a, k, path=path: calls.append((path, _hidden(a, k))), with_kwargs=True
            )
            handles.append(hook)
    try:
        model(input_ids=probe.ids)
    finally:
        for h in handles:
            h.remove()
    at = [i for i, (p, _) in enumerate(calls) if p == "<last>"][-1]
    out = calls[at][1]
    for path, x in calls[at + 1 :]:
        if x is not None and x.shape == out.shape and bool((x == out).all()):
            return path
    raise UnsupportedModelError(f"{type(model).__name__}: no final norm after the last block.")


def classify_outside(probe: Probe, v, gen, skip: set[str]) -> list[Found]:
    """Parameters outside the blocks that write into the first block's input (the token
    embedding, learned position embeddings)."""
    model, found = probe.model, []
    inside = probe.blocks + "."
    for name, param in model.named_parameters():
        if name.startswith(inside) or name in skip:
            continue
        for axis in [a for a, n in enumerate(param.shape) if n == probe.d]:
            delta = _along_axis(v, param.shape, axis, gen)
            after = _perturbed(param, delta, lambda: probe.observe(0))
            if "" in probe.changed_along(0, after, v):
                found.append(Found(name, name.rpartition(".")[0], axis, [], None))
    return found


def _mixes_tokens(probe: Probe, layer: int, child: str) -> bool:
    """Whether a branch's output at later positions depends on its input at the first one
    (attention, recurrent and convolution mixers do; MLPs and experts do not)."""
    import torch

    mod, outputs = probe.block(layer).get_submodule(child), []

    def bump(_m, args, kwargs):
        x = _hidden(args, kwargs)
        if x is None or x.ndim != 3:
            return None
        y = x.clone()
        y[:, 0] += 1.0
        return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

    def keep(_m, _a, output):
        outputs.append(_first(output).detach())

    probe.observe(layer, [(mod, "hook", keep)])
    probe.observe(layer, [(mod, "pre_hook", bump), (mod, "hook", keep)])
    base, bumped = outputs[0], outputs[-1]
    if base.ndim != 3 or base.shape != bumped.shape:
        return False
    return not torch.allclose(base[:, 1:], bumped[:, 1:], rtol=0, atol=1e-12)
