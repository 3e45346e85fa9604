"""`sas capability`: annotation-free capability tables for the 2D teachers."""

from sas_core.commands import not_built

HELP = "annotation-free capability tables for the 2D teachers"


def add_arguments(parser):
    pass


run = not_built("capability", "issue #4")
