"""What the probes are compared with: the models' own zero-shot answers and human annotation
(server, page and scoring). Imports the stages before it (and, as a listed exception, the report's bootstrap).
"""
