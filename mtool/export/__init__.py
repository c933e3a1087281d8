"""Exporting models to other runtimes' formats: ``mtool export gguf`` (llama.cpp, Ollama, LM Studio)."""
