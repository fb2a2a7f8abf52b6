"""Probe modules (linear, SwiGLU, logistic regression), the batched trainer of frozen probes, unfrozen
training (resampler + probe), epoch checkpoints, and one probe run folder. Imports the stages before it (core to store).
"""


def __getattr__(name: str):
    # `probing.probes` was one module before the move; its names stay reachable for one release.
    from probing._moved import old_name_of_package

    return old_name_of_package(__name__, name)
