"""Many LoRA adapters on one base (longboi.multilora): per-row deltas in one batch equal the merged models,
stacking equals peft's `add_weighted_adapter(cat)`, and the server loads, lists, serves and unloads them."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import build, small_config, submit_all
from test_serve import KEY, Server, post

from longboi.checkpoint import load_model, save_checkpoint
from longboi.cli import main
from longboi.errors import UserError
from longboi.generate import SamplingParams, generate_ids
from longboi.lora import LoraSettings, add_lora, load_adapter, merge, save_adapter
from longboi.multilora import AdapterBank, read_adapter
from longboi.serve.engine import Engine, Job
from longboi.tokenizer import Tokenizer

# Different ranks, alphas and target modules: what a team's adapters look like.
ADAPTERS = {
    "qkv": LoraSettings(r=4, alpha=8, targets=["Wqkv"]),
    "mlp": LoraSettings(r=8, alpha=4, targets=["up_proj", "down_proj"]),
    "all": LoraSettings(r=2, alpha=16, targets=["Wqkv", "out_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_path) -> Path:
    path = tmp_path_factory.mktemp("multilora") / "base"
    save_checkpoint(build(small_config(max_seq_len=128), seed=5), path, Tokenizer(tokenizer_path))
    return path


@pytest.fixture(scope="module")
def adapters(base_dir) -> dict[str, Path]:
    """Three adapters with random (non-zero) A and B, saved as `longboi finetune` saves them."""
    out = {}
    for i, (name, settings) in enumerate(ADAPTERS.items()):
        model = add_lora(load_model(base_dir), settings)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        out[name] = save_adapter(model, base_dir.parent / name, str(base_dir))
    return out


def merged(base_dir: Path, adapter: Path | None):
    model = load_model(base_dir)
    return (merge(load_adapter(model, adapter)) if adapter else model).eval()


def collect(engine: Engine, jobs: list[Job]) -> list[dict]:
    """Run jobs together; per job its generated ids and their logprobs."""
    out = [{"ids": [], "logprobs": []} for _ in jobs]

    def record(k, ev):
        out[k]["ids"] += [t.id for t in ev.tokens]
        out[k]["logprobs"] += [t.logprob for t in ev.tokens]

    submit_all(engine, jobs, record)
    return out


def test_one_batch_of_three_adapters_and_the_base_equals_each_merged_model_alone(base_dir, adapters, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    model = load_model(base_dir).eval()
    bank = AdapterBank(model, max_loras=4, max_rank=16)
    for name, path in adapters.items():
        bank.load(name, path)
    engine = Engine(model, tok, max_batch=16, prefill_chunk=5, bank=bank).start()  # pieces of 5: mixed steps
    params = SamplingParams(max_new_tokens=12, temperature=0)
    names = [None, "qkv", "mlp", "all"] * 2
    prompts = [tok.encode(f"Once upon a time {i}, the") for i in range(len(names))]
    try:
        jobs = [
            Job(p, params, None, logprobs=0, stack=((bank.get(n), 1.0),) if n else ()) for p, n in zip(prompts, names)
        ]
        together = collect(engine, jobs)
    finally:
        engine.stop()
    for name, prompt, got in zip(names, prompts, together):
        reference = merged(base_dir, adapters[name] if name else None)
        alone = Engine(reference, tok, max_batch=1).start()
        try:
            want = collect(alone, [Job(prompt, params, None, logprobs=0)])[0]
        finally:
            alone.stop()
        assert got["ids"] == want["ids"], name
        torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]), atol=1e-4, rtol=0)
    assert together[0]["ids"] != together[3]["ids"]  # the adapters do change the output


def peft_layout(adapter: Path, out: Path) -> Path:
    """The adapter as PeftModel.from_pretrained reads it (keys under base_model.model.)."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    state = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    return out


