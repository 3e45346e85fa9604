"""Subcommands of the ``sas`` CLI (see ``sas_core/cli.py``)."""


def not_built(name: str, issue: str):
    """A ``run`` for a subcommand that is not implemented yet: says so and exits non-zero."""

    def run(args) -> int:
        import sys

        print(f"sas {name}: not built yet ({issue}).", file=sys.stderr)
        return 3

    return run
