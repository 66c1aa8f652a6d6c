"""The builder: spec -> a deterministic checkpoint folder shaped like a published LLaVA one."""
