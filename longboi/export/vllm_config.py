"""transformers' config class for `model_type: longboi_mpt`: the configs its MptConfig cannot represent
(GQA, learned positions, QK-LayerNorm...). vLLM parses config.json through transformers, so the plugin
registers this class (longboi.export.vllm.register). A module of its own, at top level, because vLLM
pickles the config into its engine processes; it needs transformers, which vLLM always brings.
"""

from typing import Any

from transformers import PretrainedConfig

from longboi.export.vllm import model_config_of


class LongboiMPTConfig(PretrainedConfig):
    """Keeps every key of config.json (attn_config stays a dict) and names the sizes vLLM reads under
    their transformers spellings; the key/value head count is ModelConfig's own (GQA, MQA or n_heads)."""

    model_type = "longboi_mpt"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if "d_model" in kwargs:  # transformers also builds an empty default instance
            self.num_key_value_heads = model_config_of(self).kv_heads
