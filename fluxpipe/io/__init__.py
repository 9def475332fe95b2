"""Files: strict safetensors, model checkpoints, atomic writes, hashing, Parquet tables and cache shards."""
