"""probing: diagnostic probes of where vision-and-language resamplers keep spatial information."""

from probing.artifacts import code_version

__version__ = code_version()
