"""Running many token rows through a model at once (docs/design.md §9): length-sorted batches,
left padding with positions that count real tokens, and the prefix every row shares run once,
its cache reused.

Not every model allows both. Recurrent mixers (Mamba, short convolutions) carry left padding
into their state where they do not mask it, and their caches (and chunked attention's) cannot
always be copied for a batch. Whether a loaded model allows each is found once by running it
(``pads_safely``, ``shares_prefix``): a short random row alone against the same row padded in
a batch, and against the row continued from a shared prefix's cache; where the two differ or
the cache cannot be reused, the batches hold rows of one length, or the prefix runs with
every row.
"""

from __future__ import annotations

import copy

import torch

#: Largest |Δ| / max(1, max |output|) between a row's outputs run alone and batched that still
#: counts as the same, by the dtype the model runs in: rounding differs with the batch's shapes
#: (about 1e-6 in float32, a few 1e-3 in 16 bits), while padding leaking into a recurrent state
#: moves every later position by 1e-3 to tenths.
SAME = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def length_sorted_batches(
    lengths: list[int], batch_size: int, equal: bool = False
) -> list[list[int]]:
    """Indices grouped by similar length, so little of each batch is padding; with ``equal``,
    by equal length only, so no batch has any (for models that do not mask it: see
    ``pads_safely``)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if not equal:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and lengths[batches[-1][0]] == lengths[i]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def input_device(model) -> torch.device:
    """Where token ids go in: the input embedding's device. With a ``device_map`` that
    offloads to disk, weights sit on the meta device until accelerate's hooks load them, and
    those hooks move inputs to the execution device: such a model takes its ids on the CPU."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


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
    if len(rows) < 2 or not shares_prefix(model):
        return 0
    n = min(_common(rows), min(map(len, rows)) - keep)
    window = getattr(model.config, "sliding_window", None)
    if window and max(map(len, rows)) > window:
        return 0
    return n if n >= MIN_SHARED_PREFIX else 0


def _common(rows: list[list[int]]) -> int:
    """How many leading tokens all rows share."""
    n, limit = 0, min(map(len, rows))
    while n < limit and all(row[n] == rows[0][n] for row in rows):
        n += 1
    return n


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
    equal = not pads_safely(model)
    for batch in length_sorted_batches([len(r) for r in rows], batch_size, equal):
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

    def __init__(self, model, rows: list[list[int]], keep: int = 1, probing: bool = False, **kw):
        self.n = _common(rows) - keep if probing else shared_prefix(model, rows, keep)
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
def _probe(model, check) -> bool:
    """``check(model, rows)`` on two random rows sharing a 12-token prefix, remembered on the
    model (a probe runs a few short rows once per model and question)."""
    memo = model.__dict__.setdefault("_orthoedit_batching", {})
    if check.__name__ not in memo:
        gen = torch.Generator().manual_seed(0)
        vocab = model.get_input_embeddings().weight.shape[0]
        rand = lambda n: torch.randint(4, max(5, vocab - 64), (n,), generator=gen).tolist()  # noqa: E731
        prefix = rand(12)
        rows = [prefix + rand(3), prefix + rand(7)]
        try:
            memo[check.__name__] = bool(check(model, rows))
        except (AttributeError, NotImplementedError, RuntimeError, TypeError, ValueError):
            # a cache without batch_repeat_interleave, a mask the mixer rejects: the slower,
            # always-right way (rows of one length, the prefix run with every row)
            memo[check.__name__] = False
    return memo[check.__name__]


def _outputs(output, n: int) -> torch.Tensor:
    """The last ``n`` positions of a model's logits (or hidden states, for a base model)."""
    values = output.logits if hasattr(output, "logits") else output[0]
    return values[:, -n:].float()


def _same(model, a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = SAME.get(next(model.parameters()).dtype, SAME[torch.bfloat16])
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def _padding_check(model, rows: list[list[int]]) -> bool:
    """Every position of the shorter row, alone and left-padded beside the longer one."""
    device, n = input_device(model), len(rows[0])
    alone = _outputs(model(input_ids=torch.tensor([rows[0]], device=device)), n)
    batched = _outputs(model(**left_padded(rows, 0, device)), n)
    return _same(model, batched[0], alone[0])


def _prefix_check(model, rows: list[list[int]]) -> bool:
    """The tails of both rows, continued from their prefix's cache, against each alone."""
    device = input_device(model)
    prefix = SharedPrefix(model, rows, probing=True)
    enc = left_padded([row[prefix.n :] for row in rows], 0, device)
    enc["attention_mask"] = prefix.mask(enc["attention_mask"])
    enc["position_ids"] = enc["position_ids"] + prefix.n
    out = model(**enc, use_cache=True, **{prefix.cache_name: prefix.cache_for(len(rows))})
    for i, row in enumerate(rows):
        n = len(row) - prefix.n
        alone = _outputs(model(input_ids=torch.tensor([row], device=device)), n)
        if not _same(model, _outputs(out, n)[i], alone[0]):
            return False
    return True


def pads_safely(model) -> bool:
    """Whether a left-padded, masked row gives what it gives alone (false for recurrent mixers
    that do not mask the padding)."""
    return _probe(model, _padding_check)


def shares_prefix(model) -> bool:
    """Whether rows may continue from a copy of their shared prefix's cache (false where the
    cache cannot be repeated for a batch or gives other answers)."""
    return _probe(model, _prefix_check)
