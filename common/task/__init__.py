"""The ML task every party rebuilds from one config: data sets and splits, architectures, checkpoints, the
config (config) and the model / partitions / probe / test set derived from it (loaders)."""
