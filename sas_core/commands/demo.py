"""`sas demo`: the whole SAS pipeline on the synthetic world."""

from sas_core.commands import not_built

HELP = "the whole SAS pipeline on the synthetic world"


def add_arguments(parser):
    pass


run = not_built("demo", "issue #6")
