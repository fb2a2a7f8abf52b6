"""`python -m probing ...` (and `accelerate launch -m probing ...`) runs the same CLI as the console script."""

from probing.cli.app import main

main()
