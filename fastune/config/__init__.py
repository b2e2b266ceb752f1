"""Training configs: YAML recipes with overrides, validated against a schema.

    cfg = load_config("llama3_2/1B_lora", ["optimizer.lr=1e-4", "metric_logger=wandb"])
    optimizer = instantiate(cfg.optimizer, model.parameters())
    save_resolved_config(cfg, cfg.output_dir)

The keys, their types and defaults are in ``fastune.config.schema.SCHEMA``.
"""

from fastune.config.components import instantiate, locate
from fastune.config.loader import (
    load_config, read_config_text, save_resolved_config, shipped_config, shipped_config_names,
)
from fastune.config.schema import SCHEMA

__all__ = ["SCHEMA", "instantiate", "load_config", "locate", "read_config_text",
           "save_resolved_config", "shipped_config", "shipped_config_names"]
