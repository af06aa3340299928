"""Loading a model for inference: one policy for `generate`, `chat`, `serve`, `eval` and `perplexity`.

What can be loaded: a checkpoint directory (longboi's or a Hugging Face MPT one), a run directory (its
`final/` weights), or a LoRA adapter directory (merged onto the base checkpoint its adapter_config.json
names). Where: `--device auto` (CUDA when there is a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`. In
what: the precision the device computes natively (`auto`), fp32 or bf16, and int8 weights on the CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from longboi.checkpoint import load_config, load_model, load_tokenizer
from longboi.config import ModelConfig, Precision, Quantize
from longboi.errors import UserError
from longboi.hardware import native_bf16, resolve_precision
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N' -> a device this machine has."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from e
    if chosen.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible to this torch ({torch.__version__})")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0..")
    return chosen


def model_source(ckpt: str | Path) -> Path:
    """A checkpoint, a run directory (its final weights) or a LoRA adapter directory."""
    path = Path(ckpt)
    for candidate in (path, path / "final"):
        if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
            return candidate
    raise UserError(f"{ckpt}: not a checkpoint, run or adapter directory (no config.json or adapter_config.json)")


def adapter_base(adapter: Path) -> Path:
    """The base checkpoint a LoRA adapter was trained on (its `base_model_name_or_path`)."""
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise UserError(f"{adapter}: its base checkpoint {base!r} (base_model_name_or_path) is not a checkpoint here")
    return Path(base)


def is_adapter(source: Path) -> bool:
    return (source / "adapter_config.json").is_file()


def source_config(source: Path) -> ModelConfig:
    """The model config of a source (an adapter's is its base's), without loading weights."""
    return load_config(adapter_base(source) if is_adapter(source) else source)


def load_for_inference(
    ckpt: str | Path,
    dtype: Precision = "auto",
    quantize: Quantize = "none",
    device: str | torch.device = "auto",
    allow_pickle: bool = False,
    compiled: bool = False,
) -> tuple[MPTForCausalLM, Tokenizer]:
    """(model in eval mode on `device`, tokenizer) for any source `model_source` accepts. The precision
    is resolved for that device and printed once; int8 is the CPU's: PyTorch dynamic quantization, or
    with `compiled` (for `longboi.compiled`) int8 weights with bf16 activations, on CPUs with native bf16."""
    source = model_source(ckpt)
    if quantize == "int8" and device == "auto":
        device = "cpu"  # int8 weights are the CPU's: auto means the CPU for them, even where a GPU is
    where = device if isinstance(device, torch.device) else resolve_device(device)
    if quantize == "int8" and where.type != "cpu":
        raise UserError(
            "--quantize int8 runs on the CPU only (PyTorch dynamic quantization): use --device cpu (or bf16 on a GPU)"
        )
    if quantize == "int8" and compiled:
        _check_native_bf16(where)
    elif quantize == "int8" and dtype == "bf16":
        raise UserError("--quantize int8 computes activations in fp32: use --dtype auto or fp32 with it")
    weights = adapter_base(source) if is_adapter(source) else source
    tok = load_tokenizer(str(weights))
    if tok is None:
        raise UserError(f"{weights}: no tokenizer.json in the checkpoint directory")
    if quantize == "none" and not is_adapter(source):
        precision = resolve_precision(dtype, where).dtype
        return load_model(weights, allow_pickle=allow_pickle, device=where, dtype=precision), tok
    model = load_model(weights, allow_pickle=allow_pickle, dtype=torch.float32)
    if is_adapter(source):  # merged in fp32, then cast or quantized like any checkpoint
        from longboi.lora import load_adapter, merge

        model = merge(load_adapter(model, source))
    if quantize == "int8" and compiled:
        from longboi.quantize import quantize_int8_weights

        print("precision: int8 weights (linear layers and LM head), bf16 activations", file=sys.stderr)
        return quantize_int8_weights(model), tok
    if quantize == "int8":
        from longboi.quantize import quantize_int8

        print("precision: int8 weights (linear layers and LM head), fp32 activations", file=sys.stderr)
        return quantize_int8(model).eval(), tok
    return model.to(device=where, dtype=resolve_precision(dtype, where).dtype).eval(), tok


def _check_native_bf16(device: torch.device) -> None:
    """The compiled int8 kernels take bf16 activations: fast only where the CPU computes bf16 natively."""
    native, evidence = native_bf16(device)
    if not native:
        raise UserError(
            f"--compile with --quantize int8 needs a CPU with native bf16 (its int8 kernels take bf16 "
            f"activations; {evidence}): use --quantize int8 without --compile on this CPU"
        )


def serving_length(source: Path, max_model_len: int | None) -> int:
    """The longest prompt + completion to serve: the model's max_seq_len, or more for ALiBi models."""
    cfg = source_config(source)
    if max_model_len is None:
        return cfg.max_seq_len
    if max_model_len < 2:
        raise UserError(f"--max-model-len must be at least 2, got {max_model_len}")
    if max_model_len > cfg.max_seq_len and cfg.learned_pos_emb:
        raise UserError(
            f"--max-model-len {max_model_len} is past this model's max_seq_len {cfg.max_seq_len}, and its "
            "learned position embeddings cannot extrapolate (ALiBi models can)"
        )
    return max_model_len
