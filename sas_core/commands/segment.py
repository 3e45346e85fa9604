"""`sas segment`: label a point cloud with a distilled checkpoint."""

from sas_core.commands import not_built

HELP = "label a point cloud with a distilled checkpoint"


def add_arguments(parser):
    pass


run = not_built("segment", "issue #6")
