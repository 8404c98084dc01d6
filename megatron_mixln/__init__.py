"""megatron_mixln: LLaMA pre-training on DeepSpeed with Mix-LN and its normalisation-placement baselines."""
from megatron_mixln.config import Config, ConfigError, DataConfig, ModelConfig, ParallelConfig, TrainConfig, load_config

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "ParallelConfig", "TrainConfig", "load_config",
           "build_model"]


def build_model(config: ModelConfig, **kwargs):
    """Build the LLaMA decoder for `config` (see megatron_mixln.model.llama)."""
    from megatron_mixln.model.llama import build_model as _build

    return _build(config, **kwargs)
