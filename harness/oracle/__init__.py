"""The original-LLaVA oracle: logits that LLaVA's released code computes for tiny checkpoints.

Two sources, one format (a folder with `manifest.json`, `images.safetensors`, `cases/`):

- **live**: computed on this machine by the `llava-torch` wheel under its pinned transformers
  4.37, in a virtual environment the harness creates and caches (`llava-harness oracle setup`);
  the harness must then match it bit for bit.
- **stored**: the committed copy under `fixtures/reference/original-llava/`, computed once on
  one machine; on another machine it is matched within the bound in `tolerances.toml`.

`cases` says what is computed, `venv` makes the environment, `compute` runs inside it (it
imports LLaVA, never the harness), `live` builds and caches a live oracle, `source` picks one
and compares against it.
"""
