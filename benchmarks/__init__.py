"""Benchmarks (not tests): each experiment is a command writing JSON + a markdown table under results/."""

# Flower's own INFO lines are noise in a benchmark's output: fedmerge's progress lines (training, rounds, merges)
# and every warning stay; FEDMERGE_VERBOSE=1 shows everything.
from fedmerge.common.progress import quiet_flower as _quiet_flower

_quiet_flower()
