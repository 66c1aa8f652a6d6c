"""LLaVA model classes in the original LLaVA layout, on top of transformers' Llama/Mistral and
CLIP vision classes."""
