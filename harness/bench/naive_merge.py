"""LLaVA's own merge, the baseline of the merge benchmark: the whole base loaded, the LoRA merged
by peft's `merge_and_unload`, `save_pretrained`. A child's whole work, started by
launcher.launch in a fresh process. Apart from naive.py because it needs the harness's LLaVA
classes and config reader, which the extract and strip baselines must not pay for.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..model.config import llava_config
from .naive import write_stats


def load_all_merge(adapter: str, base: str, out: str, dtype: str, stats: str) -> None:
    """LLaVA's own merge: the whole base loaded in `dtype`, the trainables copied in (their
    file through torch.load), `PeftModel.from_pretrained(...).merge_and_unload()`,
    `save_pretrained`; the work time to `stats`."""
    import torch  # heavy: torch; the child's, never the parent's

    start = time.perf_counter()
    # Imported after `start`, as before: loading peft and transformers is part of the work.
    from peft import PeftModel  # heavy: peft

    from ..model.llava import MODEL_CLASSES  # heavy: torch, transformers
    from ..ops.load import normalise_trainable_keys  # heavy: torch, transformers

    adapter = Path(adapter)
    arch, config = llava_config(adapter)
    model = MODEL_CLASSES[arch].from_pretrained(base, config=config, dtype=getattr(torch, dtype))
    state = model.state_dict()
    # LLaVA's own way: the whole file through torch.load (its own synthetic adapter, trusted).
    raw = torch.load(adapter / "non_lora_trainables.bin", map_location="cpu", weights_only=True)
    trainables = normalise_trainable_keys(dict(raw), set(state), adapter)
    with torch.no_grad():
        for key, value in trainables.items():
            state[key].copy_(value.to(state[key].dtype))
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    write_stats(stats, start)
