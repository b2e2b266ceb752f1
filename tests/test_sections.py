"""Typed sections of a validated config: each layer's own settings, plain values."""

from pathlib import Path

from fastune.config import load_config
from fastune.models.spec import KERNEL_OPS
from fastune.config.sections import DataSection, DistributedSection, LoraSection, ModelSection

BASE = """\
output_dir: out
model:
  checkpoint_dir: ckpt
dataset:
  source: json
  data_files: {train: data/train.jsonl, validation: data/val.jsonl}
  column_map: {output: response}
"""


def test_sections_hold_the_validated_values(tmp_path):
    (tmp_path / "config.yaml").write_text(BASE)
    cfg = load_config(tmp_path / "config.yaml", ["distributed.reduce_dtype=bfloat16", "lora.targets=[q,v]",
                                                  "model.dtype=float32", "eval_exact_match.max_examples=3"],
                      check_paths=False)
    assert ModelSection.from_config(cfg) == ModelSection(Path("ckpt"), "fp32", KERNEL_OPS)
    assert LoraSection.from_config(cfg) == LoraSection(("q_proj", "v_proj"), 8, 16.0, 0.0)
    dist = DistributedSection.from_config(cfg)
    assert dist.reduce_dtype == "bf16" and dist.timeout_s == 1800 and dist.model.dtype == "fp32"
    data = DataSection.from_config(cfg)
    assert data.batch_size == 4 and data.exact_match_max_examples == 3 and data.dataset.component is None
    # Plain containers, not OmegaConf nodes: the layers below never see the config tree.
    assert type(data.dataset.data_files) is dict and type(data.dataset.column_map) is dict
    assert data.dataset.data_files["validation"] == "data/val.jsonl" and data.dataset.max_seq_len == 2048


def test_a_component_dataset_keeps_its_section(tmp_path):
    (tmp_path / "config.yaml").write_text(BASE.split("dataset:")[0] + (
        "dataset:\n  _component_: fastune.data.load_sft_dataset\n  source: x\n"))
    cfg = load_config(tmp_path / "config.yaml", check_paths=False)
    data = DataSection.from_config(cfg).dataset
    assert data.component.source == "x" and not data.packed and data.shuffle
