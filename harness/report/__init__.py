"""What a run leaves behind, and what a reader acts on.

results.py: the one record schema (JSON, lossless round trip); environment.py: the fingerprint
every record carries; single.py: one run as report.md and results.csv; compare.py: several runs
side by side; gate.py: a run checked against a baseline; collector.py: the plugin's recorder.
Nothing is imported here, so `harness.report.environment` stays light for the command line.
"""
