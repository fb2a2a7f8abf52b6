"""The command line: thin typer commands over the stages' functions. Heavy libraries are
imported inside the commands, so `probing --help` stays fast.
"""


def __getattr__(name: str):
    # `probing.cli` was one module before the move; its names stay reachable for one release.
    from probing._moved import old_name_of_package

    return old_name_of_package(__name__, name)
