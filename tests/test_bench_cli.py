"""``fastune bench train`` and ``fastune bench kernels`` on tiny inputs: the reports are
well formed, the ratios come from the numbers of the same run, and the configurations
ran interleaved on the same model and data."""

import json

import pytest
from click.testing import CliRunner

from fastune.cli import main
from train_helpers import hf_llama, make_config, save_base


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_bench_train_report(tmp_path):
    save_base(hf_llama(), tmp_path / "base")
    make_config(tmp_path, tmp_path / "base")  # writes tmp_path/cfg.yaml: LoRA, fp32, eager
    out = tmp_path / "reports"
    invoke("bench", "train", tmp_path / "cfg.yaml", "--steps", 2, "--warmup", 1, "--rounds", 2,
           "--compare", "eager", "--compare", "hf-eager", "--out", out)

    report = json.loads((out / "train_cfg.json").read_text())
    results = report["results"]
    assert list(results) == ["fastune", "fastune eager", "hf+peft eager"]
    for name, r in results.items():
        assert len(r["steps"]) == 2
        assert r["tokens_per_s"] > 0 and r["supervised_tokens_per_s"] <= r["tokens_per_s"]
        assert set(r["phases_median_ms"]) == {"data", "forward", "backward", "optimizer", "other"}
        assert r["phases_median_ms"]["forward"] > 0 and r["phases_median_ms"]["backward"] > 0
        assert r["memory"]["process_peak_rss_mib"] >= r["memory"]["steps_peak_rss_mib"] > 0
        assert 0 < r["fraction_of_peak_flops"] < 1
    # The same weights and the same first batch give the same loss (fp32) everywhere.
    first = [r["first_loss"] for r in results.values()]
    assert max(first) - min(first) < 1e-4 * abs(first[0])

    # Ratios are this run's numbers, divided.
    for name, ratio in report["ratios"].items():
        assert ratio["tokens_per_s"] == results["fastune"]["tokens_per_s"] / results[name]["tokens_per_s"]
        key = ratio["memory_measure"]
        assert ratio["peak_memory"] == results["fastune"]["memory"][key] / results[name]["memory"][key]
    # Interleaved: every configuration's round-1 step ended before any round-2 step did.
    round_1 = [r["steps"][0]["finished_at"] for r in results.values()]
    round_2 = [r["steps"][1]["finished_at"] for r in results.values()]
    assert max(round_1) < min(round_2)

    markdown = (out / "train_cfg.md").read_text()
    assert f"Run {report['run_id']}" in markdown
    for name in results:
        assert f"| {name} |" in markdown
    assert (out / "train_cfg.png").stat().st_size > 0


def test_bench_train_unknown_config_key_is_one_line(tmp_path):
    save_base(hf_llama(), tmp_path / "base")
    make_config(tmp_path, tmp_path / "base")
    result = CliRunner().invoke(main, ["bench", "train", str(tmp_path / "cfg.yaml"), "batch_sise=2",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "batch_size" in lines[0]


@pytest.mark.slow
def test_bench_kernels_report(tmp_path):
    invoke("bench", "kernels", "--ops", "rms_norm", "--steps", 2, "--warmup", 0, "--out", tmp_path)
    report = json.loads((tmp_path / "kernels.json").read_text())
    rows = report["results"]["rms_norm"]
    assert set(rows) == {"eager", "compiled"}  # CPU
    for r in rows.values():
        assert 0 < r["forward_ms"] <= r["median_ms"] and r["backward_ms"] > 0 and r["peak_mib"] >= 0
        assert set(r["errors"]) == {"out0", "d_arg0", "d_arg1"}
        assert max(r["errors"].values()) < 2e-2  # bf16 against float64
    markdown = (tmp_path / "kernels.md").read_text()
    speedup = rows["eager"]["median_ms"] / rows["compiled"]["median_ms"]
    assert f"| {speedup:.2f}x |" in markdown  # the table's ratio is this run's medians, divided
    assert (tmp_path / "kernels.png").stat().st_size > 0


def test_variants_and_baselines_are_named_and_ordered():
    from fastune.bench.train import BenchError, parse_variant, specs

    variant = parse_variant("no kernels:model.use_kernels=false, compile=true")
    assert variant == ("no kernels", ["model.use_kernels=false", "compile=true"])
    assert parse_variant("two ops:model.kernels=[rope, loss],~lora.targets,seed=2") == (
        "two ops", ["model.kernels=[rope, loss]", "~lora.targets", "seed=2"])
    got = specs("cfg.yaml", ["seed=1"], ["eager", "hf", "hf-eager"], 2, [variant])
    assert [s.name for s in got] == ["fastune", "fastune, no kernels", "fastune eager", "hf+peft eager",
                                     "hf+peft compiled"]
    assert got[1].overrides == ["seed=1", "model.use_kernels=false", "compile=true"]
    assert got[2].overrides == ["seed=1", "model.use_kernels=false", "compile=false"]
    assert [s.compile for s in got[3:]] == [False, True]
    with pytest.raises(BenchError, match="NAME:KEY=VALUE"):
        parse_variant("no overrides")


def test_bench_train_hf_against_qlora_is_one_line(tmp_path):
    save_base(hf_llama(), tmp_path / "base")
    make_config(tmp_path, tmp_path / "base")
    result = CliRunner().invoke(main, ["bench", "train", str(tmp_path / "cfg.yaml"), "method=qlora",
                                       "--compare", "hf", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --compare hf: QLoRA in HF needs bitsandbytes on CUDA; compare a lora config"]


@pytest.mark.parametrize("name, profile", [
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA L4", "l4"), ("NVIDIA H100 80GB HBM3", "h100_sxm"),
    ("NVIDIA A100-SXM4-80GB", "a100_80gb"), ("NVIDIA A100-SXM4-40GB", "a100_40gb"), ("Tesla T4", "t4"),
    ("NVIDIA L40S", None), ("NVIDIA H100 PCIe", None),  # other parts: no silent wrong peak
])
def test_gpu_name_picks_its_own_profile(name, profile):
    from fastune.bench.train import BenchError, gpu_profile_for

    if profile is None:
        with pytest.raises(BenchError, match="pass --profile"):
            gpu_profile_for(name)
    else:
        assert gpu_profile_for(name) == profile
