"""The feature store on disk (sharded safetensors with checksums) and extraction, which
fills it from a resampler. Imports `core`, `data`, `models`, `tasks`.
"""
