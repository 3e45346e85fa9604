"""`sas query`: relevance of free text over a point cloud (or a live node with --ros)."""

from sas_core.commands import not_built

HELP = "relevance of free text over a point cloud (or a live node with --ros)"


def add_arguments(parser):
    pass


run = not_built("query", "issue #6")
