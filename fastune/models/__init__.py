from fastune.models.config import ConfigError, ModelConfig
from fastune.models.transformer import Transformer

__all__ = ["ConfigError", "ModelConfig", "Transformer"]
