"""Benchmarks: latency and memory against MobileNet baselines (`make bench`), the accuracy grid (`python -m benchmarks.accuracy`) and the validation-split tuner (`python -m benchmarks.tune`)."""
