"""Many LoRA adapters on one base model, applied per token without merging (for the server).

The base weights run once for the whole batch; each target linear then adds, for every group of
tokens that asked for the same adapters, sum_a scale_a x (alpha_a / r_a) x (x @ A_a^T) @ B_a^T: two
small matmuls per adapter over that group's rows (gathered with index_select, added back with
index_add). That equals the merged model W + sum_a scale_a x (alpha_a / r_a) x B_a @ A_a serving the
request alone, up to fp rounding. Stacking adapters is that sum: the same as peft's
`add_weighted_adapter(..., combination_type="cat")`, whose concatenated A and B make exactly the sum of
the weighted deltas (tested). What a token uses is set per forward by `AdapterBank.route`.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from longboi.errors import UserError
from longboi.model import MPTForCausalLM

Stack = tuple[tuple["Adapter", float], ...]  # the adapters one request applies, with their scales


@dataclass(frozen=True, eq=False)
class Adapter:
    """One adapter's weights: target module name -> (A (r, in), B (out, r)), and its scaling alpha / r."""

    name: str
    path: str
    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    serial: int = field(default_factory=itertools.count(1).__next__)  # unique per load (names are reused)


def read_adapter(path: str | Path, name: str, model: MPTForCausalLM, max_rank: int | None = None) -> Adapter:
    """An adapter directory (`longboi finetune` with LoRA, or peft's layout) checked against `model`: its
    config, then its tensors' names and shapes from the safetensors header (no data is read until they
    pass: a file claiming r 8 with rank-512 factors is refused, not loaded)."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(f"{path}: not an adapter directory (needs adapter_config.json and adapter_model.safetensors)")
    config, rank, alpha = _lora_config(config_file)
    if max_rank is not None and rank > max_rank:
        raise UserError(f"{path}: rank {rank} is over the server's --max-lora-rank {max_rank}")
    _check_shapes(_header_shapes(weights_file), rank, model, weights_file)
    scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    return Adapter(name, str(path), rank, scaling, _weights(load_file(str(weights_file)), model, path))


def _lora_config(config_file: Path) -> tuple[dict, int, float]:
    """adapter_config.json: (config, r, lora_alpha), refusing what serving would not apply as merging does."""
    try:
        config = json.loads(config_file.read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{config_file}: not a LoRA config (needs integer r and number lora_alpha): {e}") from e
    if rank < 1:
        raise UserError(f"{config_file}: r is {rank}; a LoRA rank is at least 1")
    if config.get("use_dora") or config.get("fan_in_fan_out"):
        raise UserError(f"{config_file}: DoRA and fan_in_fan_out adapters are not supported")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern"):
        if config.get(key):  # full weights or per-module ranks: served per token, they would be dropped or misscaled
            raise UserError(f"{config_file}: {key} {config[key]!r} is not supported by multi-adapter serving")
    return config, rank, alpha


MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header is names and shapes: far smaller than this


def _header_shapes(weights_file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors header alone (8-byte little-endian length, then JSON)."""
    try:
        with open(weights_file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= MAX_HEADER_BYTES:
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
        return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{weights_file}: not a safetensors file ({e})") from e


def _check_shapes(shapes: dict[str, tuple[int, ...]], rank: int, model: MPTForCausalLM, file: Path) -> None:
    """Every tensor is the A or B factor of a linear the server adapts, of the config's rank (so the rank
    checked against --max-lora-rank is the tensors' too)."""
    wrapped = set(adapted_modules(model))
    for key, shape in shapes.items():
        factor = ".lora_A.weight" if key.endswith(".lora_A.weight") else ".lora_B.weight"
        module = key.removesuffix(factor).removeprefix("base_model.model.")
        if not key.endswith(factor) or module not in wrapped:
            raise UserError(
                f"{file}: {key} is not a LoRA factor of a layer served adapters apply to "
                f"({'/'.join(n for _, n in TARGETS)} of the blocks): serving would drop it while merging applies it"
            )
        if len(shape) != 2 or shape[0 if factor == ".lora_A.weight" else 1] != rank:  # A (r, in), B (out, r)
            raise UserError(f"{file}: {key} has shape {list(shape)}, not rank {rank} as adapter_config.json says")


def _weights(state: dict[str, torch.Tensor], model: MPTForCausalLM, path: Path) -> dict:
    """{module name: (A, B)} in the model's dtype and device, shapes checked against its linears."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    device = next(model.parameters()).device
    out = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        a, b = state[key], state.get(key.replace(".lora_A.", ".lora_B."))
        base = _base_linear(model, module)
        if b is None or base is None:
            raise UserError(f"{path}: {key} has no lora_B pair or no linear layer {module!r} in this base model")
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features or a.shape[0] != b.shape[1]:
            raise UserError(f"{path}: {module} A {tuple(a.shape)} / B {tuple(b.shape)} do not fit this base model")
        out[module] = (a.to(device, dtype), b.to(device, dtype))
    if not out:
        raise UserError(f"{path}: no LoRA weights (keys ending in .lora_A.weight) in adapter_model.safetensors")
    return out


def _base_linear(model: MPTForCausalLM, name: str) -> nn.Module | None:
    """The linear layer a LoraLinear of that name wraps (`attach`), if any."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    if isinstance(module, LoraLinear):
        return module.base
    return module if isinstance(module, nn.Linear) else None


def merge_adapters(model: MPTForCausalLM, adapters: list[tuple[str | Path, float]]) -> MPTForCausalLM:
    """Fold adapters with scales into the base weights, in place: W += scale x (alpha / r) x B @ A each
    (what a served stack computes, and peft's add_weighted_adapter "cat" then merge)."""
    with torch.no_grad():
        for i, (path, scale) in enumerate(adapters):
            adapter = read_adapter(path, f"adapter{i}", model)
            for name, (a, b) in adapter.weights.items():
                linear = model.get_submodule(name)
                linear.weight += (scale * adapter.scaling) * (b.float() @ a.float()).to(linear.weight.dtype)
    return model


class AdapterBank:
    """The adapters a server holds, by name, and the routing of the forward in progress."""

    def __init__(self, model: MPTForCausalLM, max_loras: int, max_rank: int | None):
        self.model, self.max_loras, self.max_rank = model, max_loras, max_rank
        self.adapters: dict[str, Adapter] = {}
        self.lock = threading.Lock()  # loads run in request threads, lookups on the event loop
        self.route: list[tuple[torch.Tensor, Stack]] = []  # (token rows, stack) of the current forward
        attach(model, self)

    def load(self, name: str, path: str | Path) -> Adapter:
        adapter = read_adapter(path, name, self.model, self.max_rank)
        with self.lock:
            if name in self.adapters:
                raise UserError(f"an adapter named {name!r} is already loaded (unload it first)")
            if len(self.adapters) >= self.max_loras:
                raise UserError(f"{len(self.adapters)} adapters are loaded, the server's --max-loras")
            self.adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> None:
        """Requests already running keep the adapter they started with (they hold it)."""
        with self.lock:
            if self.adapters.pop(name, None) is None:
                raise UserError(f"no adapter named {name!r} is loaded")

    def get(self, name: str) -> Adapter | None:
        with self.lock:
            return self.adapters.get(name)

    def listed(self) -> list[Adapter]:
        with self.lock:
            return list(self.adapters.values())


class LoraLinear(nn.Module):
    """A base linear plus the low-rank deltas its bank routes to each token of the current forward."""

    def __init__(self, base: nn.Module, name: str, bank: AdapterBank):
        super().__init__()
        self.base, self.name, self.bank = base, name, bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.bank.route:
            return y
        rows, flat = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        for index, stack in self.bank.route:
            picked = rows.index_select(0, index)
            for adapter, scale in stack:
                pair = adapter.weights.get(self.name)
                if pair is not None:
                    a, b = pair
                    delta = (picked.to(a.dtype) @ a.T) @ b.T * (adapter.scaling * scale)
                    flat.index_add_(0, index, delta.to(flat.dtype))
        return y


TARGETS = (("attn", "Wqkv"), ("attn", "out_proj"), ("ffn", "up_proj"), ("ffn", "down_proj"))


def adapted_modules(model: MPTForCausalLM) -> list[str]:
    """Names of the linears served adapters apply to (what `attach` wraps)."""
    return [
        f"transformer.blocks.{i}.{part}.{name}" for i in range(len(model.transformer.blocks)) for part, name in TARGETS
    ]


def attach(model: MPTForCausalLM, bank: AdapterBank) -> None:
    """Wrap every linear layer of the blocks (what LoRA targets; any form: fp32, bf16, int8) in a
    LoraLinear routed by `bank`."""
    for i, block in enumerate(model.transformer.blocks):
        for part, name in TARGETS:
            owner = getattr(block, part)
            setattr(owner, name, LoraLinear(getattr(owner, name), f"transformer.blocks.{i}.{part}.{name}", bank))
