"""The data layer: the shard format, download, tokenization, the synthetic language, the loader."""
