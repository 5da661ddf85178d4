"""Quantize a tiny float checkpoint the way the Hub's quantized checkpoints are stored (a
testing module: torch only, independent of orthoedit's own codecs).

FP8: every Linear weight of the decoder blocks (``*proj.weight``) as F8_E4M3 with a float32
``_scale_inv`` per ``block`` (as transformers' ``Fp8Quantize``), config.json's
``quantization_config`` set as transformers writes it; shards and index keep their layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"


def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(F8_E4M3 weight, float32 scale_inv) of a 2-D weight whose sides divide by the block."""
    bo, bi = block
    rows, cols = w.shape
    tiles = w.float().reshape(rows // bo, bo, cols // bi, bi)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, 448.0 / amax, torch.ones_like(amax))
    q = (tiles * scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.reshape(rows, cols), (1.0 / scale).float()


def fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]):
    bo, bi = block
    expanded = scale_inv.repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    return q.float() * expanded[: q.shape[0], : q.shape[1]]


def quantize_fp8(src: Path, out: Path, block: tuple[int, int] = (8, 16)) -> Path:
    """Write an FP8 block-scaled copy of the float checkpoint ``src`` to ``out``."""
    out.mkdir(parents=True)
    for path in src.iterdir():
        if not path.name.endswith(".safetensors") and path.is_file():
            (out / path.name).write_bytes(path.read_bytes())
    index = json.loads((src / INDEX).read_text())
    for shard in sorted(src.glob("*.safetensors")):
        tensors = {}
        for name, value in load_file(shard).items():
            if value.ndim == 2 and ".layers." in name and name.endswith("proj.weight"):
                tensors[name], tensors[name + "_scale_inv"] = fp8_quantize(value, block)
                index["weight_map"][name + "_scale_inv"] = shard.name
            else:
                tensors[name] = value
        save_file(tensors, str(out / shard.name), {"format": "pt"})
    (out / INDEX).write_text(json.dumps(index, indent=2))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": list(block),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
