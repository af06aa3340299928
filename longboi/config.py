"""Model configuration: a typed dataclass, its validation, the named presets, and the MPT JSON form.

`ModelConfig` carries every architecture knob of the MPT decoder. It is written to disk as an MPT
`config.json` (the layout Hugging Face's `MptConfig` and LLM Foundry both read), so one checkpoint
directory serves longboi, `transformers` and LLM Foundry alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from longboi.errors import UserError

AttnType = Literal["multihead_attention", "grouped_query_attention", "multiquery_attention"]
# Compute precision: auto takes bf16 where the device computes it natively, else fp32 (longboi.hardware).
Precision = Literal["auto", "fp32", "bf16"]
Quantize = Literal["none", "int8"]  # int8: longboi.quantize (weights only; activations stay fp32)
NormType = Literal["layernorm", "low_precision_layernorm", "rmsnorm"]
AttnImpl = Literal["sdpa", "eager", "flash"]
InitScheme = Literal["kaiming_normal", "normal"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an MPT decoder. Field names follow MPT's `config.json`."""

    d_model: int
    n_heads: int
    n_layers: int
    expansion_ratio: float = 4
    max_seq_len: int = 2048
    vocab_size: int = 50432
    attn_type: AttnType = "multihead_attention"
    kv_n_heads: int | None = None  # only for grouped_query_attention
    alibi: bool = True
    alibi_bias_max: int = 8
    learned_pos_emb: bool = False  # only when alibi is off
    no_bias: bool = True
    norm_type: NormType = "low_precision_layernorm"
    layer_norm_epsilon: float = 1e-5
    qk_ln: bool = False
    clip_qkv: float | None = None
    softmax_scale: float | None = None  # None: 1/sqrt(head_dim)
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    embedding_fraction: float = 1.0
    logit_scale: float | None = None
    tie_word_embeddings: bool = True
    init_scheme: InitScheme = "kaiming_normal"  # kaiming: fan_in, relu gain (MPT's default)
    init_std: float = 0.02  # for init_scheme "normal"
    init_div_is_residual: bool = True  # scale out_proj/down_proj init by 1/sqrt(2*n_layers)
    emb_init_std: float | None = None  # None: embeddings use init_scheme too
    attn_impl: AttnImpl = "sdpa"  # "flash" needs CUDA + the flash-attn package

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads: n_heads (MHA), kv_n_heads (GQA) or 1 (MQA)."""
        if self.attn_type == "multiquery_attention":
            return 1
        if self.attn_type == "grouped_query_attention":
            assert self.kv_n_heads is not None
            return self.kv_n_heads
        return self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return int(self.expansion_ratio * self.d_model)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated like any other config)."""
        return from_dict(ModelConfig, {**dataclasses.asdict(self), **changes}, "ModelConfig")


def _validate(c: ModelConfig) -> None:
    checks = [
        (c.d_model > 0 and c.n_heads > 0 and c.n_layers > 0, "d_model, n_heads and n_layers must be positive"),
        (c.d_model % c.n_heads == 0, f"d_model ({c.d_model}) must be divisible by n_heads ({c.n_heads})"),
        (c.expansion_ratio > 0 and c.ffn_hidden > 0, f"expansion_ratio ({c.expansion_ratio}) must be positive"),
        (c.max_seq_len > 0 and c.vocab_size > 0, "max_seq_len and vocab_size must be positive"),
        (not (c.alibi and c.learned_pos_emb), "learned_pos_emb must be false when alibi is true (pick one)"),
        (c.alibi_bias_max > 0, "alibi_bias_max must be positive"),
        (c.clip_qkv is None or c.clip_qkv > 0, "clip_qkv must be positive or null"),
        (c.softmax_scale is None or c.softmax_scale > 0, "softmax_scale must be positive or null"),
        (0 < c.embedding_fraction <= 1, "embedding_fraction must be in (0, 1]"),
        (all(0 <= p < 1 for p in (c.attn_pdrop, c.resid_pdrop, c.emb_pdrop)), "dropout rates must be in [0, 1)"),
        (c.layer_norm_epsilon > 0 and c.init_std > 0, "layer_norm_epsilon and init_std must be positive"),
    ]
    if c.attn_type == "grouped_query_attention":
        kv = c.kv_n_heads
        checks.append((kv is not None and kv > 0, "grouped_query_attention needs kv_n_heads"))
        checks.append(
            (kv is None or c.n_heads % kv == 0, f"n_heads ({c.n_heads}) must be divisible by kv_n_heads ({kv})")
        )
    else:
        checks.append((c.kv_n_heads is None, "kv_n_heads is only used with attn_type: grouped_query_attention"))
    for ok, message in checks:
        if not ok:
            raise UserError(f"invalid model config: {message}")


