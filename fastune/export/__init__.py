"""Checkpoints in formats other runtimes load: GGUF for llama.cpp, Ollama and LM Studio
(``fastune.export.gguf.export_gguf``; the CLI imports this package, so it imports nothing heavy)."""
