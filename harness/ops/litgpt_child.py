"""Runs inside the litgpt environment (`llava-harness litgpt setup`): litgpt loads an export as
it loads its own checkpoints, strictly, and saves the float32 logits of the given token ids.

Started by `harness.ops.litgpt_env.litgpt_logits` as
`<litgpt venv>/bin/python -I litgpt_child.py FOLDER IDS OUT` (IDS comma-separated). It imports
litgpt and torch only, never the harness, which that environment does not have.
"""

from __future__ import annotations

import sys


def main(folder: str, ids: str, out: str) -> None:
    import torch  # heavy: torch (and only in litgpt's environment)
    from litgpt import GPT, Config  # optional: litgpt

    model = GPT(Config.from_file(f"{folder}/model_config.yaml"))
    state = torch.load(f"{folder}/lit_model.pth", weights_only=True, mmap=True)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = model.eval()(torch.tensor([[int(i) for i in ids.split(",")]]))
    torch.save(logits, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
