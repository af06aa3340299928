"""longboi's MPT as a vLLM model: every knob of `ModelConfig`, on vLLM's paged attention and parallel layers.

vLLM dropped its own MPT in 0.28.0, and the one before it computed only part of the family (it asserted
ALiBi, tied embeddings and LayerNorm, sized k_ln for multi-head attention only, ignored softmax_scale).
This file is the same decoder as `longboi/model.py` written with vLLM's layers, so that vLLM's scheduler,
paged KV cache, tensor parallelism and LoRA serve it. It is imported only inside vLLM's processes
(`longboi.export.vllm.register` names it lazily), never by longboi itself.

What makes it exact, knob by knob (tests/test_vllm.py compares it with `longboi generate`):
- ALiBi: vLLM's attention adds `slope * (key_pos - query_pos)` after scaling the scores, which under the
  causal mask is MPT's bias up to a per-row constant (softmax ignores it); the slopes are longboi's own
  (`alibi_slopes`, MPT's order for head counts that are not powers of two), unscaled.
- softmax_scale is the attention's scale; learned positions index `wpe` by each token's position;
  clip_qkv clamps the fused projection; qk_ln normalizes the whole q and k vectors (gathered across
  tensor-parallel ranks first, as MPT normalizes over d_model, not per head).
- GQA/MQA through the fused QKV's per-head split; an untied head is its own matrix; logit_scale scales
  the logits; biases and LayerNorm/RMSNorm follow no_bias and norm_type. embedding_fraction and dropout
  only change training, so inference ignores them.
"""

# No `from __future__ import annotations`: vLLM's support_torch_compile reads the forward's annotations
# at run time to find the dynamic (token) dimensions.
from collections.abc import Iterable
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn

from longboi.export.vllm import require_supported_vllm

require_supported_vllm()  # a clear message instead of an ImportError deep in vLLM's loader

