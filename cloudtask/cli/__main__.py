"""`python -m cloudtask.cli` runs the `cloudtask` command, as `python -m cloudtask` does."""

from . import main

main()
