"""Benchmarks (not tests): each experiment is a command writing JSON + a markdown table under results/."""