from vllm.compilation.decorators import support_torch_compile  # noqa: E402
from vllm.config import CacheConfig, VllmConfig  # noqa: E402
from vllm.distributed import (  # noqa: E402
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.model_executor.layers.attention import Attention  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor  # noqa: E402
from vllm.model_executor.layers.vocab_parallel_embedding import (  # noqa: E402
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader  # noqa: E402
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP  # noqa: E402
from vllm.model_executor.models.utils import (  # noqa: E402
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors  # noqa: E402

from longboi.config import ModelConfig  # noqa: E402
from longboi.export.vllm import model_config_of  # noqa: E402
from longboi.model import alibi_slopes, build_norm  # noqa: E402


class MPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, cache_config: CacheConfig | None, quant_config, prefix: str):
        super().__init__()
        self.cfg = cfg
        self.tp_size, self.tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        if cfg.n_heads % self.tp_size:
            raise ValueError(f"n_heads ({cfg.n_heads}) must be divisible by --tensor-parallel-size {self.tp_size}")
        if cfg.qk_ln and cfg.kv_heads < self.tp_size:
            raise ValueError(
                f"qk_ln with {cfg.kv_heads} key/value heads cannot be split over --tensor-parallel-size "
                f"{self.tp_size} (k_ln normalizes over all key heads): use a tensor-parallel size <= {cfg.kv_heads}"
            )
        self.Wqkv = QKVParallelLinear(
            cfg.d_model,
            cfg.head_dim,
            cfg.n_heads,
            cfg.kv_heads,
            bias=not cfg.no_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.Wqkv",
        )
        if cfg.qk_ln:  # over the whole q (d_model) and k (kv_heads * head_dim) vectors, as MPT does
            self.q_ln = build_norm(cfg, cfg.d_model)
            self.k_ln = build_norm(cfg, cfg.kv_heads * cfg.head_dim)
        self.out_proj = RowParallelLinear(
            cfg.d_model, cfg.d_model, bias=not cfg.no_bias, quant_config=quant_config, prefix=f"{prefix}.out_proj"
        )
        self.num_heads = cfg.n_heads // self.tp_size
        self.num_kv_heads = max(1, cfg.kv_heads // self.tp_size)  # fewer kv heads than ranks: replicated
        self.q_size, self.kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        slopes = None
        if cfg.alibi:
            first = self.tp_rank * self.num_heads
            slopes = alibi_slopes(cfg.n_heads, cfg.alibi_bias_max)[first : first + self.num_heads].tolist()
        self.attn = Attention(
            self.num_heads,
            cfg.head_dim,
            cfg.softmax_scale or cfg.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            alibi_slopes=slopes,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.Wqkv(hidden_states)  # (N, (H + 2 Hkv) D / tp)
        if self.cfg.clip_qkv:
            qkv = qkv.clamp(min=-self.cfg.clip_qkv, max=self.cfg.clip_qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.cfg.qk_ln:
            q, k = self._qk_norm(q, k)
        out, _ = self.out_proj(self.attn(q, k, v))  # (N, d)
        return out

    def _qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LayerNorm over the whole q and k vectors; under tensor parallelism each rank holds a slice of them."""
        if self.tp_size == 1:
            return self.q_ln(q).to(q.dtype), self.k_ln(k).to(k.dtype)
        q = self.q_ln(tensor_model_parallel_all_gather(q.contiguous())).to(q.dtype)  # (N, d)
        k = self.k_ln(tensor_model_parallel_all_gather(k.contiguous())).to(k.dtype)  # (N, Hkv D)
        return q.chunk(self.tp_size, dim=-1)[self.tp_rank], k.chunk(self.tp_size, dim=-1)[self.tp_rank]


class MPTMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quant_config, prefix: str):
        super().__init__()
        bias = not cfg.no_bias
        self.up_proj = ColumnParallelLinear(
            cfg.d_model, cfg.ffn_hidden, bias=bias, quant_config=quant_config, prefix=f"{prefix}.up_proj"
        )
        self.down_proj = RowParallelLinear(
            cfg.ffn_hidden, cfg.d_model, bias=bias, quant_config=quant_config, prefix=f"{prefix}.down_proj"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.up_proj(x)  # (N, ffn / tp)
        x, _ = self.down_proj(F.gelu(x))  # exact GELU, as longboi trains it
        return x


class MPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, cache_config: CacheConfig | None, quant_config, prefix: str):
        super().__init__()
        self.norm_1 = build_norm(cfg, cfg.d_model)
        self.attn = MPTAttention(cfg, cache_config, quant_config, prefix=f"{prefix}.attn")
        self.norm_2 = build_norm(cfg, cfg.d_model)
        self.ffn = MPTMLP(cfg, quant_config, prefix=f"{prefix}.ffn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.ffn(self.norm_2(x))


@support_torch_compile
class MPTModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg = model_config_of(vllm_config.model_config.hf_config)
        self.cfg = cfg
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, prefix=f"{prefix}.wte")
        if cfg.learned_pos_emb:
            self.wpe = VocabParallelEmbedding(cfg.max_seq_len, cfg.d_model, prefix=f"{prefix}.wpe")
        self.start_layer, self.end_layer, self.blocks = make_layers(
            cfg.n_layers,
            lambda prefix: MPTBlock(cfg, vllm_config.cache_config, vllm_config.quant_config, prefix),
            prefix=f"{prefix}.blocks",
        )
        self.norm_f = build_norm(cfg, cfg.d_model)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(["hidden_states"], cfg.d_model)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """(N,) token ids of every sequence in the step, flattened, and their positions -> (N, d)."""
        if get_pp_group().is_first_rank:
            x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            if self.cfg.learned_pos_emb:
                x = x + self.wpe(positions)
        else:
            assert intermediate_tensors is not None
            x = intermediate_tensors["hidden_states"]
        for block in islice(self.blocks, self.start_layer, self.end_layer):
            x = block(x)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": x})
        return self.norm_f(x)


class LongboiMPTForCausalLM(nn.Module, SupportsPP, SupportsLoRA):
    """vLLM's entry class: the trunk (`transformer`, MPT's name), the LM head and the logits processor."""

    # Wqkv is one fused matrix with one LoRA (peft's A and B over all of q, k and v), as ChatGLM's
    # query_key_value: naming it packed of itself picks vLLM's single-LoRA QKV layer (without the entry
    # vLLM leaves Wqkv unadapted, silently).
    packed_modules_mapping = {"Wqkv": ["Wqkv"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.transformer = MPTModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer"))
        cfg = self.cfg = self.transformer.cfg
        self.config = vllm_config.model_config.hf_config
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.d_model, prefix=maybe_prefix(prefix, "lm_head"))
        if cfg.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.transformer.wte)
        scale = cfg.logit_scale if cfg.logit_scale is not None else 1.0
        self.logits_processor = LogitsProcessor(cfg.vocab_size, scale=scale)
        self.make_empty_intermediate_tensors = self.transformer.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Our checkpoint names are the module names here, so each tensor goes to its parameter's own loader
        (which slices it for this tensor-parallel rank; the fused Wqkv into its q, k and v parts). A tied
        checkpoint stores no lm_head (safetensors keeps no aliases): the embedding is the head."""
        params = dict(self.named_parameters())  # a tied lm_head is the embedding's parameter, listed once
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                raise ValueError(f"unexpected tensor {name!r} in the checkpoint (this model has no such weight)")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded
