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


# -- the inference commands on a GPU (--device) -----------------------------------------------------


@pytest.fixture(scope="module")
def cuda_ckpt(tmp_path_factory):
    from conftest import TOKENIZER, trained

    from longboi.checkpoint import save_checkpoint
    from longboi.tokenizer import Tokenizer

    tok = Tokenizer(TOKENIZER)
    path = tmp_path_factory.mktemp("cuda") / "ck"
    save_checkpoint(trained(tok, steps=40), path, tok)
    return path


def test_load_for_inference_puts_the_model_on_the_gpu_in_its_native_precision(cuda_ckpt):
    from longboi.inference import load_for_inference

    model, _ = load_for_inference(cuda_ckpt, "auto", device="cuda")
    p = next(model.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16  # auto on a GPU with bf16
    with pytest.raises(Exception, match="CPU only"):
        load_for_inference(cuda_ckpt, "auto", "int8", "cuda")


def test_generate_perplexity_and_eval_commands_on_cuda_equal_the_cpu(cuda_ckpt, tmp_path, capsys):
    from conftest import SHARED

    from longboi.cli import eval as run_eval
    from longboi.cli import generate, perplexity

    greedy = dict(max_new_tokens=24, temperature=0.0, dtype="fp32")
    assert generate(str(cuda_ckpt), "ROMEO:", **greedy, device="cuda") == generate(
        str(cuda_ckpt), "ROMEO:", **greedy, device="cpu"
    )
    text = str(SHARED / "text" / "tinyshakespeare.txt")
    gpu = perplexity(str(cuda_ckpt), text, seq_len=128, max_tokens=4000, dtype="fp32", device="cuda")
    cpu = perplexity(str(cuda_ckpt), text, seq_len=128, max_tokens=4000, dtype="fp32", device="cpu")
    assert abs(gpu["loss"] - cpu["loss"]) < 1e-4
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(
        "icl_tasks:\n- {label: piqa, dataset_uri: piqa_small.jsonl, num_fewshot: [0], icl_task_type: multiple_choice}\n"
    )
    root = str(SHARED / "eval" / "tests_local_data")
    scores = [
        run_eval(str(cuda_ckpt), tasks=str(tasks), data_root=root, out=str(tmp_path / d), dtype="fp32", device=d)
        for d in ("cuda", "cpu")
    ]
    assert scores[0]["results"][0]["accuracy"] == scores[1]["results"][0]["accuracy"]


def test_the_serving_engine_on_cuda_decodes_as_on_the_cpu(cuda_ckpt):
    import threading

    from longboi.generate import SamplingParams
    from longboi.inference import load_for_inference
    from longboi.serve.engine import Engine, Job

    outputs = []
    for device in ("cuda", "cpu"):
        model, tok = load_for_inference(cuda_ckpt, "fp32", device=device)
        engine = Engine(model, tok, max_batch=8).start()
        results, finished = {}, threading.Semaphore(0)

        def sink_for(i, results=results, finished=finished):
            def sink(ev):
                results.setdefault(i, []).extend(t.id for t in ev.tokens)
                if ev.done:
                    assert ev.error is None, ev.error
                    finished.release()

            return sink

        for i, prompt in enumerate(["ROMEO:", "JULIET: O", "First Citizen:"]):
            params = SamplingParams(max_new_tokens=16, temperature=0.8 if i == 2 else 0, seed=7)
            engine.submit(Job(tok.encode(prompt), params, sink_for(i)))  # the seeded row runs in the same batch
        assert all(finished.acquire(timeout=60) for _ in range(3))
        engine.stop()
        outputs.append([results[0], results[1]])  # greedy rows (a seeded row draws per device)
    assert outputs[0] == outputs[1]
