"""`longboi plan` and `longboi scaling`: the arithmetic against hand computations, the memory estimate
against a real training step's peak RSS, Chinchilla's table, and fits of known laws."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import small_config

from longboi.cli import main, plan, scaling
from longboi.config import preset
from longboi.errors import UserError
from longboi.flops import model_stats
from longboi.plan import accelerator, train_memory
from longboi.scaling import FITS, RunPoint, compute_multiplier, fit_power_law, read_run


def test_flops_per_token_is_the_hand_count_including_attention():
    cfg = small_config()  # d 64, 2 layers, expansion 4, vocab 50432, tied
    per_layer = 64 * 192 + 64 * 64 + 64 * 256 + 256 * 64  # Wqkv, out_proj, up, down = 12 d^2
    matmul = 2 * per_layer + 50432 * 64  # + the LM head (tied: still a matmul)
    assert model_stats(cfg, 64).train_flops_per_token == 6 * matmul + 12 * 2 * 64 * 64  # + attention: 12 L d T


def test_mpt_7b_on_440_a100s(capsys):
    """MPT-7B's published run: 1T tokens on 440 A100-40GB in 9.5 days for ~$200k."""
    out = plan(model="mpt-7b", tokens=1e12, gpu="a100-40gb", gpus=440, seq_len=2048, mfu="0.5", price_per_gpu_hour=2.0)
    flops_per_token = 6 * (32 * 12 * 4096**2 + 50432 * 4096) + 12 * 32 * 4096 * 2048  # hand count: 43.1e9
    assert out["flops_per_token"] == flops_per_token
    per_gpu = 0.5 * 312e12 / flops_per_token  # LLM Foundry's A100-40GB table: ~3,600 tokens/s/GPU at ~50%
    assert out["tokens_per_s_per_gpu"] == pytest.approx(per_gpu) and 3550 < per_gpu < 3650
    ideal_days = 1e12 / (per_gpu * 440) / 86400
    assert out["ideal_days"] == pytest.approx(ideal_days) and 7.2 < ideal_days < 7.35  # the issue's ~7.3 days
    assert out["expected_days"] == pytest.approx(ideal_days / 0.9)  # default goodput, Llama 3's >90%
    assert ideal_days / 9.5 == pytest.approx(0.765, abs=0.005)  # MPT-7B's 9.5 days: ~77% of the benchmark rate
    assert out["usd"] == pytest.approx(ideal_days / 0.9 * 24 * 440 * 2.0)
    assert 440 * 9.5 * 24 * 2.0 == pytest.approx(200_640)  # ~$200k at ~$2.0/GPU-hour
    printed = capsys.readouterr().out
    assert "ideal 7.27 days" in printed and "expected 8.08 days" in printed
    default = plan(model="mpt-7b", tokens=1e12, gpu="a100-40gb", gpus=440, seq_len=2048)
    assert default["mfu"] == 0.5092  # LLM Foundry's A100-40GB 7b row
    assert default["memory_gib_ac"]["fits"] and default["memory_gib_ac"]["micro_batch"] >= 8


def test_memory_estimate_is_within_25_percent_of_a_real_training_step():
    """Peak RSS of real tiny fp32 training steps (AdamW), with and without activation checkpointing. VmHWM, the
    peak of this process's own memory map: ru_maxrss keeps the parent's RSS across fork + exec (a 1.5 GB
    pytest parent made a 0.95 GB child read 1.5 GB)."""
    code = """
import json, sys, torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from longboi.config import preset
from longboi.model import MPTForCausalLM
torch.set_num_threads(2)
batch, seq, ac = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
ids = torch.randint(0, 50000, (batch, seq + 1))
base = int(open("/proc/self/statm").read().split()[1]) * 4096  # the interpreter, torch and the batch
model = MPTForCausalLM(preset("tiny"))
if ac:
    for i, block in enumerate(model.transformer.blocks):
        model.transformer.blocks[i] = checkpoint_wrapper(block)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
for _ in range(2):
    model(ids[:, :-1], labels=ids[:, 1:]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) * 1024 - base)
"""
    for batch, seq, ac in ((8, 256, False), (16, 256, True)):
        run = subprocess.run([sys.executable, "-c", code, str(batch), str(seq), str(int(ac))], capture_output=True)
        measured = int(run.stdout.decode().split()[-1])
        estimate = train_memory(preset("tiny"), seq, batch, 1, ac, mixed=False).total
        assert 0.75 < estimate / measured < 1.25, (batch, seq, ac, estimate / 2**20, measured / 2**20)


# Hoffmann et al. 2022 (arXiv 2203.15556), Table 3: compute-optimal parameters, FLOPs and tokens.
CHINCHILLA_TABLE = [
    (400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9), (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12), (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12),
]  # fmt: skip


