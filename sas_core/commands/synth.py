"""`sas synth`: generate the synthetic world."""

from sas_core.commands import not_built

HELP = "generate synthetic rooms (OpenScene layout and ROS 2 bags)"


def add_arguments(parser):
    pass


run = not_built("synth", "issue #2")
