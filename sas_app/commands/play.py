"""`sas play`: publish a ROS 2 bag into a running graph with the bag's timing (no ``ros2 bag play``).

Messages go out as the bag stores them (CDR bytes, unchanged), each at its recorded time divided by
``--rate``; ``/tf_static`` is transient-local so a node started later still gets it. Before playing,
the command prints the remappings that connect ``./sas node`` to the bag's camera / LiDAR topics
(chosen as ``sas replay`` chooses them).

Examples::

    ./sas node --ros-args -r color/image_raw:=/camera/color/image_raw ...   # in one terminal
    sas play data/world/bags/synth_00000_mcap --rate 2                        # in another
    sas play robot.mcap --topics /tf /tf_static /camera/color/image_raw --loop
"""

from __future__ import annotations

import json
import sys

HELP = "publish a ROS 2 bag into a running node over rclpy, with the bag's timing (rate, loop)"


def add_arguments(parser):
    parser.add_argument("bag", help="bag folder or its .db3 / .mcap file")
    parser.add_argument("--rate", type=float, default=1.0, help="speed factor (2 = twice as fast; default 1)")
    parser.add_argument("--loop", action="store_true", help="start over after the last message (Ctrl-C stops)")
    parser.add_argument("--topics", nargs="+", metavar="TOPIC", help="play only these topics (default: all)")
    parser.add_argument("--remap", nargs="+", default=[], metavar="FROM:=TO",
                        help="publish a bag topic under another name, e.g. /camera/pose:=/robot/pose")
    parser.add_argument("--start", type=float, default=0.0, help="skip the first START seconds of the bag")
    parser.add_argument("--duration", type=float, default=None, help="play DURATION seconds of the bag")
    parser.add_argument("--clock", action="store_true", help="publish the bag time on /clock (use_sim_time nodes)")
    parser.add_argument("--wait-subscribers", type=float, default=5.0, metavar="S",
                        help="wait up to S seconds for the node to subscribe before playing "
                             "(default 5; 0 = start at once)")
    parser.add_argument("--qos-depth", type=int, default=10, help="publisher history depth (default 10)")
    parser.add_argument("--json", action="store_true", help="print what was published as JSON at the end")


def _remaps(words) -> dict:
    out = {}
    for w in words:
        src, sep, dst = w.partition(":=")
        if not sep or not src.startswith("/") or not dst.startswith("/"):
            raise ValueError(f"--remap {w!r}: give FROM:=TO with absolute topic names, e.g. /a/b:=/c/d")
        out[src] = dst
    return out


def run(args) -> int:
    from sas_core.data.bag_streams import bag_root

    bag_root(args.bag)  # a missing or wrong path is one line before any ROS start-up
    remaps = _remaps(args.remap)
    from sas_ros.player import play_bag_cli

    stats = play_bag_cli(args.bag, rate=args.rate, loop=args.loop, topics=args.topics, remaps=remaps,
                         start=args.start, duration=args.duration, clock=args.clock,
                         wait_subscribers=args.wait_subscribers, qos_depth=args.qos_depth,
                         log=lambda m: print(m, file=sys.stderr if args.json else sys.stdout))
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2))
    return 0
