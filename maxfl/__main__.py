"""`python -m maxfl` is the `maxfl` command (launcher.cli); nothing in the ground floor imports this module."""

from launcher.cli import main

main()
