"""What writes a media token's embedding, found by observation on the media prompt
(model/derive): the innermost module whose output is exactly the rows that reach the first
block at that kind's placeholder positions (a projector's last layer), and, replayed alone in
float64, those of its parameters that move its output along v when perturbed along v on an
axis of length d_model (its weight, and its bias). The towers before it are left alone. The
residual stream must then run from block to block untouched at every position: a module that
adds into it between blocks is refused by name."""

from __future__ import annotations

import contextlib
import copy

from ...errors import UnsupportedModelError
from .media import Media
from .probe import Found, _along_axis, _first, _hidden, _perturbed, moved_along


@contextlib.contextmanager
def _in_dtype(model, media: Media):
    """The model in the dtype the media prompt runs in (float64, or float32 for a tower
    that runs in no other), put back after."""
    import torch

    kept = next(model.parameters()).dtype
    dtype = getattr(torch, media.dtype)
    model.to(dtype)
    try:
        with torch.no_grad():
            yield dtype
    finally:
        model.to(kept)


def _observe(model, media: Media, blocks: str) -> tuple[dict, list, list]:
    """({module path: its tensor output, flattened to [rows, d]}, block inputs, block outputs)
    over the media prompt."""
    import torch

    d, outputs = model.get_input_embeddings().weight.shape[1], {}
    ins, outs = [], []
    layers = model.get_submodule(blocks)

    def keep(path):
        def hook(_m, _a, output):
            y = _first(output)
            if torch.is_tensor(y) and y.is_floating_point() and y.shape[-1] == d:
                outputs.setdefault(path, []).append(y.detach().reshape(-1, d))

        return hook

    with contextlib.ExitStack() as stack, _in_dtype(model, media) as dtype:
        for path, mod in model.named_modules():
            if path and not path.startswith(blocks + "."):
                stack.callback(mod.register_forward_hook(keep(path)).remove)
        for block in layers:
            pre = block.register_forward_pre_hook(
                lambda _m, a, k: ins.append(_hidden(a, k).detach()), with_kwargs=True
            )
            post = block.register_forward_hook(lambda _m, _a, o: outs.append(_first(o).detach()))
            stack.callback(pre.remove)
            stack.callback(post.remove)
        model(**media.cast(dtype))
    return {p: torch.cat(ys) for p, ys in outputs.items()}, ins, outs


def _nearest(model, outputs: dict, rows) -> str:
    """The module whose output looks most like ``rows`` (for a refusal that names it)."""
    same = {p: y for p, y in outputs.items() if y.shape == rows.shape}
    if not same:
        return "no module outputs as many rows"
    fit = {
        p: float((y * rows).sum().abs() / (y.norm() * rows.norm() + 1e-30)) for p, y in same.items()
    }
    best = [p for p in fit if fit[p] >= max(fit.values()) - 1e-9]
    path = next(p for p in best if not any(o.startswith(p + ".") for o in best))
    return f"nearest: {path} ({type(model.get_submodule(path)).__name__})"


def writer_module(model, outputs: dict, rows, kind: str) -> str:
    """The innermost module whose output is exactly ``rows`` (the rows of ``kind`` tokens
    entering the first block)."""
    import torch

    match = [p for p, y in outputs.items() if y.shape == rows.shape and torch.equal(y, rows)]
    inner = [p for p in match if not any(o.startswith(p + ".") for o in match)]
    if len(inner) != 1:
        found = ", ".join(inner) or _nearest(model, outputs, rows)
        raise UnsupportedModelError(
            f"{type(model).__name__}: the {kind} tokens' embeddings that reach the first block "
            f"are not exactly one module's output ({found}): something changes them after the "
            "projector, which derivation cannot classify; this family needs a table."
        )
    return inner[0]


def _inputs(model, media: Media, path: str) -> tuple:
    """The (args, kwargs) the module at ``path`` is first called with, in float64."""
    import torch

    seen: list = []
    mod = model.get_submodule(path)
    hook = mod.register_forward_pre_hook(
        lambda _m, a, k: seen.append((a, k)) if not seen else None, with_kwargs=True
    )
    try:
        with _in_dtype(model, media) as dtype:
            model(**media.cast(dtype))
    finally:
        hook.remove()

    def up(x):
        return x.to(torch.float64) if torch.is_tensor(x) and x.is_floating_point() else x

    args, kwargs = seen[0]
    return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}


def classify_writer(model, media: Media, path: str, v, gen, kind: str) -> list[Found]:
    """The parameters of the module at ``path`` that write along d_model: replayed alone in
    float64 on its own inputs, a perturbation along v on that axis moves every output row
    along v. One weight (2-D or more) and at most one bias, or a refusal naming the module."""
    import torch

    d = v.shape[0]
    args, kwargs = _inputs(model, media, path)
    mod = copy.deepcopy(model.get_submodule(path)).to(torch.float64)

    def run():
        with torch.no_grad():
            return _first(mod(*args, **kwargs)).reshape(-1, d)

    base, found = run(), []
    for name, param in mod.named_parameters():
        for axis in [a for a, n in enumerate(param.shape) if n == d]:
            delta = _along_axis(v, param.shape, axis, gen)
            delta *= (float(param.norm()) or 1.0) / float(delta.norm())
            if moved_along(base, _perturbed(param, delta, run), v):
                found.append(Found(f"{path}.{name}" if name else path, path, axis, [], None))
    weights = [f for f in found if mod.get_parameter(f.param[len(path) + 1 :]).ndim > 1]
    if len(weights) != 1 or len(found) > 2:
        what = "no weight" if not weights else f"{len(found)} parameters"
        raise UnsupportedModelError(
            f"{path} ({type(mod).__name__}) writes the {kind} tokens' embeddings, but {what} of "
            "it could be classified as one residual writer (a weight, and a bias); this family "
            "needs a table."
        )
    return weights + [f for f in found if f not in weights]


def check_between_blocks(model, outputs: dict, ins: list, outs: list, blocks: str) -> None:
    """Every block receives exactly what the one before it returned: a module adding into
    the residual stream between blocks (Qwen3-VL's deepstack mergers) is refused by name."""
    import torch

    for i in range(1, len(ins)):
        if ins[i].shape != outs[i - 1].shape or torch.equal(ins[i], outs[i - 1]):
            continue
        d = ins[i].shape[-1]
        diff = (ins[i] - outs[i - 1]).reshape(-1, d)
        rows = diff[diff.abs().amax(-1) > 0]
        raise UnsupportedModelError(
            f"{type(model).__name__}: something adds into the residual stream between "
            f"{blocks}.{i - 1} and {blocks}.{i} ({_nearest(model, outputs, rows)}), outside "
            "every block, where derivation classifies no writer; this family needs a table."
        )


def media_writers(model, media: Media, blocks: str, v, gen) -> list[tuple[str, list[Found]]]:
    """(kind, [weight, bias?]) for each kind of media token, found on the media prompt."""
    outputs, ins, outs = _observe(model, media, blocks)
    check_between_blocks(model, outputs, ins, outs, blocks)
    first = ins[0].reshape(-1, ins[0].shape[-1])  # batch 1: positions index its rows
    found = []
    for kind, where in media.positions.items():
        rows = first[where]
        path = writer_module(model, outputs, rows, kind)
        found.append((kind, classify_writer(model, media, path, v, gen, kind)))
    return found
