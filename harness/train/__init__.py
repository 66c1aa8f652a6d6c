"""Training in miniature, the LLaVA way: synthetic image-text samples in LLaVA's conversation
formats (data), a small AdamW + cosine loop (loop), and stage-1 feature alignment with its
freezing, saving and checks (stage1)."""
