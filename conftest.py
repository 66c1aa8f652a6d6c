"""Repository-only pytest settings: a plain `pytest` at the top of the checkout collects the
suites and nothing of the generated or data folders. The suites' own settings travel with them
(suites/conftest.py, suites/pytest.ini); the fixtures and options live in the installed plugin
(harness/plugin.py, registered through the pytest11 entry point)."""

collect_ignore = ["reports", "fixtures", ".ci-cache", ".venv"]
