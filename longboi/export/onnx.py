"""ONNX for onnxruntime: one decoder graph with an explicit KV cache, in Optimum's naming.

Inputs `input_ids` (B, T), `attention_mask` (B, past + T) and `past_key_values.{i}.key/.value`
(B, Hkv, past, D); outputs `logits` (B, T, vocab) and `present.{i}.key/.value` (B, Hkv, past + T, D).
Batch, new-token and past lengths are all dynamic, so the same graph prefills (past 0) and decodes
(T 1). The model's own forward picks an attention path by shape and data (cache objects, chunked
biases), which an exported graph cannot; `_Decoder` reuses every weight-bearing module and computes
attention in the one form that serves all shapes: SDPA with the full (B, H, T, past + T) ALiBi +
padding bias, built by `AttentionMask.bias` itself. Weights go to `model.onnx.data` (external
data: graphs over 2 GB cannot hold them inline). Needs `onnx` + `onnxscript` to export (the `export`
extra) and `onnxruntime` to run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from longboi.checkpoint import atomic_directory, config_json, load_config
from longboi.generate import left_pad
from longboi.model import AttentionMask, MPTForCausalLM
from longboi.tokenizer import Tokenizer


class _Decoder(nn.Module):
    """MPTForCausalLM as a pure function of (ids, mask, past) -> (logits, present)."""

    def __init__(self, model: MPTForCausalLM):
        super().__init__()
        self.model = model
        model.transformer.alibi_slopes(torch.device("cpu"))  # fill its cache now, not while tracing

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        trunk, cfg = self.model.transformer, self.model.config
        T, K = input_ids.shape[1], attention_mask.shape[1]  # new tokens; all positions (past + T)
        x = trunk.wte(input_ids)  # (B, T, d)
        if cfg.learned_pos_emb:  # left padding: a row's first real token is position 0 (as MPTModel)
            q_pos = torch.arange(T, device=x.device) + (K - T)  # a slice of arange(K) would not trace to length T
            x = x + trunk.wpe((q_pos - (attention_mask == 0).cumsum(dim=1).narrow(1, K - T, T)).clamp(min=0))
        # the model's own mask rules, always with key padding; all T query rows at once (one SDPA call)
        mask = AttentionMask(T, K, trunk.alibi_slopes(x.device), x.device, key_valid=attention_mask.bool())
        bias = mask.bias(0, T)  # (B, H|1, T, K)
        present = []
        for i, block in enumerate(trunk.blocks):
            attn = block.attn
            q, k, v = attn.project(block.norm_1(x))
            k, v = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)  # (B, Hkv, K, D)
            present += [k, v]
            if cfg.kv_heads != cfg.n_heads:  # GQA/MQA: each key/value head serves a group of query heads
                k = k.repeat_interleave(cfg.n_heads // cfg.kv_heads, dim=1)
                v = v.repeat_interleave(cfg.n_heads // cfg.kv_heads, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # (B, H, T, D)
            x = x + attn.out_proj(y.transpose(1, 2).flatten(2))
            x = x + block.ffn(block.norm_2(x))
        return (self.model.head(trunk.norm_f(x)), *present)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Optimum's decoder-with-past names: (inputs, outputs)."""
    kv = [f"{{}}.{i}.{part}" for i in range(n_layers) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask", *(n.format("past_key_values") for n in kv)]
    return inputs, ["logits", *(n.format("present") for n in kv)]


def export_onnx(model: MPTForCausalLM, tok: Tokenizer, out: str | Path) -> Path:
    """Write the directory `out` (model.onnx + model.onnx.data, config.json, tokenizer files), atomically."""
    _require("onnx", "onnxscript")
    program = _trace(model.float().eval())
    with atomic_directory(Path(out)) as tmp:
        program.save(str(tmp / "model.onnx"), external_data=True)
        _name_dims(tmp / "model.onnx")
        (tmp / "config.json").write_text(json.dumps(config_json(model.config), indent=2) + "\n")
        tok.save(tmp)
    return Path(out)


def _trace(model: MPTForCausalLM):
    cfg = model.config
    B, T, P = 2, 3, 4  # example dims > 1: an example of 1 is specialized into the graph (fixed batch)
    past = [torch.zeros(B, cfg.kv_heads, P, cfg.head_dim) for _ in range(2 * cfg.n_layers)]
    args = (torch.zeros(B, T, dtype=torch.long), torch.ones(B, P + T, dtype=torch.long), *past)
    inputs, outputs = io_names(cfg.n_layers)
    auto = torch.export.Dim.AUTO  # dynamic, with relations inferred (attention_mask's length is past + T)
    shapes = ({0: auto, 1: auto}, {0: auto, 1: auto}, ({0: auto, 2: auto},) * len(past))  # *past: one tuple
    quiet = logging.getLogger("torch.onnx")  # it warns that torchvision's ops are not registered
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the exporter narrates each step, torch warns itself
            return torch.onnx.export(
                _Decoder(model).eval(),
                args,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=shapes,
                dynamo=True,
            )
    finally:
        quiet.setLevel(level)


def _name_dims(path: Path) -> None:
    """Optimum's names for the dynamic dimensions (torch.export numbers them s0, s1, ...)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    g = proto.graph
    dims = {v.name: v.type.tensor_type.shape.dim for v in g.input}
    names = {dims["input_ids"][0].dim_param: "batch_size", dims["input_ids"][1].dim_param: "sequence_length"}
    names[dims["attention_mask"][1].dim_param] = "total_sequence_length"
    names |= {dims[v.name][2].dim_param: "past_sequence_length" for v in g.input[2:]}
    names.pop("", None)  # a fixed dimension has no symbol
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for value in (*g.input, *g.output, *g.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = symbol.sub(lambda m: names[m.group(1)], d.dim_param)
    onnx.save(proto, str(path))


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        from longboi.errors import UserError

        raise UserError(f"ONNX export needs {', '.join(missing)}: pip install 'longboi[export]'")


class OnnxDecoder:
    """An exported directory run by onnxruntime alone: prefill, then one token per step on the cache."""

    def __init__(self, directory: str | Path, threads: int | None = None):
        import onnxruntime as ort

        directory = Path(directory)
        self.config = load_config(directory)
        self.tokenizer = Tokenizer(directory)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs, self.outputs = io_names(self.config.n_layers)

    def step(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(B, T) ids, (B, past + T) mask, past arrays -> ((B, T, vocab) logits, present arrays)."""
        feed = dict(zip(self.inputs, [ids.astype(np.int64), mask.astype(np.int64), *past]))
        logits, *present = self.session.run(self.outputs, feed)
        return logits, present

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.config.kv_heads, 0, self.config.head_dim)
        return [np.zeros(shape, np.float32) for _ in self.inputs[2:]]

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of left-padded prompts, each ending before its EOS (as `longboi generate`:
        the padded part of the vocabulary is never picked)."""
        eos = self.tokenizer.eos_id
        ids, mask = (t.numpy() for t in left_pad(prompts, self.tokenizer.pad_id))
        past, out, done = self.empty_past(len(prompts)), [[] for _ in prompts], [False] * len(prompts)
        for _ in range(max_new_tokens):
            logits, past = self.step(ids, mask, past)
            ids = logits[:, -1, : self.tokenizer.vocab_size].argmax(-1)[:, None]
            mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
            for row, token in enumerate(ids[:, 0].tolist()):
                done[row] = done[row] or token == eos
                if not done[row]:
                    out[row].append(token)
            if all(done):
                break
        return out
