"""`sas demo`: the whole SAS pipeline on the synthetic world (what `make demo` runs).

Generates synthetic rooms, runs two simulated teachers, builds capability tables from probe
renders, fuses multi-view features, distils a small MinkUNet three ways and evaluates every row
of the paper's Table 3 analogue twice: on the distillation rooms (the robot's own map,
transductive: no labels are used in training) and on held-out rooms. Writes a report folder (table as Markdown and
JSON, bar chart, top-down label render, query heat maps, the distilled checkpoint). Everything is
labelled synthetic.
"""

from __future__ import annotations

import dataclasses

HELP = "the whole SAS pipeline on the synthetic world"


def add_arguments(parser):
    from sas_app.commands.distill import add_config_arguments
    from sas_app.demo import DemoConfig

    add_config_arguments(parser, DemoConfig)


def run(args) -> int:
    from sas_app.demo import DemoConfig, run_demo

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig) if hasattr(args, f.name)}
    if "queries" in values:
        values["queries"] = tuple(values["queries"])
    run_demo(DemoConfig(**values))
    return 0