def test_stacked_adapters_equal_peft_weighted_cat(base_dir, adapters, tmp_path):
    """Our stack sum_a scale_a (alpha_a / r_a) B_a A_a is peft's add_weighted_adapter with "cat"."""
    import peft

    scales = {"qkv": 0.7, "all": -1.3}
    dirs = {n: peft_layout(adapters[n], tmp_path / n) for n in scales}
    reference = peft.PeftModel.from_pretrained(load_model(base_dir), str(dirs["qkv"]), adapter_name="qkv")
    reference.load_adapter(str(dirs["all"]), adapter_name="all")
    reference.add_weighted_adapter(list(scales), list(scales.values()), "stack", combination_type="cat")
    reference.set_adapter("stack")
    reference.eval()  # peft's LoRA dropout (0.05) is on in training mode
    ids = torch.tensor([[5, 77, 1000, 31, 9, 4000]])
    with torch.no_grad():
        want = reference(input_ids=ids)
        model = load_model(base_dir).eval()
        bank = AdapterBank(model, max_loras=4, max_rank=16)
        stack = tuple((bank.load(n, adapters[n]), s) for n, s in scales.items())
        bank.route = [(torch.arange(ids.shape[1]), stack)]
        got = model(ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (got - load_model(base_dir).eval()(ids)).abs().max() > 1e-2  # the stack does something
        out = base_dir.parent / "stack-merged"
        assert (
            main(
                [
                    "merge",
                    str(base_dir),
                    str(adapters["qkv"]),
                    str(out),
                    "--scale",
                    "0.7",
                    "--add",
                    f"{adapters['all']}:-1.3",
                ]
            )
            == 0
        )
        torch.testing.assert_close(load_model(out).eval()(ids), want, atol=1e-4, rtol=1e-4)


def test_bad_adapters_are_refused_with_the_reason(base_dir, adapters, tmp_path):
    model = load_model(base_dir).eval()
    with pytest.raises(UserError, match="rank 8 is over"):
        read_adapter(adapters["mlp"], "mlp", model, max_rank=4)
    with pytest.raises(UserError, match="not an adapter directory"):
        read_adapter(tmp_path, "x", model)
    bank = AdapterBank(model, max_loras=1, max_rank=16)
    bank.load("qkv", adapters["qkv"])
    with pytest.raises(UserError, match="already loaded"):
        bank.load("qkv", adapters["qkv"])
    with pytest.raises(UserError, match="--max-loras"):
        bank.load("mlp", adapters["mlp"])
    wide = build(small_config(d_model=128, max_seq_len=128))
    with pytest.raises(UserError, match="do not fit"):
        read_adapter(adapters["qkv"], "qkv", wide)


def forged(adapter: Path, out: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of `adapter` with config keys and tensors replaced or added."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    if config:
        raw = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps(raw | config))
    if tensors:
        save_file(load_file(str(out / "adapter_model.safetensors")) | tensors, str(out / "adapter_model.safetensors"))
    return out


def test_an_adapters_tensors_are_checked_from_the_header_not_taken_from_its_config(base_dir, adapters, tmp_path):
    """adapter_config.json says r 8; the tensors decide: rank-512 factors are refused (by their header: the
    file's data is cut short, so reading it would fail differently); so are tensors serving would drop
    (a layer it does not adapt, a full weight) and modules_to_save."""
    model = load_model(base_dir).eval()
    key = "base_model.model.transformer.blocks.0.ffn.up_proj"
    d, hidden = model.config.d_model, model.transformer.blocks[0].ffn.up_proj.out_features
    wide = {f"{key}.lora_A.weight": torch.randn(512, d), f"{key}.lora_B.weight": torch.randn(hidden, 512)}
    big = forged(adapters["mlp"], tmp_path / "big", tensors=wide)
    file = big / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # the header is whole; the data is not
    with pytest.raises(UserError, match=r"up_proj.lora_A.weight has shape \[512, 64\], not rank 8"):
        read_adapter(big, "big", model, max_rank=64)
    head = {"base_model.model.transformer.blocks.0.norm_1.weight": torch.ones(d)}
    with pytest.raises(UserError, match="norm_1.weight is not a LoRA factor of a layer served adapters apply to"):
        read_adapter(forged(adapters["mlp"], tmp_path / "norm", tensors=head), "norm", model)
    elsewhere = {"base_model.model.lm_head.lora_A.weight": torch.randn(8, d)}
    with pytest.raises(UserError, match="lm_head.lora_A.weight is not a LoRA factor"):
        read_adapter(forged(adapters["mlp"], tmp_path / "head", tensors=elsewhere), "head", model)
    with pytest.raises(UserError, match="modules_to_save .* is not supported"):
        read_adapter(forged(adapters["mlp"], tmp_path / "save", {"modules_to_save": ["norm_f"]}), "save", model)
    assert read_adapter(adapters["mlp"], "mlp", model, max_rank=8).rank == 8  # the honest one still loads


def test_the_server_lists_serves_stacks_loads_and_unloads_adapters(base_dir, adapters, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    lora = ["--lora", f"qkv={adapters['qkv']}", "--lora", f"mlp={adapters['mlp']}"]
    root = ["--enable-lora", "--lora-root", str(base_dir.parent)]
    server = Server(base_dir, "--api-key", KEY, "--dtype", "fp32", "--max-loras", "3", *root, *lora)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    try:
        assert [m.id for m in client.models.list().data] == ["base", "qkv", "mlp"]
        prompt = "Once upon a time"
        for name in ("base", "qkv", "mlp"):
            out = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
            ids = list(generate_ids(merged(base_dir, adapters.get(name)), [tok.encode(prompt)], greedy(8), None))
            assert out.choices[0].text == tok.decode(torch.stack(ids)[:, 0].tolist()), name
            assert out.model == name
        stacked = client.completions.create(model="base+qkv+mlp", prompt=prompt, max_tokens=8, temperature=0)
        fields = client.completions.create(
            model="base",
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            extra_body={"adapters": [{"name": "qkv"}, {"name": "mlp"}]},
        )
        assert stacked.choices[0].text == fields.choices[0].text
        with pytest.raises(openai.BadRequestError, match="a stack of 9 adapters; at most 8"):
            client.completions.create(model="+".join(["qkv"] * 9), prompt=prompt, max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="unknown model or adapter 'all'"):
            client.completions.create(model="all", prompt=prompt, max_tokens=2)
        assert (
            post(
                server, "/v1/load_lora_adapter", {"lora_name": "all", "lora_path": str(adapters["all"])}, key=None
            ).status_code
            == 401
        )
        loaded = post(server, "/v1/load_lora_adapter", {"lora_name": "all", "lora_path": str(adapters["all"])})
        assert loaded.status_code == 200, loaded.text
        chat = client.chat.completions.create(model="all", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert chat.model == "all"
        assert post(server, "/v1/unload_lora_adapter", {"lora_name": "all"}).status_code == 200
        assert post(server, "/v1/unload_lora_adapter", {"lora_name": "all"}).status_code == 404
        bad = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(base_dir)})
        assert bad.status_code == 400 and "not an adapter directory" in bad.text
        relative = post(server, "/v1/load_lora_adapter", {"lora_name": "again", "lora_path": "all"})
        assert relative.status_code == 200, relative.text  # relative to --lora-root
        import shutil

        elsewhere = base_dir.parent.parent / f"{base_dir.parent.name}-outside"  # a real adapter, outside the root
        shutil.copytree(adapters["all"], elsewhere)
        (base_dir.parent / "escape").symlink_to(elsewhere.parent)  # inside the root, pointing out
        for outside in ("/etc", "/no/such/dir", "../", str(elsewhere), f"escape/{elsewhere.name}", "escape"):
            r = post(server, "/v1/load_lora_adapter", {"lora_name": "y", "lora_path": outside})
            assert r.status_code == 400, (outside, r.text)
            assert r.json()["error"]["message"] == f"lora_path: {outside!r} is not inside the server's --lora-root"
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        code, out = server.stop()
    assert code == 0, out


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0)


