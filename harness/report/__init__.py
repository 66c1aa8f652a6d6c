"""What a run leaves behind, and what a reader acts on.

results.py: the one record schema (JSON, lossless round trip); sample.py: repeated
measurements and their statistics; environment.py: the fingerprint every record carries (GPU
facts from nvml.py); single.py: one run as report.md and results.csv; compare.py: several runs
side by side, chart.py: their chart; gate.py: a run checked against a baseline; collector.py:
the plugin's recorder. Nothing is imported here, so `harness.report.environment` stays light
for the command line.
"""
