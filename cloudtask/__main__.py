"""`python -m cloudtask` runs the `cloudtask` command."""

from .cli import main

main()