def test_concurrent_requests_for_three_adapters_and_the_base_equal_each_merged_model(
    base_dir, adapters, tokenizer_path
):
    """Through the real server and the openai client: 8 requests at once (base and 3 adapters, so they share
    steps), each greedy-identical to its merged model and with log-probabilities within 1e-4."""
    from concurrent.futures import ThreadPoolExecutor

    tok = Tokenizer(tokenizer_path)
    lora = [f for name, path in adapters.items() for f in ("--lora", f"{name}={path}")]
    server = Server(base_dir, "--api-key", KEY, "--dtype", "fp32", "--prefill-chunk", "5", *lora)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    names = ["base", "qkv", "mlp", "all"] * 2
    prompts = [f"Once upon a time {i}, the" for i in range(len(names))]

    def ask(k: int):
        return client.completions.create(model=names[k], prompt=prompts[k], max_tokens=10, temperature=0, logprobs=0)

    try:
        with ThreadPoolExecutor(len(names)) as pool:
            outs = list(pool.map(ask, range(len(names))))
    finally:
        code, log = server.stop()
    assert code == 0, log
    for name, prompt, out in zip(names, prompts, outs):
        model, ids = merged(base_dir, adapters.get(name)), tok.encode(prompt)
        want = [int(t) for t in torch.stack(list(generate_ids(model, [ids], greedy(10), None)))[:, 0]]
        assert out.choices[0].text == tok.decode(want), name
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids + want]))[0, len(ids) - 1 : -1], -1)
        expected = logp.gather(1, torch.tensor(want)[:, None])[:, 0]
        got = torch.tensor(out.choices[0].logprobs.token_logprobs)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
