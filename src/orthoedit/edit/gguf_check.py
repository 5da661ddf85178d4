"""What ``orthoedit verify`` reads of an edited GGUF (``gguf_apply`` writes it): the plan in
its ``orthoedit.plan`` key, the storage types of the edited tensors, and byte identity of all
the plan did not touch (the source's metadata bytes are the edited file's first, the
provenance keys after them; every unedited tensor's data is copied verbatim)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInputError
from ..model.checkpoint import same_bytes
from ..model.gguf import GgufCheckpoint, GgufTensor, read_layout
from .gguf_types import epsilon
from .plan import Plan

#: GGUF storage types verify has tolerances for (its ``TOLERANCES``: same names).
FLOAT_TYPES = ("F32", "F16", "BF16")
PLAN_KEY = "orthoedit.plan"


def load_plan(path: Path) -> Plan:
    """The plan an edited GGUF carries (``gguf_apply.provenance``)."""
    text = read_layout(path).get(PLAN_KEY)
    if not isinstance(text, str):
        raise BadInputError(f"{path} has no {PLAN_KEY} key: is it a GGUF written by apply?")
    try:
        return Plan.model_validate_json(text)
    except ValueError as err:
        raise BadInputError(f"{path}: {PLAN_KEY} is not a valid plan ({err}).") from err


def storage_type(plan: Plan, edited: GgufCheckpoint) -> str:
    """The storage type verify's tolerances are taken for: the coarsest type among the edited
    tensors (the largest ε, ``verify_gguf.epsilon``; the widest float type among floats)."""
    kinds = {edited.tensors[op.tensor].dtype for op in plan.ops}
    return max(sorted(kinds), key=epsilon)


def check_gguf_bytes(plan: Plan, source: GgufCheckpoint, edited: GgufCheckpoint, report) -> None:
    """As ``verify.check_bytes`` for safetensors: the metadata (the source's bytes first) and
    the tensor list (names, shapes, types of unedited tensors) identical, every unedited
    tensor's data byte-identical, an untied output matrix equal to the source embedding."""
    written = {source.source[op.tensor][0].name for op in plan.ops}
    theirs = {t.name: t for t in edited.layout.tensors}
    report.headers_identical = edited.layout.kv_bytes.startswith(source.layout.kv_bytes)
    for tensor in source.layout.tensors:
        twin = theirs.get(tensor.name)
        if twin is None or twin.shape != tensor.shape:
            report.headers_identical = False
        if tensor.name not in written and (twin is None or not _same(source, tensor, edited, twin)):
            report.byte_mismatches.append(tensor.name)
    if plan.write_lm_head:
        embedding = source.source[plan.tied_embedding][0]
        head = theirs.get("output.weight")
        if head is None or not _same(source, embedding, edited, head):
            report.byte_mismatches.append("output.weight")
    report.unedited_identical = not report.byte_mismatches


def _same(a: GgufCheckpoint, ta: GgufTensor, b: GgufCheckpoint, tb: GgufTensor) -> bool:
    if (ta.type, ta.shape, ta.nbytes) != (tb.type, tb.shape, tb.nbytes):
        return False
    return same_bytes(a.path, ta.start, b.path, tb.start, ta.nbytes)
