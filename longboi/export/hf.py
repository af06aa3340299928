"""Hugging Face `transformers` interop: which configs HF's native MPT computes, and conversion both ways.

HF's `MptForCausalLM` (no trust_remote_code) implements a fixed subset of MPT. What it does not
compute, established by tests/test_hf.py against the installed transformers, not from its docs:
- the MLP width is hard-coded to 4 * d_model (expansion_ratio is read but ignored);
- ALiBi is always on, always with alibi_bias_max 8 (learned position embeddings are never added);
- Linear layers and LayerNorms never have biases; LayerNorm is the only norm;
- attention is multi-head only (no GQA/MQA), with no QK-LayerNorm and no logit_scale;
- its config refuses a fractional attn_pdrop outright (typed int in transformers 5.x).
Such configs are refused by `export_hf` with an error naming each feature, except dropout: an
export is for inference, where dropout does nothing, so it is written as 0 (and said so).
"""

from __future__ import annotations

import sys
from pathlib import Path

from longboi.checkpoint import load_model, load_tokenizer, save_checkpoint
from longboi.config import ModelConfig, hf_unsupported
from longboi.errors import UserError
from longboi.export.vllm import check_vllm_servable, vllm_verdict


def check_hf_representable(cfg: ModelConfig) -> None:
    problems = hf_unsupported(cfg)
    if problems:
        raise UserError(
            "this model cannot be exported to transformers' MptForCausalLM, which does not support: "
            + "; ".join(problems)
        )


def export_hf(src: str | Path, dst: str | Path, allow_pickle: bool = False) -> Path:
    """Write a directory `transformers.MptForCausalLM.from_pretrained(dst)` loads with identical logits."""
    model = load_model(src, allow_pickle=allow_pickle)
    cfg = inference_config(model.config)
    check_hf_representable(cfg)
    path = save_checkpoint(model, dst, load_tokenizer(src), config=cfg)
    print(vllm_verdict(cfg), file=sys.stderr)
    return path


def export_vllm(src: str | Path, dst: str | Path) -> Path:
    """Write a directory `vllm serve` loads with longboi's plugin: any config, from a checkpoint, a run
    directory (its final weights) or a LoRA adapter (merged onto its base). The directory is a longboi
    checkpoint (model_type `mpt` where transformers' MptConfig represents it, else `longboi_mpt`)."""
    from longboi.inference import load_for_inference

    model, tok = load_for_inference(src, "fp32", device="cpu")
    cfg = inference_config(model.config)
    check_vllm_servable(cfg)
    path = save_checkpoint(model, dst, tok, config=cfg)
    print(vllm_verdict(cfg), file=sys.stderr)
    return path


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """The config an export writes: dropout is training-only, so it is written as 0 (and said so)."""
    if cfg.attn_pdrop or cfg.resid_pdrop or cfg.emb_pdrop:
        print("note: dropout is training-only; the export sets attn/resid/emb_pdrop to 0", file=sys.stderr)
        cfg = cfg.replace(attn_pdrop=0.0, resid_pdrop=0.0, emb_pdrop=0.0)
    return cfg


def import_checkpoint(src: str | Path, dst: str | Path, allow_pickle: bool = False) -> Path:
    """Read any MPT directory (ours, HF-saved, LLM Foundry's HF export) and write a longboi checkpoint."""
    model = load_model(src, allow_pickle=allow_pickle)
    return save_checkpoint(model, dst, load_tokenizer(src))
