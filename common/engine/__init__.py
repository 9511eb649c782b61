"""The merging engine: the model graph (graph, graph_ops), probe statistics (stats), the matching methods (registered
in methods; matching, ot, zipit, weight_matching, gcca), the shared numerics (linalg), applying an alignment
(align), REPAIR and BatchNorm reset (repair), choices on the held-out slice (selection), the merge itself (merge)
and the learned refinements after it (refine: NP Merge in npmerge, distillation into the ensemble in distill)."""
