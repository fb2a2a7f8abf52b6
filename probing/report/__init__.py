"""Analysis (categories, Kendall's tau, bootstrap, paired tests), the report's tables (Markdown, LaTeX,
results.csv), figures and the README's generated blocks. It reads the folders the stages wrote.
"""


def __getattr__(name: str):
    # `probing.report` was one module before the move; its names stay reachable for one release.
    from probing._moved import old_name_of_package

    return old_name_of_package(__name__, name)
