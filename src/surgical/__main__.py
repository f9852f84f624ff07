"""``python -m surgical`` runs the command-line tool."""

from surgical.cli import main

main()
