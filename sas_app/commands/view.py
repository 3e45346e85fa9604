"""`sas view MAP` / `sas view --ros`: look at a labelled map in the browser and ask it questions.

Serves a local web viewer (``viser``; see :mod:`sas_app.viewer`) and prints its URL; works on a
headless server (open the URL through an SSH tunnel: ``ssh -L 8080:127.0.0.1:8080 host``).
``--screenshot out.png [--query TEXT]`` renders one image in headless Chromium and exits.
"""

from __future__ import annotations

HELP = "look at a labelled map in the browser and ask it questions (or a live node with --ros)"


def add_arguments(parser):
    from sas_app.commands import add_checkpoint_argument, add_inference_arguments, add_models_argument

    parser.add_argument("map", nargs="?", default=None,
                        help="a map folder (~/save_map, sas replay), a labelled PLY (sas segment), or a cloud "
                             "(.pth OpenScene, .ply, .npy, .npz; with --checkpoint for labels and queries)")
    parser.add_argument("--vocabulary", "--vocab", default=None,
                        help="class names of the labels: a named vocabulary (scannet20, ...), a file, or "
                             "\"chair,table\" (default: the map's own; for a cloud scannet20, as sas segment)")
    add_checkpoint_argument(parser, "--checkpoint",
                            help="distilled checkpoint or a name from the models file: its text encoder answers "
                                 "the queries (as sas query), and it computes features and labels of a cloud "
                                 "that has none (default: the models file's checkpoint)")
    parser.add_argument("--synthetic-text", action="store_true",
                        help="the map was built in the synthetic world (sas demo, mode fusion with the simulated "
                             "teacher): queries use its synthetic text space instead of a checkpoint's encoder")
    parser.add_argument("--trajectory", default=None,
                        help="camera trajectory to draw: a .npy (T, 4, 4) or a folder of 4x4 pose .txt files "
                             "(an OpenScene .pth finds its 2d/<scene>/pose by itself)")
    parser.add_argument("--device", default="cpu", help="torch device of the checkpoint")
    view = parser.add_argument_group("viewer")
    view.add_argument("--host", default="127.0.0.1",
                      help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                           "network)")
    view.add_argument("--port", type=int, default=8080, help="port (the next free one if taken; the URL says which)")
    view.add_argument("--max-points", type=int, default=1_000_000,
                      help="points drawn at most (a fixed random subset; change it in the GUI)")
    view.add_argument("--point-size", type=float, default=None, help="point size in metres (default: voxel size)")
    view.add_argument("--threshold", type=float, default=None,
                      help="initial relevance threshold (default: the node's query_threshold 0.5; --ros: 0 = "
                           "the node's default)")
    shot = parser.add_argument_group("screenshot (no person at the browser)")
    shot.add_argument("--screenshot", metavar="PNG", default=None,
                      help="render the viewer once in headless Chromium, save it as PNG and exit")
    shot.add_argument("--query", default=None, help="with --screenshot: run this query first")
    shot.add_argument("--color-by", default=None, choices=("rgb", "label", "score", "instance", "relevance"),
                      help="with --screenshot: colour mode (default: relevance with --query, else rgb)")
    shot.add_argument("--size", default="1280x800", help="with --screenshot: page size WxH in pixels")
    ros = parser.add_argument_group("live node (--ros)")
    ros.add_argument("--ros", action="store_true", help="attach to a running mapping node (~/labelled_cloud, "
                                                        "~/query, ~/set_vocabulary)")
    ros.add_argument("--node", default="/sas_mapping_node", help="the node's name")
    ros.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the node's cloud and services")
    add_models_argument(parser)
    add_inference_arguments(parser)


def _size(text: str):
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r}: give WIDTHxHEIGHT, e.g. 1280x800") from None
    if not (200 <= w <= 4096 and 200 <= h <= 4096):
        raise ValueError(f"--size {text}: width and height must be in 200..4096")
    return w, h


