"""The GPU path: attention backends, loss and gradients, bf16 training and KV-cache decoding on CUDA.

Marked `cuda`; on a machine without a GPU every test here is skipped with the reason. CI has no GPU,
so the CPU twins of each path (SDPA kernels, gloo collectives) are tested in the other files; these
run on a lent GPU (see bench/gpu.sh).
"""

import json

import pytest
import torch
from conftest import build, small_config
from test_generate import PROMPTS
from test_generate import run as generate_all
from test_model import KNOBS, ids_for
from test_train import run_config

from longboi.generate import SamplingParams
from longboi.model import KVCache
from longboi.train.config import config_from_dict
from longboi.train.loop import train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (CI has none)"),
]
CUDA = torch.device("cuda")


def pair(knobs: dict, attn_impl: str = "sdpa"):
    cfg = small_config(**knobs, attn_impl=attn_impl)
    model = build(cfg).to(CUDA)
    eager = build(cfg.replace(attn_impl="eager")).to(CUDA)
    eager.load_state_dict(model.state_dict())
    return model, eager


@pytest.mark.parametrize("knobs", KNOBS, ids=str)
@pytest.mark.parametrize("case", ["causal", "padded", "packed"])
def test_sdpa_on_cuda_equals_eager_reference(knobs, case):
    model, eager = pair(knobs)
    ids = ids_for(model.config, length=40).to(CUDA)
    kw = {}
    if case == "padded":
        kw["attention_mask"] = torch.ones_like(ids)
        kw["attention_mask"][0, :7] = 0
    if case == "packed":
        kw["sequence_id"] = torch.tensor([[0] * 15 + [1] * 25, [0] * 40], device=CUDA)
    with torch.no_grad():
        assert torch.allclose(model(ids, **kw), eager(ids, **kw), atol=2e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast, ref = model(ids, **kw).float(), eager(ids, **kw).float()
    assert (fast - ref).abs().max() < 0.1  # bf16: different kernels round differently


def test_flash_attn_backend_equals_eager_when_installed():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed on this GPU machine")
    model, eager = pair({}, attn_impl="flash")
    ids = ids_for(model.config, length=40).to(CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert (model(ids).float() - eager(ids).float()).abs().max() < 0.1


@pytest.mark.parametrize("knobs", KNOBS, ids=str)
def test_loss_and_gradients_on_cuda_match_cpu_fp32(knobs):
    cfg = small_config(**knobs)
    cpu, gpu = build(cfg).train(), build(cfg).to(CUDA).train()
    ids = ids_for(cfg, length=33)
    torch.backends.cuda.matmul.allow_tf32 = False
    losses = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        x = ids.to(dev)
        loss = model(x[:, :-1], labels=x[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert torch.allclose(p.grad, q.grad.cpu(), atol=1e-5, rtol=1e-3), name


def test_kv_cache_decode_on_cuda_equals_full_forward():
    model, _ = pair({})
    ids = ids_for(model.config, length=30).to(CUDA)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config.n_layers)
        parts = [model(ids[:, :11], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(11, 30)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-4)


def test_greedy_generation_on_cuda_equals_cpu():
    cfg = small_config()
    cpu, gpu = build(cfg), build(cfg).to(CUDA)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    assert torch.equal(generate_all(gpu, PROMPTS, params).cpu(), generate_all(cpu, PROMPTS, params))


def test_bf16_training_on_cuda_learns_and_resumes(tmp_path, data):
    cfg = run_config(data, tmp_path / "run", precision="auto", device="cuda", max_duration="12ba")
    result = train(config_from_dict(cfg, "cuda-run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert result.steps == 12 and losses[-1] < losses[0]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-00000012" / "rng-rank0.pt", weights_only=True)
    assert "cuda" in state  # dropout on the GPU resumes from the same generator state
