"""Quantize a tiny float checkpoint the way the Hub's quantized checkpoints are stored (a
testing module: torch only, independent of orthoedit's own codecs).

FP8: every Linear weight of the decoder blocks (``*proj.weight``) as F8_E4M3 with a float32
``_scale_inv`` per ``block`` (as transformers' ``Fp8Quantize``), config.json's
``quantization_config`` set as transformers writes it; shards and index keep their layout.

MXFP4: gpt-oss's fused experts (``mlp.experts.gate_up_proj`` and ``down_proj``, ``[experts, in,
out]``) as the released checkpoints store them: ``<name>_blocks`` ``[experts, out, in/32, 16]``
uint8, two E2M1 values a byte, and ``<name>_scales`` ``[experts, out, in/32]`` uint8 E8M0
exponents; every other tensor as it was (BF16 in the released ones), and config.json's
``quantization_config`` as they have it. The codec is triton_kernels' ``downcast_to_mxfp_torch``
(which transformers' ``Mxfp4Quantize`` calls), rewritten here; transformers itself decodes it
(``mxfp4_dequantize``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"
#: E2M1 magnitudes and the midpoints between consecutive ones.
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_MIDPOINTS = (E2M1[1:] + E2M1[:-1]) / 2
#: config.json's quantization_config of the released gpt-oss checkpoints.
GPT_OSS_MXFP4 = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}


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


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 blocks ``[..., rows, cols/32, 16]``, uint8 scales ``[..., rows, cols/32]``) of
    ``w`` ``[..., rows, cols]`` in blocks of 32 along its last axis, as triton_kernels'
    ``downcast_to_mxfp_torch`` rounds: the scale is amax/6 rounded up to a power of two (at
    least 2⁻¹²⁶; 2⁻¹²⁷ for a block of zeros), each element w/scale rounded to the nearest E2M1
    value, ties away from zero, with its sign bit (low nibble first)."""
    *lead, rows, cols = w.shape
    groups = w.float().reshape(*lead, rows, cols // 32, 32)
    amax = groups.abs().amax(dim=-1)
    mantissa, exp = torch.frexp(amax / 6)  # amax/6 = mantissa · 2^exp, mantissa in [0.5, 1)
    exp = torch.where(mantissa == 0.5, exp - 1, exp).clamp(-126, 127)  # ceil(log2(amax/6))
    exp = torch.where(amax > 0, exp, -127)
    x = groups / torch.ldexp(torch.ones_like(amax), exp)[..., None]  # exact: a power of two
    code = torch.bucketize(x.abs().clamp(max=6.0).contiguous(), E2M1_MIDPOINTS, right=True)
    code = (code | (torch.signbit(x).int() << 3)).to(torch.uint8).reshape(*lead, rows, cols)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.reshape(*lead, rows, cols // 32, 16), (exp + 127).to(torch.uint8)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """transformers' own decoding of gpt-oss experts: ``[experts, in, out]`` float32."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


def is_mxfp4_expert(name: str) -> bool:
    """A gpt-oss expert weight the released checkpoints store in MXFP4."""
    return name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))


def quantize_mxfp4(src: Path, out: Path) -> Path:
    """Write the MXFP4 copy of the float gpt-oss checkpoint ``src`` to ``out``: experts'
    ``[experts, in, out]`` weights as ``_blocks``/``_scales`` of their transpose, in the same
    shard; every other tensor and file as it was."""
    out.mkdir(parents=True)
    for path in src.iterdir():
        if not path.name.endswith(".safetensors") and path.is_file():
            (out / path.name).write_bytes(path.read_bytes())
    index = json.loads((src / INDEX).read_text())
    for shard in sorted(src.glob("*.safetensors")):
        tensors = {}
        for name, value in load_file(shard).items():
            if not is_mxfp4_expert(name):
                tensors[name] = value
                continue
            blocks, scales = mxfp4_quantize(value.transpose(1, 2))
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            del index["weight_map"][name]
            index["weight_map"].update({name + "_blocks": shard.name, name + "_scales": shard.name})
        save_file(tensors, str(out / shard.name), {"format": "pt"})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (out / INDEX).write_text(json.dumps(index, indent=2))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = GPT_OSS_MXFP4
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