def test_compute_optimal_sizes_follow_chinchillas_table():
    """Table 3 comes from the paper's Approach 1; the default fit (Epoch AI's refit of the same data)
    reproduces it within 15% from 400M to 1T parameters. The paper's own Approach-3 constants do not
    (24-63% too few parameters): the discrepancy Besiroglu et al. 2024 report, and why they are not the default."""
    for n, c, d in CHINCHILLA_TABLE:
        got_n, got_d = FITS["epoch"].optimal(c)
        assert got_n == pytest.approx(n, rel=0.15) and got_d == pytest.approx(d, rel=0.15)
        assert 6 * got_n * got_d == pytest.approx(c)
        assert FITS["hoffmann"].optimal(c)[0] < 0.8 * n


def test_inference_aware_sizing_trains_a_smaller_model_longer_for_the_same_loss():
    law = FITS["epoch"]
    n_opt, d_opt = law.optimal(1e21)
    n, d = law.inference_aware(1e21, inference_tokens=2e12)
    assert n < n_opt and d > d_opt
    assert law.loss(n, d) == pytest.approx(law.loss(n_opt, d_opt), abs=1e-6)
    assert 6 * n * d + 2 * n * 2e12 < 6 * n_opt * d_opt + 2 * n_opt * 2e12
    assert law.inference_aware(1e21, inference_tokens=1.0) == pytest.approx((n_opt, d_opt), rel=0.02)


def test_budget_sizing_from_the_cli(capsys):
    out = plan(budget_flops=1e21, gpu="h100", gpus=8, inference_tokens=1e12)
    assert out["preset"] == "mpt-3b" and out["optimal_params"] == pytest.approx(FITS["epoch"].optimal(1e21)[0])
    hours = plan(budget_gpu_hours=1000, gpu="a100-80gb", gpus=8, mfu="0.5", goodput=1.0)
    assert hours["optimal_params"] == pytest.approx(FITS["epoch"].optimal(1000 * 3600 * 312e12 * 0.5)[0])
    usd = plan(budget_usd=2000, price_per_gpu_hour=2.0, gpu="a100-80gb", gpus=8, mfu="0.5", goodput=1.0)
    assert usd["optimal_params"] == pytest.approx(hours["optimal_params"])


def test_a_power_law_with_a_floor_is_recovered_from_noisy_points():
    rng = np.random.default_rng(0)
    flops = np.logspace(15, 19, 8)
    true = 2.0 * (flops / 1e17) ** -0.3 + 1.7
    fit = fit_power_law(flops, true * np.exp(rng.normal(0, 0.003, len(flops))), floor=True)
    assert fit.b == pytest.approx(0.3, rel=0.1) and fit.c == pytest.approx(1.7, rel=0.05)
    assert fit(1e20) == pytest.approx(2.0 * 1000**-0.3 + 1.7, rel=0.01)
    bare = fit_power_law(flops, 3.0 * (flops / 1e17) ** -0.1 * np.exp(rng.normal(0, 0.003, len(flops))))
    assert bare.c == 0 and bare(1e17) == pytest.approx(3.0, rel=0.01) and bare.b == pytest.approx(0.1, rel=0.05)
    outlier = true.copy()
    outlier[3] *= 1.3  # one broken run: the robust loss keeps the fit on the others
    assert fit_power_law(flops, outlier, floor=True)(1e20) == pytest.approx(2.0 * 1000**-0.3 + 1.7, rel=0.02)


def test_compute_multiplier_recovers_a_known_efficiency_gain():
    """Ladder B reaches every loss with 1/2.5 of ladder A's compute: the multiplier is 2.5, inside its interval."""
    rng = np.random.default_rng(1)
    flops = np.logspace(11, 12.3, 5)

    def ladder(gain):
        losses = 3.0 * (gain * flops / 1e11) ** -0.1 * np.exp(rng.normal(0, 0.004, len(flops)))
        return [RunPoint(f"r{i}", c, x, 0, 0) for i, (c, x) in enumerate(zip(flops, losses))]

    adamw, muon = ladder(1.0), ladder(2.5)
    ratio, low, high = compute_multiplier(adamw, muon, at_flops=flops[-1])
    assert ratio == pytest.approx(2.5, rel=0.15) and low < ratio < high and low < 2.5 < high
    same, low, high = compute_multiplier(adamw, adamw, at_flops=flops[-1])
    assert same == pytest.approx(1.0) and low < 1.0 < high
    assert fit_power_law(flops, 3.0 * (flops / 1e11) ** -0.1).flops_for(3.0) == pytest.approx(1e11, rel=1e-3)
    flat = fit_power_law(flops, np.full(len(flops), 3.0))  # a ladder that does not learn: b at its bound
    assert flat.b < 1e-3 and flat.flops_for(2.5) == math.inf and flat.flops_for(3.5) == 0.0  # no OverflowError
    with pytest.raises(UserError, match="2 or more different compute budgets; got 3 run"):
        fit_power_law(np.full(3, 1e11), np.array([3.0, 3.1, 2.9]))  # three seeds of one config


