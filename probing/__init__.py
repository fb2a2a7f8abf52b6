"""probing: diagnostic probes of where vision-and-language resamplers keep spatial information."""

from probing.core.artifacts import code_version

__version__ = code_version()

from probing import _moved  # noqa: E402

_moved.install()
