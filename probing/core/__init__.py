"""What every stage may import, and which imports nothing else of `probing`: the one error type, settings
declared once, the one `Registry` type, atomic files and manifests (artifacts), locks, the safe YAML/JSON readers,
result records, plug-in loading and device placement.
"""
