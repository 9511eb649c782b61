"""The names of the fedmerge protocol, shared by client and server: message types, records and their keys.

``train`` (server -> client): records :data:`ARRAYS` (global weights; empty when clients start from their own
initialisations) and :data:`CONFIG`; reply: :data:`ARRAYS`, :data:`METRICS` and, when asked
(:data:`WANT_STATS`), :data:`OWN_STATS` with :data:`FEDMERGE` echoing :data:`PROBE_DIGEST`.

:data:`QUERY_CROSS` (server -> client): records :data:`REFERENCE` (the reference weights) and :data:`CONFIG`;
reply: :data:`CROSS_STATS`, :data:`METRICS` and :data:`FEDMERGE` echoing :data:`REFERENCE_DIGEST`.
"""
from __future__ import annotations

__all__ = [
    "QUERY_CROSS", "ARRAYS", "CONFIG", "METRICS", "OWN_STATS", "CROSS_STATS", "REFERENCE", "FEDMERGE",
    "SERVER_ROUND", "PARTITION_ID", "NUM_PARTITIONS", "WANT_STATS", "PROBE_DIGEST", "PROBE_HELD_OUT", "PROBE_SEED",
    "REFERENCE_PARTITION", "REFERENCE_DIGEST", "NUM_EXAMPLES", "PROBE_ACCURACY", "SECONDS_STATS",
    "SECONDS_CROSS_STATS", "SECONDS_TRAIN",
]

# message types
QUERY_CROSS = "query.cross_stats"

# records of a message's RecordDict
ARRAYS = "arrays"            # model weights (ArrayRecord)
CONFIG = "config"            # the server's instructions (ConfigRecord)
METRICS = "metrics"          # what a client reports (MetricRecord)
OWN_STATS = "own-stats"      # a client's own probe statistics (ArrayRecord, common.wire.compress)
CROSS_STATS = "cross-stats"  # cross statistics against the reference (ArrayRecord)
REFERENCE = "reference"      # the reference weights of the cross-statistics query (ArrayRecord)
FEDMERGE = "fedmerge"        # what a client echoes (ConfigRecord: digests)

# config keys (server -> client)
SERVER_ROUND = "server-round"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
WANT_STATS = "want-stats"
PROBE_DIGEST = "probe-digest"
PROBE_HELD_OUT = "probe-held-out"
PROBE_SEED = "probe-seed"
REFERENCE_PARTITION = "reference-partition"
REFERENCE_DIGEST = "reference-digest"

# metric keys (client -> server); PARTITION_ID too
NUM_EXAMPLES = "num-examples"
PROBE_ACCURACY = "probe-accuracy"
SECONDS_STATS = "seconds-stats"
SECONDS_CROSS_STATS = "seconds-cross-stats"
SECONDS_TRAIN = "seconds-train"
