"""What a finished run tells its user: where the checkpoints went, the chart of its
metrics, and the code that loads the last checkpoint in transformers, PEFT and vLLM.

``loading_code`` is also the README's snippet (a test runs both verbatim on a demo
run), so the two cannot drift apart.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from fastune.checkpoint.layout import ADAPTER_CONFIG, MERGED_DIR, CONFIG_NAME, adapter_folder, checkpoint_dirs

log = logging.getLogger(__name__)

# The max_lora_rank values vLLM accepts (LoRAConfig); an adapter's rank must not exceed it.
_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def loading_code(ckpt: Path) -> str:
    """Python that loads checkpoint ``ckpt`` (a path as the user gave it, relative or not)
    in transformers, PEFT and vLLM."""
    ckpt = Path(ckpt)
    adapter = adapter_folder(ckpt)
    if adapter is None:
        return "\n".join([
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{ckpt}")',
            "# vLLM",
            "from vllm import LLM",
            f'llm = LLM(model="{ckpt}")',
        ])
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    lines = [
        "from peft import PeftConfig, PeftModel",
        "from transformers import AutoModelForCausalLM",
        "# transformers: the fine-tuned model (the base model named in adapter_config.json, with the adapter)",
        f'model = AutoModelForCausalLM.from_pretrained("{adapter}")',
    ]
    merged = ckpt / MERGED_DIR
    if (merged / CONFIG_NAME).is_file():
        lines += ["# transformers: the same fine-tune as merged weights (no PEFT needed)",
                  f'model = AutoModelForCausalLM.from_pretrained("{merged}")']
    lines += [
        "# PEFT: the adapter over the base model",
        f'base_path = PeftConfig.from_pretrained("{adapter}").base_model_name_or_path',
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), "{adapter}")',
    ]
    if config.get("use_dora"):
        lines.append("# vLLM does not load DoRA adapters: serve the merged weights with LLM(model=...)")
        return "\n".join(lines)
    rank = next((r for r in _VLLM_RANKS if r >= config["r"]), config["r"])
    lines += [
        "# vLLM: the base model, with the adapter per request",
        "from vllm import LLM",
        "from vllm.lora.request import LoRARequest",
        f"llm = LLM(model=base_path, enable_lora=True, max_lora_rank={rank})",
        f'outputs = llm.generate(["Hello"], lora_request=LoRARequest("fastune", 1, "{adapter}"))',
    ]
    return "\n".join(lines)


def report_outputs(output_dir: Path, chart: Optional[Path] = None) -> None:
    """Log where the checkpoints of ``output_dir`` are, the chart, and how to load the latest."""
    found = checkpoint_dirs(Path(output_dir))
    if chart is not None:
        log.info("metrics chart: %s", chart)
    if not found:
        log.info("no checkpoint in %s", output_dir)
        return
    # checkpoint_dirs resolves nothing: the paths keep the user's spelling of output_dir.
    log.info("checkpoints: %s (latest: %s)", ", ".join(str(p) for p in found), found[-1])
    log.info("load the latest:\n%s", loading_code(found[-1]))
