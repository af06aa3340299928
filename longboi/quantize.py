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
    if model.head_proj is not None:  # quantize_int8 was applied
        return "int8 weights, fp32 activations"
    dtype = model.transformer.wte.weight.dtype
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype).removeprefix("torch."))
