"""`sas replay`: run the pipeline over a ROS 2 bag without a ROS runtime."""

from sas_core.commands import not_built

HELP = "run the pipeline over a ROS 2 bag without a ROS runtime"


def add_arguments(parser):
    pass


run = not_built("replay", "issue #7")