def write_runs(root, points) -> list[str]:
    """Finished-run directories (config.yaml + metrics.jsonl) with these (FLOPs, validation loss)."""
    runs = []
    for i, (flops, loss) in enumerate(points):
        run = root / f"r{i}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(
            "run_dir: x\nmodel: {d_model: 32, n_heads: 2, n_layers: 2, vocab_size: 384}\ntokenizer: t.json\n"
            "data: {sources: [d]}\nmax_duration: 10ba\nglobal_batch_size: 2\nresolved: {micro_batch_size: 2}\n"
        )
        records = [
            {"kind": "train", "step": 10, "tokens": 1000 * (i + 1), "flops": flops},
            {"kind": "eval", "val_loss": loss},
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(str(run))
    return runs


def test_scaling_fit_reads_real_runs_and_plots(tmp_path, capsys):
    runs = write_runs(tmp_path, [(1e11, 3.4), (2e11, 3.2), (4e11, 3.0), (8e11, 2.85)])
    assert read_run(runs[0]).flops == 1e11 and read_run(runs[0]).loss == 3.4
    png = tmp_path / "fit.png"
    assert main(["scaling", "fit", *runs, "--predict-flops", "3.2e12", "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "prediction at 3.2e+12 FLOPs" in printed and png.stat().st_size > 10_000
    assert "+ 0.0000" in printed  # the default: a pure power law
    assert main(["scaling", "fit", *runs, "--predict-flops", "3.2e12", "--floor", "--png", "none"]) == 0
    assert "+ 0.0000" not in capsys.readouterr().out
    (tmp_path / "r0" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "tokens": 1}) + "\n")
    assert main(["scaling", "fit", *runs]) == 2
    assert "no validation records" in capsys.readouterr().err


def test_scaling_compare_reads_two_ladders_by_glob_and_reports_the_multiplier(tmp_path, capsys):
    flops = [1e11, 2e11, 4e11, 8e11, 1.6e12]
    write_runs(tmp_path / "adamw", [(c, 3.0 * (c / 1e11) ** -0.1) for c in flops])
    write_runs(tmp_path / "muon", [(c, 3.0 * (2 * c / 1e11) ** -0.1) for c in flops])  # every loss at half the compute
    out = scaling("compare", [str(tmp_path / "muon" / "r*")], baseline=[str(tmp_path / "adamw" / "r*")])
    assert out["multiplier"] == pytest.approx(2.0, rel=1e-3) and out["at_flops"] == 1.6e12
    assert "a 2.00x compute multiplier" in capsys.readouterr().out
    argv = ["scaling", "compare", str(tmp_path / "muon" / "r*")]
    assert main([*argv, "--baseline", str(tmp_path / "adamw" / "r*"), "--at-flops", "4e11"]) == 0
    assert "(its fit at 4e+11 FLOPs)" in capsys.readouterr().out
    assert main([*argv, "--baseline", str(tmp_path / "adamw" / "r*"), "--at-flops", "0"]) == 2
    assert "--at-flops must be positive" in capsys.readouterr().err
    assert (
        main([*argv, "--baseline", str(tmp_path / "adamw" / "r0"), "--baseline", str(tmp_path / "adamw" / "r1")]) == 2
    )
    assert "3 or more runs in each" in capsys.readouterr().err
    assert main(argv) == 2 and "needs --baseline" in capsys.readouterr().err
    assert main([*argv, "--baseline", str(tmp_path / "lion" / "r*")]) == 2
    assert "matches no run directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "mpt-7b", "--tokens", "1e12", "--gpu", "a100-40"], "did you mean 'a100-40gb'?"),
        (["--budget-flops=-1e21"], "--budget-flops must be positive"),
        (["--budget-usd", "1000"], "--budget-usd needs --price-per-gpu-hour"),
        (["--model", "mpt-7b", "--tokens", "1e12", "--mfu", "1.5"], "--mfu is a fraction"),
        (["--model", "mpt-7b", "--tokens", "1e12", "--mfu", "measured:/nonexistent"], "no metrics.jsonl"),
        (["--model", "mpt-7b"], "give --model and --tokens"),
        (["--model", "mpt-7b", "--tokens", "1e12", "--budget-flops", "1e21"], "not both"),
    ],
)
def test_bad_plan_inputs_are_one_line_errors(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_the_cpu_entry_is_measured_here():
    cpu = accelerator("cpu")
    assert cpu.peak_flops > 1e9 and cpu.memory_gib > 1
