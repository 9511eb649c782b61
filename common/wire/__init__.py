"""What travels between clients and server: the protocol's names (keys), array records and their checked decoding
(records), the one statistics codec (compress) and the probe batches with their digest (probe)."""
