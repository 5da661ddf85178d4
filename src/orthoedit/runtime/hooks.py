"""Run-time interventions with forward hooks: the reference the edited weights are checked against.

Every context manager here removes its hooks on exit, and fails loudly when a module path from
the architecture table does not resolve.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..edit.plan import Plan, op_basis
from ..model.architectures import ArchitectureTable
from ..model.checkpoint import Checkpoint
from ..model.direction import orthonormal


def project_out(x: torch.Tensor, u: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Activations ``x: [..., d_model]`` minus ``scale`` of their component along the unit
    vector u ``[d_model]``, or in the span of the orthonormal rows of u ``[k, d_model]``."""
    uu = u.to(device=x.device, dtype=x.dtype)
    if uu.ndim == 1:
        return x - scale * (x @ uu).unsqueeze(-1) * uu
    return x - scale * (x @ uu.T) @ uu


def _basis(vectors) -> torch.Tensor:
    """A float64 numpy basis ``[k, d]`` as a tensor; one vector as ``[d]`` (the fast path)."""
    q = torch.from_numpy(vectors)
    return q[0] if q.ndim == 2 and q.shape[0] == 1 else q


def resolve(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise RuntimeError(f"hook point {path!r} does not exist in {type(model).__name__}") from err


def resolve_branches(model: nn.Module, templates: Sequence[str], layer: int) -> list[nn.Module]:
    """The branch modules of one block among a table's templates (a hybrid model's block has
    self-attention or a linear-attention mixer, say); at least one must exist."""
    found = []
    for template in templates:
        with contextlib.suppress(AttributeError):
            found.append(model.get_submodule(template.format(layer=layer)))
    if not found:
        paths = " or ".join(t.format(layer=layer) for t in templates)
        raise RuntimeError(f"hook point {paths} does not exist in {type(model).__name__}")
    return found


def _map_output(fn: Callable[[torch.Tensor], torch.Tensor]):
    """Forward hook applying ``fn`` to a module's output (or the first item of a tuple)."""

    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return hook


def _map_input(fn: Callable[[torch.Tensor], torch.Tensor]):
    """Forward pre-hook applying ``fn`` to the hidden states a module receives."""

    def hook(_module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return hook


@contextlib.contextmanager
def _registered(handles_fn: Callable[[list], None]) -> Iterator[None]:
    handles: list = []
    try:
        handles_fn(handles)
        yield
    finally:
        for h in handles:
            h.remove()


def _projector(u: torch.Tensor, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: project_out(x, u, scale)


@contextlib.contextmanager
def plan_hooks(model: nn.Module, plan: Plan, checkpoint: Checkpoint) -> Iterator[None]:
    """The plan at run time: each planned writer's linear output loses ``scale`` of its
    component in its basis (its u, for one direction).

    With ``--tied edit`` the unembedding reads the edited embedding, which equals projecting
    the final hidden state out of the embedding's basis before ``lm_head``: that hook is added
    too.
    """
    per_module: dict[str, tuple[torch.Tensor, float]] = {}
    for op in plan.ops:
        if op.module not in per_module:
            per_module[op.module] = (_basis(op_basis(op, plan, checkpoint)), op.scale)

    def register(handles: list) -> None:
        for path, (u, scale) in per_module.items():
            mod = resolve(model, path)
            handles.append(mod.register_forward_hook(_map_output(_projector(u, scale))))
        if plan.unembed_projected:
            embed_op = next(op for op in plan.ops if op.tensor == plan.tied_embedding)
            head = resolve(model, plan.unembed_module)
            fn = _projector(_basis(op_basis(embed_op, plan, checkpoint)), embed_op.scale)
            handles.append(head.register_forward_pre_hook(_map_input(fn), with_kwargs=True))

    with _registered(register):
        yield


#: Where directional ablation acts: the residual stream entering every block, and the outputs
#: of every attention and MLP module.
ABLATION_POINTS = ("residual", "attn", "mlp")


@contextlib.contextmanager
def ablation_hooks(
    model: nn.Module,
    table: ArchitectureTable,
    r,
    n_layers: int,
    points: Sequence[str] = ABLATION_POINTS,
    layers: Sequence[int] | None = None,
) -> Iterator[None]:
    """Directional ablation as in Arditi et al. 2024: remove r from every block input and from
    every attention and MLP output, at every layer and position. ``points`` restricts it to a
    subset of ``ABLATION_POINTS`` and ``layers`` to some blocks (``orthoedit study sites``
    compares them). ``r``: one direction ``[d_model]`` or several ``[k, d_model]`` (their span
    is removed)."""
    unknown = set(points) - set(ABLATION_POINTS)
    if unknown or not points:
        raise ValueError(f"ablation points must be among {ABLATION_POINTS}, got {points!r}")
    layers = range(n_layers) if layers is None else layers
    if not layers or any(not 0 <= layer < n_layers for layer in layers):
        raise ValueError(f"ablation layers must be among 0..{n_layers - 1}, got {layers!r}")
    fn = _projector(_basis(orthonormal(r)), 1.0)
    branches = [
        paths for point, paths in (("attn", table.blocks.attn), ("mlp", table.blocks.mlp))
        if point in points
    ]  # fmt: skip

    def register(handles: list) -> None:
        for layer in layers:
            if "residual" in points:
                block = resolve(model, table.blocks.module.format(layer=layer))
                handles.append(block.register_forward_pre_hook(_map_input(fn), with_kwargs=True))
            for templates in branches:
                for mod in resolve_branches(model, templates, layer):
                    handles.append(mod.register_forward_hook(_map_output(fn)))

    with _registered(register):
        yield


@contextlib.contextmanager
def contribution_hooks(model: nn.Module, plan: Plan, checkpoint: Checkpoint) -> Iterator[None]:
    """Post-norm reference: project each planned writer's *normed contribution* along r̂ (out
    of the span of the layer's directions).

    For post-norm writers this differs from the plan (which projects the linear output along
    its own u, before the norm rescales it); verify reports the KL between the two.
    """
    per_module: dict[str, tuple[torch.Tensor, float]] = {}
    for op in plan.ops:
        path = op.contribution_module
        if path in per_module:
            continue
        if op.norm_tensors:
            per_module[path] = (_basis(plan.basis(op.layer)), op.scale)
        else:
            per_module[path] = (_basis(op_basis(op, plan, checkpoint)), op.scale)

    def register(handles: list) -> None:
        for path, (u, scale) in per_module.items():
            mod = resolve(model, path)
            handles.append(mod.register_forward_hook(_map_output(_projector(u, scale))))

    with _registered(register):
        yield


@contextlib.contextmanager
def input_hooks(
    model: nn.Module, paths: Sequence[str], fn: Callable[[torch.Tensor], None]
) -> Iterator[None]:
    """``fn`` sees the hidden states every module of ``paths`` receives (it changes nothing)."""

    def hook(_module, args, kwargs):
        fn(args[0] if args else kwargs["hidden_states"])

    def register(handles: list) -> None:
        for path in paths:
            mod = resolve(model, path)
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))

    with _registered(register):
        yield


@contextlib.contextmanager
def capture_block_inputs(
    model: nn.Module, table: ArchitectureTable, n_layers: int, last: int
) -> Iterator[list]:
    """Record the residual stream entering every block (layer i = input of block i), keeping
    only the ``last`` positions: yields a list whose entry i is ``[batch, last, d_model]`` after
    each forward pass."""
    captured: list = [None] * n_layers

    def keeper(layer: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[layer] = hidden[:, -last:, :].detach()

        return hook

    def register(handles: list) -> None:
        for layer in range(n_layers):
            block = resolve(model, table.blocks.module.format(layer=layer))
            handles.append(block.register_forward_pre_hook(keeper(layer), with_kwargs=True))

    with _registered(register):
        yield captured


@contextlib.contextmanager
def addition_hooks(
    model: nn.Module, table: ArchitectureTable, layer: int, vector: torch.Tensor
) -> Iterator[None]:
    """Activation addition: ``vector`` added to the residual stream entering block ``layer``,
    at every position (the "induce" intervention of Arditi et al. 2024)."""

    def add(x: torch.Tensor) -> torch.Tensor:
        return x + vector.to(device=x.device, dtype=x.dtype)

    def register(handles: list) -> None:
        block = resolve(model, table.blocks.module.format(layer=layer))
        handles.append(block.register_forward_pre_hook(_map_input(add), with_kwargs=True))

    with _registered(register):
        yield
