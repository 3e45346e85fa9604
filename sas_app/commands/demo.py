"""`sas demo`: the whole SAS pipeline on the synthetic world (what `make demo` runs).

Generates synthetic rooms, runs two simulated teachers, builds capability tables from probe
renders, fuses multi-view features, distils a small MinkUNet three ways and evaluates every row
of the paper's Table 3 analogue twice: on the distillation rooms (the robot's own map,
transductive: no labels are used in training) and on held-out rooms. Writes a report folder (table as Markdown and
JSON, bar chart, top-down label render, query heat maps, the distilled checkpoint). Everything is
labelled synthetic.

Every :class:`sas_app.demo.DemoConfig` field is a flag. ``--quick`` applies the preset
``DEMO_PRESETS["quick"]`` (one small room, 3 epochs) before the flags given, so
``--quick --epochs 50`` trains 50 epochs on the quick world.
"""

from __future__ import annotations

HELP = "the whole SAS pipeline on the synthetic world"


def add_arguments(parser):
    from sas_core.config import add_config_arguments
    from sas_app.demo import DEMO_PRESETS, DemoConfig

    for name, values in DEMO_PRESETS.items():
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        parser.add_argument(f"--{name}", dest="preset", action="store_const", const=name, default=None,
                            help=f"preset: {shown} (flags given explicitly still win)")
    add_config_arguments(parser, DemoConfig, aliases={"frames": "--n-frames"}, off_aliases={"progress": "--quiet"})


def config(args):
    """The :class:`DemoConfig` of parsed ``args`` (preset first, then the flags given)."""
    from sas_core.config import config_from_args
    from sas_app.demo import DEMO_PRESETS, DemoConfig

    return config_from_args(DemoConfig, args, preset=DEMO_PRESETS.get(args.preset))


def run(args) -> int:
    from sas_app.demo import run_demo

    run_demo(config(args))
    return 0
