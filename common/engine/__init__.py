"""The merging engine: the model graph (graph), probe statistics (stats), the matching methods (matching,
baselines, gcca), applying an alignment (align), the merge itself (merge) and NP Merge (npmerge)."""
