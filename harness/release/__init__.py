"""Releases: a manifest of artifacts and how each was made from the others, each relation
proved tensor by tensor (`llava-harness verify-release`, `pytest --llava-release`)."""
