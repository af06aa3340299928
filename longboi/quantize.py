"""int8 weights for CPU inference: PyTorch's dynamic quantization of every linear layer, LM head included.

Chosen by measurement on a 2-core AVX2 EPYC (torch 2.13, mpt-125m greedy decode, random weights):
fp32 27 tokens/s at batch 1 and 88 at batch 8; int8 block linears alone 42 and 179; int8 blocks + int8
LM head 80 and 449 (3.0x and 5.1x fp32). The head is 39M of mpt-125m's 125M parameters and every
decode step reads all of it, so it must be int8 too. Dynamic quantization keeps activations in fp32 and
quantizes them per step (no calibration data needed); its kernels (fbgemm) run on AVX2, where bf16 is
emulated and ~100x slower. torchao's int8 configs were slower than fp32 on AVX2 in a small trial.
`torch.ao.quantization.quantize_dynamic` is deprecated in favour of torchao but still works in 2.13.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from longboi.model import MPTForCausalLM


def quantize_int8(model: MPTForCausalLM) -> MPTForCausalLM:
    """Replace every block linear and the LM head by int8-weight (dynamic) versions, in place; for
    inference only (the returned model cannot train). The embedding lookup stays fp32."""
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("int8 quantization starts from fp32 weights")
    cfg = model.config
    head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    head.weight = nn.Parameter(model.head_weight.detach().clone(), requires_grad=False)
    with warnings.catch_warnings():  # the deprecation notice of torch.ao.quantization, once per call
        warnings.simplefilter("ignore")
        model.transformer.blocks = torch.ao.quantization.quantize_dynamic(
            model.transformer.blocks, {nn.Linear}, dtype=torch.qint8
        )
        model.head_proj = torch.ao.quantization.quantize_dynamic(nn.Sequential(head), {nn.Linear}, dtype=torch.qint8)
    return model.eval()


def precision_of(model: MPTForCausalLM) -> str:
    """What a loaded model computes in (fp32, bf16, or int8 weights), for results and start-up lines:
    the numbers depend on it."""
    if isinstance(model.head_proj, Int8Linear):  # quantize_int8_weights was applied
        return "int8 weights, bf16 activations"
    if model.head_proj is not None:  # quantize_int8 was applied
        return "int8 weights, fp32 activations"
    dtype = model.transformer.wte.weight.dtype
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype).removeprefix("torch."))


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights (one fp scale per output row) and bf16 activations,
    computed by `torch._weight_int8pack_mm`; inductor's max-autotune lowers that op to a C++ template
    with AMX/AVX512 kernels, which is what makes it fast (in eager mode it is slower than fp32)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # symmetric, per output row (as q8_0 per block)
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(self.scale.dtype)
        return torch._weight_int8pack_mm(rows, self.weight, self.scale).reshape(*x.shape[:-1], -1)


def quantize_int8_weights(model: MPTForCausalLM) -> MPTForCausalLM:
    """int8 weights for every block linear and the LM head, bf16 for the rest and for activations: the
    form `longboi.compiled` decodes fastest (10.5 ms a step on mpt-125m on an AMX Xeon against 38 for
    the dynamic form's kernels compiled). Bias-free models only (MPT's default)."""
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("int8 quantization starts from fp32 weights")
    if not model.config.no_bias:
        raise ValueError("int8 weight-only quantization needs a bias-free model (no_bias: true)")
    head = Int8Linear(model.head_weight)
    for block in model.transformer.blocks:
        attn, ffn = block.attn, block.ffn
        attn.Wqkv, attn.out_proj = Int8Linear(attn.Wqkv.weight), Int8Linear(attn.out_proj.weight)
        ffn.up_proj, ffn.down_proj = Int8Linear(ffn.up_proj.weight), Int8Linear(ffn.down_proj.weight)
    model = model.to(torch.bfloat16)  # embeddings, norms; Int8Linear keeps its int8 weights (not floating)
    model.head_proj = head
    return model.eval()
