"""`fastune eval`: the lm-eval model class against direct computation, the local demo
tasks end to end, and accuracy that rises with the demo fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from train_helpers import single_thread  # noqa: F401 (autouse fixture)

import fastune
from fastune.cli import main
from fastune.eval import EvalError, evaluate
from fastune.generation import generate, load_for_inference

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from fastune.eval.lm import FastuneLM  # noqa: E402
from fastune.eval.run import _task_manager  # noqa: E402

DEMO = Path(fastune.__file__).parent / "assets" / "demo" / "base_model"


@pytest.fixture(scope="module")
def demo():
    model, tokenizer, _ = load_for_inference(DEMO, dtype="fp32")
    return model, tokenizer


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct_logprob(model, ids: list[int], start: int) -> tuple[float, bool]:
    """Sum of log P(ids[i] | ids[:i]) for i >= start, and whether each is the argmax."""
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    targets = torch.tensor(ids[start:])
    picked = logprobs[start - 1:-1]
    return picked.gather(-1, targets[:, None]).sum().item(), bool((picked.argmax(-1) == targets).all())


def test_loglikelihood_equals_direct_computation(demo):
    model, tok = demo
    lm = FastuneLM(model, tok, batch_size=2)
    pairs = [("Write the word in capital letters.\n\nabc", " ABC"), ("Sort the letters", " in order"),
             ("x", " y z"), ("Write the word backwards.", "\n\ncba")]
    results = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    for (context, continuation), (score, greedy) in zip(pairs, results):
        context_ids = tok.encode(context)  # with bos, as lm-eval's HF model encodes
        whole = tok.encode(context + continuation)
        expected, expected_greedy = direct_logprob(model, whole, len(context_ids))
        assert score == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy


def test_loglikelihood_cuts_long_contexts_on_the_left(demo):
    model, tok = demo
    lm = FastuneLM(model, tok, max_seq_length=8)
    ids = tok.encode("Write the word in capital letters and then sort them")
    context, continuation = ids[:-3], ids[-3:]
    (score, _), = lm._loglikelihood_tokens([(None, context, continuation)])
    window = (context + continuation)[-9:]  # 8 inputs predict the last 8 tokens
    assert score == pytest.approx(direct_logprob(model, window, 6)[0], abs=1e-4)


def test_loglikelihood_rolling_scores_every_token_once(demo):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, tok = demo
    text = "Write the word backwards. Sort the letters in alphabetical order."
    ids = tok.encode(text, add_bos=False)
    whole, = FastuneLM(model, tok, max_seq_length=64).loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert whole == pytest.approx(direct_logprob(model, [tok.bos_id, *ids], 1)[0], abs=1e-4)
    # Windows of 5 tokens, as lm-eval defines them: the first conditions on bos.
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tok.bos_id, 5, 1)]
    assert [t for _, predicted in windows for t in predicted] == ids and len(windows) > 2
    expected = sum(direct_logprob(model, context + predicted, len(context))[0] for context, predicted in windows)
    windowed, = FastuneLM(model, tok, max_seq_length=5).loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert windowed == pytest.approx(expected, abs=1e-4)


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(demo):
    model, tok = demo
    lm = FastuneLM(model, tok, batch_size=2)
    contexts = ["Write the word backwards.\n\nabc", "Sort the letters in alphabetical order.\n\ncab", "x"]
    outputs = lm.generate_until([request("generate_until", c, {"until": ["e"], "max_gen_toks": 7})
                                 for c in contexts], disable_tqdm=True)
    for context, output in zip(contexts, outputs):
        ids = generate(model, [tok.encode(context)], 7, stop_ids=tok.stop_ids).tokens[0]
        assert output == tok.decode(ids).split("e")[0]


def test_chat_template_renders_open_or_closed_turns(demo):
    model, tok = demo
    lm = FastuneLM(model, tok)
    turn = [{"role": "user", "content": "Sort the letters.\n\ncab"}]
    assert lm.apply_chat_template(turn) == tok.render(turn, add_generation_prompt=True)
    prefilled = lm.apply_chat_template(turn + [{"role": "assistant", "content": "ab"}], add_generation_prompt=False)
    assert prefilled.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nab")
    assert lm.tok_encode(prefilled)[0] == tok.bos_id and lm.tok_encode(prefilled).count(tok.bos_id) == 1


def test_cli_eval_runs_the_local_tasks_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, ["eval", str(DEMO), "--tasks", "fastune_demo", "--limit", "8",
                                       "--apply-chat-template", "--dtype", "fp32", "--device", "cpu",
                                       "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "fastune_demo_choice" in result.stdout and "fastune_demo_answer" in result.stdout
    metrics = json.loads(out.read_text())["results"]
    assert 0 <= metrics["fastune_demo_choice"]["acc,none"] <= 1
    assert 0 <= metrics["fastune_demo_answer"]["exact_match,none"] <= 1


def test_unknown_task_is_one_line_with_a_suggestion():
    class FakeTaskManager:  # lm-eval's full index takes tens of seconds to build
        def __init__(self, include_path, include_defaults=True):
            self.all_tasks = ["fastune_demo_choice"] + (["arc_easy", "hellaswag"] if include_defaults else [])

    assert _task_manager(FakeTaskManager, ["arc_easy"], []).all_tasks[-1] == "hellaswag"
    with pytest.raises(EvalError, match=r"--tasks: unknown task 'arc_eazy' \(did you mean 'arc_easy'\?\)"):
        _task_manager(FakeTaskManager, ["arc_eazy"], [])


@pytest.mark.slow
def test_accuracy_rises_after_the_demo_fine_tune(tmp_path):
    """`fastune train demo`, cut to 40 optimizer steps, then the demo choice task (all 120
    documents) before and after."""
    from fastune.config import load_config
    from fastune.training.recipe import train

    cfg = load_config("demo", [f"output_dir={tmp_path / 'run'}", "epochs=1", "max_steps_per_epoch=40",
                               "eval_exact_match.source=null", "eval_every_n_steps=null", "metric_logger=stdout",
                               "log_every_n_steps=20"])
    train(cfg)

    def accuracy(checkpoint) -> float:
        results = evaluate(checkpoint, ["fastune_demo_choice"], batch_size=16, apply_chat_template=True, dtype="fp32")
        return results["results"]["fastune_demo_choice"]["acc,none"]

    before, after = accuracy(DEMO), accuracy(tmp_path / "run")  # the run dir: its latest checkpoint
    assert after >= before + 0.15, (before, after)  # measured 0.66 -> 0.99
