"""`sas models`: the configured local models, whether each file exists and loads, what to get.

Reads the models file (``--models FILE``, else ``$SAS_MODELS``, else ``$SAS_MODELS_DIR``; see
docs/models.md) and checks every entry: present files are loaded strictly into a randomly
initialised model of the architecture they claim (open_clip, segment-anything, SAS-ROS
checkpoints; Stable Diffusion folders are checked for their layout and configs), so a wrong
architecture or a truncated download shows here and not in the middle of a run. Missing ones get
one line saying what to download and where to put it.

Exit status: 0 when every configured entry is present and loads, 1 otherwise (unset entries do
not count).
"""

from __future__ import annotations

from sas_app.commands import add_models_argument

HELP = "list the configured local models: present? loads? what to download where"


def add_arguments(parser):
    add_models_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-load", action="store_true", help="only check that the files exist (fast)")
    parser.add_argument("--all", action="store_true", help="also list the entries that are not set, with hints")


def run(args) -> int:
    import json

    from sas_core.models import check_model_paths, load_model_paths

    paths = load_model_paths(args.models)
    statuses = check_model_paths(paths, load=not args.no_load)
    configured = [s for s in statuses if s.path is not None]
    failed = [s for s in configured if not s.ok]
    if args.json:
        print(json.dumps({"source": paths.source, "models": [s.to_dict() for s in statuses],
                          "ok": not failed}, indent=2, sort_keys=True))
        return 1 if failed else 0
    print(f"models file: {paths.source or 'none (--models FILE, $SAS_MODELS or $SAS_MODELS_DIR)'}")
    shown = statuses if (args.all or not configured) else configured
    width = max(len(s.key) for s in shown)
    for s in shown:
        if s.path is None:
            state = "not set"
        elif not s.exists:
            state = "MISSING"
        elif s.loads is None:
            state = "present"
        else:
            state = "loads" if s.loads else "DOES NOT LOAD"
        print(f"  {s.key:<{width}}  {state:<13}  {s.kind}" + (f"  {s.path}" if s.path else ""))
        if s.detail and s.detail != "missing":
            detail = s.detail if len(s.detail) <= 300 else s.detail[:297] + "..."
            print(f"  {'':<{width}}  {'':<13}  {detail}")
        if s.hint and (s.path is not None or args.all or not configured):
            print(f"  {'':<{width}}  {'':<13}  -> {s.hint}")
    unset = len(statuses) - len(configured)
    if unset and not (args.all or not configured):
        print(f"({unset} more entries not set: --all lists them with what to download)")
    if failed:
        print(f"{len(failed)} of {len(configured)} configured model(s) missing or not loading")
    return 1 if failed else 0
