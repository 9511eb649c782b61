"""What travels between clients and server: array records and their checked decoding (records), compressed
statistics (compress) and the probe batches with their digest (probe)."""
