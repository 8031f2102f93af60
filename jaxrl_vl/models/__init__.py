"""Pure-functional Qwen-VL models (Qwen3-VL, Qwen2.5-VL) in JAX: load, run, export."""
from jaxrl_vl.models.checkpoint import export, from_hf_state_dict, load, to_hf_state_dict
from jaxrl_vl.models.config import ModelConfig, TextConfig, VisionConfig
from jaxrl_vl.models.inputs import make_batch
from jaxrl_vl.models.layout import is_unstacked, stack_layers, unstack_layers
from jaxrl_vl.models.qwen_vl import apply, init, num_params, unembed, unembedding

__all__ = ["ModelConfig", "TextConfig", "VisionConfig", "apply", "export", "from_hf_state_dict", "init",
           "is_unstacked", "load", "make_batch", "num_params", "stack_layers", "to_hf_state_dict", "unembed",
           "unembedding", "unstack_layers"]
