"""`sas eval`: evaluate predicted labels (OpenScene protocol mIoU/mAcc)."""

from sas_core.commands import not_built

HELP = "evaluate predicted labels (OpenScene protocol mIoU/mAcc)"


def add_arguments(parser):
    pass


run = not_built("eval", "issue #6")
