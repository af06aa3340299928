"""GGUF for llama.cpp: its `mpt` architecture, our weights, our tokenizer.

llama.cpp's MPT graph (src/models/mpt.cpp) reads from the file: feed_forward_length, layer-norm eps,
clamp_kqv, max_alibi_bias (0: no ALiBi), an optional head_count_kv, optional biases, optional learned
position embeddings (position_embd), and falls back to token_embd for the output when the head is tied.
Tensor names and layouts are its own; weights are written as torch stores them ((out, in) rows; ggml
reads the dimensions reversed). The tokenizer goes in as llama.cpp's byte-level BPE ("gpt2": tokens,
token types, merges) padded to the model's vocabulary with unused tokens, with the pre-tokenizer
llama.cpp uses for GPT-NeoX-style BPE ("mpt").
Needs the `gguf` package (the `export` extra).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from longboi.config import ModelConfig
from longboi.errors import UserError
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer

OutType = Literal["f32", "f16", "bf16", "q8_0"]


def unsupported(cfg: ModelConfig) -> list[str]:
    """The settings llama.cpp's MPT graph does not compute, each naming the knob (src/models/mpt.cpp)."""
    problems = []
    if cfg.qk_ln:  # its graph reshapes a non-contiguous view of q (tests/test_gguf.py shows the abort)
        problems.append("qk_ln: llama.cpp's MPT aborts with attn_q_norm (GGML_ASSERT(ggml_is_contiguous(a)))")
    if cfg.norm_type == "rmsnorm":
        problems.append("norm_type rmsnorm: llama.cpp's MPT uses LayerNorm")
    if cfg.softmax_scale is not None:
        problems.append("softmax_scale: llama.cpp's MPT always scales by 1/sqrt(head_dim)")
    if cfg.logit_scale is not None:
        problems.append("logit_scale: llama.cpp's MPT has no logit scaling")
    return problems


def export_gguf(
    model: MPTForCausalLM, tok: Tokenizer | None, out: str | Path, outtype: OutType = "f32", check: bool = True
) -> Path:
    """Write `out` (a .gguf file, atomically) from a model and its tokenizer; llama.cpp loads it as MPT.
    check=False writes even what llama.cpp computes differently (the tests use it to show that it does)."""
    gguf = _gguf()
    if tok is None:
        raise UserError("GGUF carries the tokenizer: the checkpoint has no tokenizer.json")
    cfg = model.config
    problems = unsupported(cfg)
    if problems and check:
        raise UserError("llama.cpp cannot compute this model: " + "; ".join(problems))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), "mpt")
        _metadata(writer, cfg, out.stem)
        _vocabulary(writer, gguf, tok, cfg.vocab_size)
        for name, tensor in _tensors(model):
            _add_tensor(writer, gguf, name, tensor, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)  # a crash never leaves a truncated file under the real name
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise UserError("GGUF export needs the gguf package: pip install 'longboi[export]'") from e
    return gguf


def _metadata(writer, cfg: ModelConfig, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden)
    writer.add_head_count(cfg.n_heads)
    if cfg.kv_heads != cfg.n_heads:
        writer.add_head_count_kv(cfg.kv_heads)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    if cfg.clip_qkv is not None:
        writer.add_clamp_kqv(cfg.clip_qkv)
    writer.add_max_alibi_bias(float(cfg.alibi_bias_max) if cfg.alibi else 0.0)


def _vocabulary(writer, gguf, tok, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp reads it, padded with unused tokens up to the model's vocabulary."""
    spec = json.loads(tok.path.read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{tok.path}: GGUF export supports byte-level BPE tokenizers, not {model.get('type')}")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(_token_type(gguf, added.get(i)))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("mpt")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tok.eos_id is not None:
        writer.add_bos_token_id(tok.eos_id)
        writer.add_eos_token_id(tok.eos_id)
    writer.add_add_bos_token(False)


def _token_type(gguf, added: dict | None):
    """NORMAL for the BPE vocabulary; an added token is CONTROL only when special (EOS, padding). The
    others, such as GPT-NeoX's 23 runs of spaces, are USER_DEFINED, as llama.cpp's own converter marks
    them: llama.cpp matches those in text and prints them, while CONTROL tokens are neither produced
    from text nor printed (generated indentation would vanish)."""
    if added is None:
        return gguf.TokenType.NORMAL
    return gguf.TokenType.CONTROL if added.get("special", True) else gguf.TokenType.USER_DEFINED


def _tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) in llama.cpp's MPT naming."""
    t = model.transformer
    out = [("token_embd.weight", t.wte.weight), ("output_norm.weight", t.norm_f.weight)]
    if getattr(t.norm_f, "bias", None) is not None:
        out.append(("output_norm.bias", t.norm_f.bias))
    if model.config.learned_pos_emb:  # llama.cpp adds position_embd rows by absolute position, as we do
        out.append(("position_embd.weight", t.wpe.weight))
    if not model.config.tie_word_embeddings:
        out.append(("output.weight", model.lm_head.weight))
    for i, b in enumerate(t.blocks):
        parts = {
            "attn_norm": b.norm_1,
            "attn_qkv": b.attn.Wqkv,
            "attn_output": b.attn.out_proj,
            "ffn_norm": b.norm_2,
            "ffn_up": b.ffn.up_proj,
            "ffn_down": b.ffn.down_proj,
        }
        if model.config.qk_ln:  # written for the refusal test only: llama.cpp's MPT aborts on them
            parts |= {"attn_q_norm": b.attn.q_ln, "attn_k_norm": b.attn.k_ln}
        for name, module in parts.items():
            out.append((f"blk.{i}.{name}.weight", module.weight))
            if getattr(module, "bias", None) is not None:
                out.append((f"blk.{i}.{name}.bias", module.bias))
    return out


def _add_tensor(writer, gguf, name: str, tensor: torch.Tensor, outtype: OutType) -> None:
    data = tensor.detach().float().numpy()
    matrix = data.ndim == 2
    if outtype == "q8_0" and data.ndim == 2 and data.shape[1] % 32 == 0:
        writer.add_tensor(
            name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
        )
    elif outtype == "f16" and matrix:
        writer.add_tensor(name, data.astype(np.float16))
    elif outtype == "bf16" and matrix:
        writer.add_tensor(
            name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), raw_dtype=gguf.GGMLQuantizationType.BF16
        )
    else:  # norms (and f32) stay fp32, as llama.cpp's converter keeps them
        writer.add_tensor(name, data)
