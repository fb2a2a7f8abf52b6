"""`probing run`: experiment configs (YAML, `include:`, `--set`), the pipeline that drives every stage and
the report from one config, and the demo.
"""
