"""LoRA adapters through `peft`: add to a model, train only them, save alone, load onto a base, merge.

peft injects its LoRA layers into our MPTForCausalLM in place (the model keeps its class, so the
training loop, generation and checkpointing are unchanged). An adapter directory holds
`adapter_model.safetensors` (the LoRA weights only) and `adapter_config.json` (peft's LoraConfig
plus the base checkpoint it was trained from).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from longboi.errors import UserError
from longboi.model import MPTForCausalLM


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["Wqkv", "out_proj", "up_proj", "down_proj"])


def _peft():
    try:
        import peft
    except ImportError as e:
        raise UserError("LoRA needs the peft package: pip install 'longboi[lora]'") from e
    return peft


def add_lora(model: MPTForCausalLM, s: LoraSettings) -> MPTForCausalLM:
    """Inject LoRA layers into the target projections and freeze everything else."""
    peft = _peft()
    config = peft.LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.targets))
    model = peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    model._lora_config = config  # type: ignore[attr-defined]  # needed to save the adapter
    return model


def save_adapter(model: MPTForCausalLM, out: str | Path, base: str | None = None) -> Path:
    peft = _peft()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in peft.get_peft_model_state_dict(model).items()}
    save_file(state, str(out / "adapter_model.safetensors"))
    config = model._lora_config.to_dict()  # type: ignore[attr-defined]
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (out / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": base}, indent=1, default=str) + "\n"
    )
    return out


def load_adapter(model: MPTForCausalLM, adapter: str | Path) -> MPTForCausalLM:
    """A base model with the adapter's LoRA layers and weights (not merged)."""
    peft = _peft()
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: not an adapter directory (no adapter_config.json)")
    raw = json.loads((adapter / "adapter_config.json").read_text())
    settings = LoraSettings(
        r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0), targets=list(raw["target_modules"])
    )
    model = add_lora(model, settings)
    result = peft.set_peft_model_state_dict(model, load_file(str(adapter / "adapter_model.safetensors")))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"{adapter}: adapter weights do not fit this base model: {unexpected[:3]}")
    return model


def merge(model: MPTForCausalLM) -> MPTForCausalLM:
    """Fold every LoRA layer into its base weight and remove it: a plain model with the same outputs."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad = True
    if hasattr(model, "_lora_config"):
        del model._lora_config
    return model


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "_lora_config")
