"""Generation: a static KV cache, a (compilable) decode loop, sampling, and loading a
checkpoint to generate from.

    model, tokenizer, _ = load_for_inference("out/epoch_0")
    generator = Generator(model, compile=True)
    out = generator.generate([prompt_ids(tokenizer, "Hi")], max_new_tokens=64,
                             sampling=SamplingParams(temperature=0.7, top_p=0.9),
                             stop_ids=tokenizer.stop_ids)
    print(tokenizer.decode(out.tokens[0]), out.decode_tokens_per_second)
"""

from fastune.generation.generate import GenerationError, GenerationOutput, Generator, generate
from fastune.generation.kv_cache import KVCache, cache_mask, clear_kv_caches, setup_kv_caches
from fastune.generation.load import CheckpointNotFound, load_for_inference, load_model, resolve_checkpoint
from fastune.generation.sampling import SamplingError, SamplingParams, sample
from fastune.generation.text import TextStream, has_chat_format, prompt_ids

__all__ = [
    "CheckpointNotFound", "GenerationError", "GenerationOutput", "Generator", "KVCache", "SamplingError",
    "SamplingParams", "TextStream", "cache_mask", "clear_kv_caches", "generate", "has_chat_format",
    "load_for_inference", "load_model", "prompt_ids", "resolve_checkpoint", "sample", "setup_kv_caches",
]
