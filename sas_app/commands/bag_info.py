"""`sas bag-info BAG`: what a bag holds and what `sas replay` would do with it.

Lists every topic (type, count, rate from log times, the first message's frame id, encoding and
size), the TF tree of ``/tf`` + ``/tf_static`` (each frame's parent, static or dynamic, samples
and rate) and the streams replay would use with the reason for each choice (the same stream
flags as `sas replay` apply, so a choice can be tried before a replay). ``--json`` prints one
JSON object (numbers as numbers).
"""

from __future__ import annotations

HELP = "describe a ROS 2 bag: topics, rates, frame ids, the TF tree and the streams `sas replay` would use"


def add_arguments(parser):
    from sas_app.commands.replay import add_stream_arguments

    parser.add_argument("bag", help="bag folder, or its .db3 / .mcap file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_stream_arguments(parser)


def describe(bag, options) -> dict:
    """The bag-info report as plain data."""
    from sas_core.data.bag_streams import (ReplayStats, StreamError, choose_streams, index_bag, load_tf,
                                           open_reader, typestore)

    index = index_bag(bag, rates=True)
    store = typestore()
    stats = ReplayStats()
    reader = open_reader(bag)
    try:
        tf = load_tf(reader, store, stats=stats)
        try:
            # an Odometry --pose-topic replaces TF edges: choose_streams then reads TF itself
            own_tf = None if options.pose_topic else tf
            choice, _ = choose_streams(reader, store, index, options, stats, tf=own_tf)
            replay = choice.as_dict()
        except StreamError as exc:
            replay = {"error": str(exc)}
    finally:
        reader.close()
    topics = []
    for name, t in sorted(index.topics.items()):
        topics.append({"topic": name, "type": t.msgtype, "count": t.count, "rate_hz": round(t.rate_hz, 3),
                       "frame_id": t.frame_id, "encoding": t.encoding,
                       "size": list(t.size) if t.size else None, "depth": t.is_depth})
    frames = {}
    for child, f in tf.buffer.frames().items():
        frames[child] = {"parent": f["parent"], "static": bool(f["static"]), "count": int(f["count"]),
                         "rate_hz": None if f["rate_hz"] is None else round(float(f["rate_hz"]), 3),
                         "root": tf.root_of(child)}
    return {"bag": str(bag), "duration_s": round(index.end - index.start, 6), "start": index.start,
            "messages": sum(t.count for t in index.topics.values()), "topics": topics, "tf": frames,
            "replay": replay, "problems": stats.as_dict()["problems"]}


def _tree_lines(frames: dict) -> list:
    children = {}
    for child, f in frames.items():
        children.setdefault(f["parent"], []).append(child)
    roots = sorted({f["parent"] for f in frames.values()} - set(frames))
    lines, seen = [], set()

    def walk(frame, depth):
        for child in sorted(children.get(frame, [])):
            if child in seen:
                lines.append("  " * (depth + 1) + f"{child} (loop)")
                continue
            seen.add(child)
            f = frames[child]
            kind = "static" if f["static"] else f"dynamic, {f['count']} samples, {f['rate_hz'] or 0:.1f} Hz"
            lines.append("  " * (depth + 1) + f"{child}  [{kind}]")
            walk(child, depth + 1)

    for root in roots:
        lines.append(f"  {root}")
        walk(root, 1)
    loops = sorted(set(frames) - seen)
    if loops:
        lines.append("  in a loop (no root): " + ", ".join(loops))
    return lines


def run(args) -> int:
    import json

    from sas_app.commands.replay import stream_options

    report = describe(args.bag, stream_options(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"bag {report['bag']}: {report['messages']} messages over {report['duration_s']:.2f} s")
    print("topics:")
    width = max((len(t["topic"]) for t in report["topics"]), default=10)
    for t in report["topics"]:
        extra = []
        if t["frame_id"] is not None:
            extra.append(f"frame {t['frame_id']!r}")
        if t["encoding"]:
            extra.append(t["encoding"])
        if t["size"]:
            extra.append(f"{t['size'][1]}x{t['size'][0]}")
        print(f"  {t['topic']:<{width}}  {t['type']:<34} {t['count']:>6} msgs {t['rate_hz']:>8.2f} Hz  "
              + ", ".join(extra))
    print("TF tree (/tf + /tf_static):" if report["tf"] else "TF tree: none (no /tf or /tf_static)")
    for line in _tree_lines(report["tf"]):
        print(line)
    replay = report["replay"]
    print("sas replay would use:")
    if "error" in replay:
        print(f"  nothing: {replay['error']}")
    else:
        for key in ("color", "depth", "color_info", "depth_info", "lidar", "camera_pose", "lidar_pose"):
            if replay.get(key):
                why = replay["reasons"].get(key, "")
                print(f"  {key:<11} {replay[key]}" + (f"  ({why})" if why else ""))
        if replay.get("register_depth"):
            print(f"  depth registration: {replay['reasons'].get('register_depth')}")
    for p in report["problems"][:10]:
        print(f"  problem: {p['topic']} #{p['index']}: {p['reason']}: {p['message']}")
    return 0
