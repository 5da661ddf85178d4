"""Reference for ``bench_apply.py``: the full-load edit that existing abliteration tools do.

``from_pretrained`` the whole model, orthogonalize the residual writers in memory (token
embedding, every ``o_proj`` and ``down_proj``, in float32 with torch), ``save_pretrained``.
Prints one JSON line with the time of each phase.
Usage: ``python benchmarks/full_load.py SRC DIRECTION OUT``.
"""

from __future__ import annotations

import json
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from orthoedit.edit.ortho import unit  # noqa: E402
from orthoedit.model.direction import load_direction  # noqa: E402


def orthogonalize(weight: torch.Tensor, u: torch.Tensor, axis: int) -> torch.Tensor:
    """W - u uᵀW along ``axis`` in float32, cast back once (what in-memory tools do)."""
    w = weight.float().movedim(axis, -1)
    w -= (w @ u).unsqueeze(-1) * u
    return w.movedim(-1, axis).to(weight.dtype)


def main(src: str, direction: str, out: str) -> dict[str, float]:
    times = {"imports_s": time.perf_counter() - t0}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    times["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cfg = model.config
    r = load_direction(direction, cfg.hidden_size, cfg.num_hidden_layers).vector
    u = torch.from_numpy(unit(r)).float()
    with torch.no_grad():
        embed = model.get_input_embeddings()
        embed.weight.data = orthogonalize(embed.weight.data, u, axis=1)  # [vocab, d_model]
        for layer in model.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):  # [d_model, in]
                linear.weight.data = orthogonalize(linear.weight.data, u, axis=0)
    times["edit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(out)
    times["save_s"] = time.perf_counter() - t
    return times


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])), flush=True)
