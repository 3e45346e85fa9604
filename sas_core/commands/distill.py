"""`sas distill`: distil fused 2D features into a sparse 3D network."""

from sas_core.commands import not_built

HELP = "distil fused 2D features into a sparse 3D network"


def add_arguments(parser):
    pass


run = not_built("distill", "issue #6")