# The published MPT family (LLM Foundry's yamls/mpt-*.yaml) plus `tiny`, which trains on 2 CPU cores.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=256, n_heads=4, n_layers=4, max_seq_len=256),
    "mpt-125m": ModelConfig(d_model=768, n_heads=12, n_layers=12),
    "mpt-350m": ModelConfig(d_model=1024, n_heads=16, n_layers=24),
    "mpt-760m": ModelConfig(d_model=1536, n_heads=12, n_layers=24),
    "mpt-1b": ModelConfig(d_model=2048, n_heads=16, n_layers=24),
    "mpt-3b": ModelConfig(d_model=2560, n_heads=20, n_layers=32),
    "mpt-7b": ModelConfig(d_model=4096, n_heads=32, n_layers=32),
    "mpt-30b": ModelConfig(d_model=7168, n_heads=64, n_layers=48, max_seq_len=8192),
}


def preset(name: str) -> ModelConfig:
    """The named preset, or an error listing the valid names."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}{_suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------
# Typed loading: dict (from YAML/JSON) -> dataclass, with errors that name the key and suggest.


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a plain dict, checking keys and types.

    `where` names the source for error messages (a file path, `file.yaml: train.optimizer`...).
    Unknown keys are errors that suggest the nearest valid key; required fields must be present.
    """
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of keys for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise UserError(f"{where}: unknown key {key!r}{_suggest(str(key), fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{where}.{name}" if where else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}: missing required key {name!r}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against type `tp`, converting only where no information is lost (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not match {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(
                f"{where}: {value!r} is not one of {list(choices)}{_suggest(str(value), map(str, choices))}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return type(value)(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    return _coerce_scalar(tp, value, where)


def _coerce_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 6e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    name = getattr(tp, "__name__", str(tp))
    raise UserError(f"{where}: expected {name}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# The MPT config.json form (what HF `MptConfig` and LLM Foundry's `MPTConfig` read).

_ATTN_KEYS = (
    "attn_type",
    "kv_n_heads",
    "alibi",
    "alibi_bias_max",
    "qk_ln",
    "clip_qkv",
    "softmax_scale",
    "attn_pdrop",
    "attn_impl",
)
_INIT_KEYS = {"init_div_is_residual": "init_div_is_residual", "emb_init_std": "emb_init_std", "init_std": "std"}
_INIT_NAMES = {"kaiming_normal": "kaiming_normal_", "normal": "normal_"}
# attn_impl names used by LLM Foundry/HF -> ours
_IMPL_FROM_MPT = {"torch": "sdpa", "triton": "sdpa", "flash": "flash", "sdpa": "sdpa", "eager": "eager"}
# Architecture features of LLM Foundry's MPT that longboi does not implement: (section, key, off-values).
_UNSUPPORTED_MPT = [
    ("attn_config", "rope", (None, False)),
    ("attn_config", "sliding_window_size", (None, -1)),
    ("attn_config", "qk_gn", (None, False)),
    ("attn_config", "prefix_lm", (None, False)),
    ("attn_config", "attn_logit_softcapping", (None,)),
    ("", "final_logit_softcapping", (None,)),
    ("", "block_overrides", (None, {})),
]
_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}


def hf_unsupported(cfg: ModelConfig) -> list[str]:
    """The features of `cfg` that transformers' native MptForCausalLM would silently compute differently."""
    problems = []
    if cfg.attn_type != "multihead_attention":
        problems.append(f"attn_type={cfg.attn_type} (HF MPT is multi-head only)")
    if cfg.qk_ln:
        problems.append("qk_ln=true (HF MPT has no QK-LayerNorm)")
    if not cfg.alibi:
        problems.append("alibi=false (HF MPT always applies ALiBi)")
    if cfg.learned_pos_emb:
        problems.append("learned_pos_emb=true (HF MPT has no position embedding)")
    if cfg.alibi and cfg.alibi_bias_max != 8:
        problems.append(f"alibi_bias_max={cfg.alibi_bias_max} (HF MPT always uses 8)")
    if cfg.expansion_ratio != 4:
        problems.append(f"expansion_ratio={cfg.expansion_ratio} (HF MPT's MLP is always 4 * d_model)")
    if not cfg.no_bias:
        problems.append("no_bias=false (HF MPT has no biases)")
    if cfg.norm_type == "rmsnorm":
        problems.append("norm_type=rmsnorm (HF MPT uses LayerNorm)")
    if cfg.logit_scale is not None:
        problems.append(f"logit_scale={cfg.logit_scale} (HF MPT does not scale logits)")
    if cfg.attn_pdrop != 0:
        problems.append(f"attn_pdrop={cfg.attn_pdrop} (HF's MptConfig only accepts an int)")
    return problems


def to_mpt_dict(c: ModelConfig) -> dict[str, Any]:
    """The config in MPT's nested `config.json` layout (attn_config / init_config sub-dicts)."""
    flat = dataclasses.asdict(c)
    attn = {k: flat.pop(k) for k in _ATTN_KEYS}
    if attn["kv_n_heads"] is None:  # a null would be read as a head count (vLLM 0.27 indexes it): leave it out
        del attn["kv_n_heads"]
    attn["attn_impl"] = {"sdpa": "torch", "eager": "torch", "flash": "flash"}[attn["attn_impl"]]
    init = {"name": _INIT_NAMES[flat.pop("init_scheme")], "fan_mode": "fan_in", "init_nonlinearity": "relu"}
    for ours, theirs in _INIT_KEYS.items():
        init[theirs] = flat.pop(ours)
    # HF's MptConfig validates types strictly (expansion_ratio: int, attn_pdrop: int): write
    # integral floats as ints so a representable config loads there.
    flat, attn = _ints_where_integral(flat), _ints_where_integral(attn)
    return {**flat, "attn_config": attn, "init_config": init}


def _ints_where_integral(d: dict[str, Any]) -> dict[str, Any]:
    keys = ("expansion_ratio", "attn_pdrop", "resid_pdrop", "emb_pdrop")
    return {k: int(v) if k in keys and isinstance(v, float) and v.is_integer() else v for k, v in d.items()}


def from_mpt_dict(d: dict[str, Any], where: str) -> ModelConfig:
    """Read an MPT `config.json` (ours, HF's or LLM Foundry's) into a ModelConfig.

    A config.json is machine-written and carries many framework keys (HF adds id2label, dtype...
    even inside attn_config), so only the architecture keys are read; architecture features
    longboi lacks (RoPE, sliding windows...) are refused rather than silently dropped.
    """
    attn = dict(d.get("attn_config") or {})
    init = dict(d.get("init_config") or {})
    for section, key, off in _UNSUPPORTED_MPT:
        value = (attn if section else d).get(key)
        if value not in off:
            raise UserError(f"{where}: {section + '.' if section else ''}{key}={value!r} is not supported by longboi")
    ffn_type = (d.get("ffn_config") or {}).get("ffn_type", "mptmlp")
    if ffn_type != "mptmlp":
        raise UserError(f"{where}: ffn_config.ffn_type={ffn_type!r} is not supported by longboi (only mptmlp)")
    flat = {k: v for k, v in {**d, **attn}.items() if k in _MODEL_KEYS and k not in ("attn_config", "init_config")}
    if "attn_impl" in flat:
        flat["attn_impl"] = _IMPL_FROM_MPT.get(flat["attn_impl"], "sdpa")
    if init:
        flat["init_scheme"] = "normal" if init.get("name") in ("normal_", "small_init_") else "kaiming_normal"
        for ours, theirs in _INIT_KEYS.items():
            if theirs in init:
                flat[ours] = init[theirs]
    if flat.get("attn_type") == "multihead_attention" and flat.get("kv_n_heads") not in (None, flat.get("n_heads")):
        flat["kv_n_heads"] = None
    if flat.get("attn_type") != "grouped_query_attention":
        flat["kv_n_heads"] = None
    if flat.get("alibi", True):
        flat["learned_pos_emb"] = False  # HF's MptConfig defaults it to true but ignores it under ALiBi
    if isinstance(flat.get("logit_scale"), str):  # LLM Foundry's "inv_sqrt_d_model"
        flat["logit_scale"] = 1 / math.sqrt(flat["d_model"])
    return from_dict(ModelConfig, flat, where)
