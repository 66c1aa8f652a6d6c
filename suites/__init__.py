"""The suites, a package so that they ship in the wheel as `harness.suites` and run from an
install with `pytest --pyargs harness.suites` (or `llava-harness run`)."""
