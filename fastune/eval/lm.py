"""An lm-evaluation-harness model class around a fastune ``Transformer``.

lm-eval asks a model three things (``lm_eval.api.model.LM``):

- ``loglikelihood``: log P(continuation | context) summed over the continuation's
  tokens, and whether greedy decoding would produce exactly those tokens.
  ``TemplateLM`` tokenizes the pair (context + continuation as one string, so the
  boundary tokenizes as in running text); ``_loglikelihood_tokens`` scores it.
- ``loglikelihood_rolling``: log P(text) of a whole document, in windows of at
  most ``max_seq_length`` tokens, each token predicted once (lm-eval's rolling
  windows), the first one conditioned on bos (or eos).
- ``generate_until``: a greedy (or sampled) continuation, cut at the first stop string.

Scoring runs only the continuation's positions through ``lm_head``, so a long
context never materializes [S, vocab] logits. Sequences in a batch are padded on
the right, which a causal model never attends to. Generation uses fastune's
KV-cache ``Generator`` with left padding.
"""

from __future__ import annotations

import json
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm import tqdm

from fastune.data import Tokenizer
from fastune.eval.errors import EvalError
from fastune.generation import Generator, SamplingParams

# (request key for lm-eval's cache, context ids, continuation ids)
TokenRequest = tuple[Optional[tuple[str, str]], list[int], list[int]]


class FastuneLM(TemplateLM):
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_seq_length: int = 4096,
                 batch_size: int = 8, compile: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.generator = Generator(model, compile=compile)
        self._device = model.embed_tokens.weight.device
        bos = tokenizer.bos_id
        self._bos_text = tokenizer.decode([bos], skip_special_tokens=False) if bos is not None else None

    # --- what TemplateLM needs ---------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context, and the first rolling window, is conditioned on."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.max_seq_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """By default with bos, as a Llama tokenizer encodes, unless the string already
        starts with it (a chat-formatted prompt)."""
        if add_special_tokens is None:
            add_special_tokens = not (self._bos_text and string.startswith(self._bos_text))
        return self.tokenizer.encode(string, add_bos=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "source", type(self.tokenizer).__name__))

    def chat_template(self, chat_template=False) -> str:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as text in the model's chat format. Without
        ``add_generation_prompt`` the last (assistant) message is left open, to be continued."""
        render = getattr(self.tokenizer, "render", None)
        if render is None or getattr(self.tokenizer, "chat_template", None) is None:
            raise EvalError("--apply-chat-template needs a checkpoint whose tokenizer.json comes with a "
                            "chat template (tokenizer_config.json or chat_template.jinja)")
        text = render(chat_history, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt:
            return text
        last = chat_history[-1]["content"].strip()
        return text[: text.rindex(last) + len(last)]

    # --- scoring -----------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        # Longest first: the first batch shows at once whether memory suffices.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            batch = [requests[i] for i in order[start:start + self.batch_size]]
            for i, score in zip(order[start:start + self.batch_size], self._score_batch(batch)):
                results[i] = score
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, score)
        return results

    def _score_batch(self, batch: list[TokenRequest]) -> list[tuple[float, bool]]:
        inputs, targets = [], []
        for _, context, continuation in batch:
            if len(continuation) > self.max_seq_length:
                raise EvalError(f"a continuation of {len(continuation)} tokens does not fit "
                                f"max_seq_length {self.max_seq_length}")
            whole = (context + continuation)[-(self.max_seq_length + 1):]
            inputs.append(whole[:-1])
            targets.append(continuation)
        width = max(len(x) for x in inputs)
        tokens = torch.full((len(inputs), width), self.tokenizer.pad_id, dtype=torch.long)
        for row, ids in enumerate(inputs):
            tokens[row, :len(ids)] = torch.tensor(ids)
        hidden = self.model(tokens.to(self._device), return_hidden=True)
        scores = []
        for row, (ids, target) in enumerate(zip(inputs, targets)):
            # The continuation's tokens are predicted by the positions just before them.
            positions = hidden[row, len(ids) - len(target):len(ids)]
            logprobs = F.log_softmax(self.model.logits(positions).float(), dim=-1)
            target_ids = torch.tensor(target, device=logprobs.device)
            total = logprobs.gather(-1, target_ids[:, None]).sum().item()
            greedy = bool((logprobs.argmax(-1) == target_ids).all())
            scores.append((total, greedy))
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = request.args
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_seq_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(score for score, _ in scores)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # --- generation --------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation kwargs run together
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for key, indices in groups.items():
            until, max_new_tokens, sampling = _generation_settings(json.loads(key))
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                contexts = [requests[i].args[0] for i in chunk]
                texts = self._generate(contexts, until, max_new_tokens, sampling)
                for i, text in zip(chunk, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results

    def _generate(self, contexts: list[str], until: list[str], max_new_tokens: int,
                  sampling: SamplingParams) -> list[str]:
        room = self.max_seq_length - max_new_tokens
        if room < 1:
            raise EvalError(f"max_gen_toks {max_new_tokens} leaves no room for a prompt in "
                            f"max_seq_length {self.max_seq_length}")
        prompts = [self.tok_encode(c)[-room:] for c in contexts]

        def hit_stop_string(_row: int, ids: list[int]) -> bool:
            return any(s in self.tok_decode(ids) for s in until)

        out = self.generator.generate(prompts, max_new_tokens, sampling=sampling,
                                      stop_ids=self.tokenizer.stop_ids,
                                      stop_fn=hit_stop_string if until else None)
        return [_cut(self.tok_decode(ids), until) for ids in out.tokens]


def _generation_settings(kwargs: dict) -> tuple[list[str], int, SamplingParams]:
    """lm-eval's gen_kwargs -> (stop strings, max new tokens, sampling)."""
    kwargs = dict(kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new_tokens = int(kwargs.pop("max_gen_toks", 256))
    temperature = float(kwargs.pop("temperature", 0.0))
    if not kwargs.pop("do_sample", temperature > 0):
        temperature = 0.0
    top_k = kwargs.pop("top_k", None)
    sampling = SamplingParams(temperature=temperature, top_k=int(top_k) if top_k else None,
                              top_p=float(kwargs.pop("top_p", 1.0)))
    return until, max_new_tokens, sampling


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first stop string."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text