def offline_backend(args):
    """The :class:`sas_app.viewer.OfflineBackend` of parsed ``args`` (map, checkpoint, vocabulary)."""
    from pathlib import Path

    from sas_app.commands import apply_model_paths, inference_config
    from sas_app.viewer import OfflineBackend, load_view_scene
    from sas_core.text import parse_vocabulary

    path = Path(args.map)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (a map folder, a PLY or a point cloud file)")
    if not args.synthetic_text:
        apply_model_paths(args, {"checkpoint": "checkpoint"})
    vocabulary = parse_vocabulary(args.vocabulary) if args.vocabulary else None
    seg = None
    if args.checkpoint and not args.synthetic_text:
        from sas_core.infer import Segmenter

        seg = Segmenter.from_checkpoint(args.checkpoint, device=args.device, config=inference_config(args))
        if vocabulary is None and not path.is_dir():
            vocabulary = parse_vocabulary("scannet20")  # as sas segment
    scene = load_view_scene(path, segmenter=seg, vocabulary=vocabulary, trajectory=args.trajectory, progress=True)
    encoder = None if seg is None else seg.text_encoder
    if args.synthetic_text:
        from sas_core.text import SyntheticTextEncoder

        if scene.features is None:
            raise ValueError(f"{path} has no features: --synthetic-text queries a map saved with features")
        if not scene.class_names:
            raise ValueError(f"{path} has no vocabulary: give --vocabulary with --synthetic-text")
        encoder = SyntheticTextEncoder(scene.class_names, dim=int(scene.features.shape[1]))
        scene.synthetic = True
    elif seg is not None and (seg.checkpoint_config.get("text_encoder") or {}).get("kind") == "synthetic":
        scene.synthetic = True
    return OfflineBackend(scene, encoder)


def run(args) -> int:
    import sys
    import time

    from sas_app.viewer import Viewer, screenshot, start_server, stop_server

    if args.ros == bool(args.map):
        raise ValueError("give a MAP to view, or --ros to attach to a running node (not both)")
    if args.query and not args.screenshot:
        raise ValueError("--query goes with --screenshot (in the viewer, type the query in its text box)")
    if args.screenshot and not str(args.screenshot).lower().endswith(".png"):
        raise ValueError(f"--screenshot {args.screenshot}: give a .png file name")
    size = _size(args.size)
    if not 1 <= args.max_points <= 50_000_000:
        raise ValueError(f"--max-points {args.max_points} must be in 1..50000000")
    if args.screenshot:
        from sas_app.viewer import find_browser

        if find_browser() is None:
            raise FileNotFoundError("--screenshot needs Chromium: install Debian's chromium (`apt-get install "
                                    "chromium`; scripts/setup_env.sh does) or set SAS_CHROMIUM")
    client = None
    if args.ros:
        from sas_app.viewer import LiveBackend
        from sas_ros.live_view import LiveMapClient  # the application layer may import both sides

        client = LiveMapClient(args.node, timeout=args.timeout)
        if not client.wait_for_cloud(args.timeout):
            print(f"sas view: no {client.node_name}/labelled_cloud yet after {args.timeout:.0f} s; the viewer "
                  "shows it when it comes", file=sys.stderr)
        backend = LiveBackend(client, default_threshold=args.threshold or 0.0)
    else:
        backend = offline_backend(args)
    server = viewer = None
    try:
        server = start_server(args.host, args.port)
        viewer = Viewer(server, backend, max_points=args.max_points, point_size=args.point_size,
                        threshold=args.threshold)
        url = f"http://{args.host}:{server.get_port()}/"
        if args.screenshot:
            info = screenshot(server, viewer, args.screenshot, query=args.query, width=size[0], height=size[1],
                              color_by=args.color_by)
            view = viewer.query_view
            found = f"; {view.message}" if view is not None else ""
            print(f"{args.screenshot}: {size[0]}x{size[1]} screenshot of {len(viewer.scene or [])} points in "
                  f"{info['seconds']:.1f} s (headless Chromium){found}")
            return 0
        note = "" if args.host in ("127.0.0.1", "localhost", "::1") else " (open to the network: --host)"
        print(f"sas view: {url}{note}  ({len(viewer.scene) if viewer.scene is not None else 0} points; Ctrl-C to "
              "stop)", flush=True)
        if not backend.can_query:
            print(f"sas view: note: {backend.reason}", file=sys.stderr)
        while True:
            time.sleep(1.0)
    finally:
        if viewer is not None:
            viewer.close()
        if server is not None:
            stop_server(server)
        if client is not None:
            client.close()
