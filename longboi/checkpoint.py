"""The checkpoint directory, longboi's one hand-off format: config.json + model.safetensors + tokenizer.json.

`config.json` is an MPT config (HF `MptConfig` / LLM Foundry layout). When every feature the model
uses is one HF's native `MptForCausalLM` computes, the directory is also a valid HF checkpoint
(`model_type: "mpt"`); otherwise we write `model_type: "longboi_mpt"` so `transformers` refuses it
instead of silently computing something else (see `longboi.export.hf`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from longboi import __version__
from longboi.config import ModelConfig, from_mpt_dict, hf_unsupported, to_mpt_dict
from longboi.errors import UserError
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Name parts that torch.compile, DDP, FSDP and activation checkpointing add to parameter names.
WRAPPER_PARTS = frozenset({"_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical MPT names: wrapper parts dropped wherever they appear (whole dotted parts: a substring
    replace of "module." would also eat the end of "_checkpoint_wrapped_module.")."""
    return {".".join(p for p in name.split(".") if p not in WRAPPER_PARTS): t for name, t in state.items()}


def unwrap(model: torch.nn.Module) -> MPTForCausalLM:
    """The MPTForCausalLM under torch.compile / DDP wrappers."""
    while not isinstance(model, MPTForCausalLM):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"not an MPT model: {type(model).__name__}")
        model = inner
    return model


def config_json(cfg: ModelConfig) -> dict[str, Any]:
    representable = not hf_unsupported(cfg)
    return {
        "architectures": ["MptForCausalLM" if representable else "LongboiMPTForCausalLM"],
        "model_type": "mpt" if representable else "longboi_mpt",
        **to_mpt_dict(cfg),
        "longboi": {"version": __version__},
    }


def atomic_directory(path: Path):
    """Context manager: yields a temp dir beside `path`; on success it takes `path`'s place atomically.

    An existing `path` is swapped with the new directory in one renameat2(RENAME_EXCHANGE) on
    Linux, so at every instant `path` is either the complete old or the complete new version; a
    crash leaves a stray `.tmp-*` at most.
    """
    return _AtomicDir(Path(path))


class _AtomicDir:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        publish(self.tmp, self.path)


def publish(tmp: Path, path: Path) -> None:
    """Make the complete directory `tmp` visible as `path`, atomically, replacing any old `path`.

    Files are synced first, so the rename never exposes data still in flight. An existing `path`
    is swapped in one renameat2(RENAME_EXCHANGE) on Linux: at every instant `path` is either the
    complete old or the complete new version. Both model checkpoints and training checkpoints
    publish through here; a crash leaves at most a stray `.tmp-*` (see `remove_stale`).
    """
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if path.exists() and _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous version
        return
    old = None
    if path.exists():  # no atomic exchange on this system: a crash between these renames loses `path`
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale(parent: Path) -> list[Path]:
    """Delete the `.tmp-*` / `.old-*` directories that a killed save left in `parent`; return them.
    Call only where no save is in progress (at the start of a run)."""
    stale = [p for p in parent.glob(".*") if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def save_checkpoint(
    model: torch.nn.Module,
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    dtype: torch.dtype | None = None,
    config: ModelConfig | None = None,
) -> Path:
    """Write model (+ tokenizer) as a checkpoint directory, atomically. `dtype` casts the weights.

    `config` overrides the config written (it must describe the same weights, e.g. dropout zeroed).
    """
    model = unwrap(model)
    cfg = config or model.config
    state = clean_state_dict(model.state_dict())
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors stores no aliases; loaders re-tie
    state = {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu() for k, v in state.items()}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_json(cfg), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return directory


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: not a checkpoint directory (no config.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if data.get("model_type") not in (None, "mpt", "longboi_mpt"):
        raise UserError(f"{path}: model_type {data['model_type']!r} is not an MPT model")
    return from_mpt_dict(data, str(path))


def load_state_dict(directory: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Weights from safetensors (single or sharded); pickle formats only with allow_pickle."""
    directory = Path(directory)
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(directory / shard)).items()}
    pickled = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        raise UserError(f"{directory}: no model.safetensors (or sharded index) found")
    if not allow_pickle:
        raise UserError(
            f"{directory}: weights are in pickle format ({pickled[0].name}); loading a pickle can run "
            "arbitrary code. Convert it to safetensors, or pass --allow-pickle if you trust the source."
        )
    warnings.warn(f"loading pickled weights from {directory} because --allow-pickle was given", stacklevel=2)
    state: dict[str, torch.Tensor] = {}
    for p in pickled:
        state.update(torch.load(p, map_location="cpu", weights_only=True))
    return state


class WeightReader:
    """A safetensors checkpoint's tensors read one at a time, or one slice of one.

    safetensors memory-maps its files and reads only the bytes asked for, so a rank holding a shard of
    the model reads only its own rows: starting a sharded run never needs a full copy of the weights.
    Names are canonical (wrapper prefixes stripped; the duplicate head of a checkpoint whose config.json
    says tied dropped). An empty block (a rank with no rows of a weight) must not be asked for:
    safetensors refuses a slice that starts at the end.
    """

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory, self._open = Path(directory), safe_open
        single, index = self.directory / "model.safetensors", self.directory / "model.safetensors.index.json"
        if single.is_file():
            with safe_open(str(single), "pt") as f:
                files = dict.fromkeys(f.keys(), single)
        elif index.is_file():
            files = {k: self.directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            raise UserError(f"{directory}: no model.safetensors (or sharded index): a run starts from safetensors")
        self._where = {clean_state_dict({raw: 0}).popitem()[0]: (path, raw) for raw, path in files.items()}
        self.config = load_config(directory)
        if self.config.tie_word_embeddings:
            self._where.pop("lm_head.weight", None)  # HF saves the tied head too, as the same tensor

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        path, raw = self._where[name]
        with self._open(str(path), "pt") as f:
            return tuple(f.get_slice(raw).get_shape())

    def read(self, name: str, offset: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None):
        """The whole tensor, or the block of `shape` starting at `offset`."""
        path, raw = self._where[name]
        with self._open(str(path), "pt") as f:
            if offset is None or shape is None:
                return f.get_tensor(raw)
            return f.get_slice(raw)[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def load_model(
    directory: str | Path,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> MPTForCausalLM:
    """Build the model described by `directory/config.json` and load its weights (strict names)."""
    cfg = load_config(directory)
    state = clean_state_dict(load_state_dict(directory, allow_pickle))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # HF saves the tied head too, as the same tensor
    with torch.device("meta"):
        model = MPTForCausalLM(cfg)
    missing, unexpected = _name_diff(model, state)
    if missing or unexpected:
        raise UserError(
            f"{directory}: weights do not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, assign=True)
    model.to(device=device, dtype=dtype)
    return model.eval()


def _name_diff(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    path = Path(directory) / "tokenizer.json"
    return Tokenizer(path) if path.is_file() else None
