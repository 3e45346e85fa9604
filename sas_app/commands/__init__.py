"""Subcommands of the ``sas`` CLI (see ``sas_app/cli.py``)."""


def not_built(name: str, issue: str):
    """A ``run`` for a subcommand that is not implemented yet: says so and exits non-zero."""

    def run(args) -> int:
        import sys

        print(f"sas {name}: not built yet ({issue}).", file=sys.stderr)
        return 3

    return run


def add_precision_argument(parser) -> None:
    """``--precision`` of the commands that run the distilled network (InferenceConfig.precision)."""
    from sas_core.infer import PRECISIONS  # NumPy only: building the parser stays light

    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="network arithmetic: fp32 (default); bf16 on CPU (about 1.6x faster where the "
                             "CPU has AVX512-BF16 or AMX) or CUDA; fp16 on CUDA")
