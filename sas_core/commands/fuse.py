"""`sas fuse`: 2D-to-3D fusion of teacher features onto points (OpenScene rule)."""

from sas_core.commands import not_built

HELP = "2D-to-3D fusion of teacher features onto points (OpenScene rule)"


def add_arguments(parser):
    pass


run = not_built("fuse", "issue #3")
