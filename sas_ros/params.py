"""ROS parameters generated from config dataclasses (``sas_core.config``): each default exists once.

The mapping node declares one parameter per field of :class:`sas_core.mapping.MapperConfig` (the
pipeline, shared with `sas replay`), of :class:`sas_core.mapping.ServiceLimits` (the bounds of
every service request) and of :class:`NodeConfig` (ROS-only knobs: frames, topics, QoS, queues,
timers, map persistence), each with the field's help as its description::

    mapper_cfg = declare_config(node, MapperConfig)   # -> MapperConfig built from the parameters

This module imports no ROS package at import time (``rcl_interfaces`` is imported by
:func:`declare_config`), so tests and tools can list the parameters without rclpy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sas_core.config import config_fields, opt


@dataclass
class NodeConfig:
    """ROS-only settings of the mapping node (the pipeline's are in MapperConfig)."""

    map_frame: str = opt("map", "fixed frame of the map and of every output")
    marker_lifetime: float = opt(0.0, "seconds RViz keeps the ~/objects markers of a query (0 = until the next "
                                      "query replaces them)")
    use_rgbd: bool = opt(True, "subscribe to color/image_raw, depth/image_raw and camera_info")
    use_lidar: bool = opt(False, "subscribe to points (LiDAR PointCloud2)")
    pose_source: str = opt("auto", "auto | tf | pose | odometry (auto: the pose topic once it has spoken, "
                                   "TF until then)", choices=("auto", "tf", "pose", "odometry"))
    pose_topic: str = opt("pose", "PoseStamped / Odometry topic of the sensor pose (pose/odometry modes)")
    camera_frame: str = opt("camera_color_optical_frame",
                            "sensor frame the pose topic describes; images in other frames are dropped")
    lidar_pose_topic: str = opt("", "PoseStamped topic of the LiDAR pose (pose mode; empty = no LiDAR pose topic)")
    lidar_frame: str = opt("lidar", "LiDAR sensor frame id")
    pose_tolerance: float = opt(0.05, "max |stamp difference| in seconds between a frame and its pose")
    reliable_inputs: bool = opt(False, "lossless inputs (bag replay): reliable keep-all QoS, and a full queue "
                                       "(input_queue, teacher_queue) waits instead of dropping, which backs "
                                       "pressure up to the publisher; default: sensor-data best effort, keep-latest")
    sync_slop: float = opt(0.05, "approximate-sync window in seconds for colour/depth (and ground truth)")
    sync_queue: int = opt(10, "per-topic queue length of the synchroniser")
    input_queue: int = opt(4, "frames waiting for integration; the oldest is dropped beyond it")
    update_period: float = opt(1.0, "seconds between labelling passes (network / fusion classification)")
    publish_map_cloud: bool = opt(True, "also publish ~/map_cloud (x, y, z, rgb)")
    stats_period: float = opt(5.0, "seconds between ~/stats messages and the rate log line")
    log_throttle: float = opt(2.0, "seconds between repeated warnings of the same kind")
    models_file: str = opt("", "models file (config/models.yaml layout; empty: $SAS_MODELS / $SAS_MODELS_DIR); "
                               "its 'checkpoint' is used when the 'checkpoint' parameter is empty")
    # map persistence: every file the node writes is under map_dir
    map_dir: str = opt("~/.local/share/sas_ros/maps", "folder of saved maps: ~/save_map, ~/load_map, map_file and "
                                                      "autosave names are relative to it, writes never leave it")
    map_file: str = opt("", "map (a name under map_dir) loaded at start and written by autosave; empty = none "
                            "(autosave then writes 'autosave')")
    autosave_period: float = opt(0.0, "seconds between automatic atomic saves of a changed map, and one save on "
                                      "shutdown (0 = off)")
    # ---- live inputs on a robot: TF, compressed colour, teacher worker (issue 13)
    tf_backend: str = opt("auto", "TF for pose_source tf/auto: tf2_ros (a full ROS install), sas (the node reads "
                                  "/tf + /tf_static into sas_core's TransformBuffer) or auto (tf2_ros when "
                                  "importable)", choices=("auto", "tf2_ros", "sas"))
    tf_cache_time: float = opt(10.0, "seconds of /tf history kept (tf_backend sas; tf2's default 10)")
    pose_wait: float = opt(0.5, "seconds a frame waits for its pose / transform (frames often come before TF); "
                                "then it is dropped and counted by reason")
    reliable_pose_wait: float = opt(5.0, "with reliable_inputs: seconds a frame waits for its pose instead of "
                                         "pose_wait (lossless replay: a reliable sample lost on the way is resent "
                                         "at the writer's next heartbeat, every 3 s in Fast DDS)")
    color_transport: str = opt("raw", "colour input: raw (color/image_raw, sensor_msgs/Image) or compressed "
                                      "(<color/image_raw>/compressed, sensor_msgs/CompressedImage, jpeg / png)",
                               choices=("raw", "compressed"))
    teacher_queue: int = opt(1, "fusion mode: teacher frames waiting for the teacher worker; beyond it the "
                                "oldest is skipped (counted), or with reliable_inputs the integration waits")


def node_config_classes() -> tuple:
    """The dataclasses whose fields are the mapping node's parameters, in declaration order."""
    from sas_core.mapping import MapperConfig, ServiceLimits

    return (MapperConfig, ServiceLimits, NodeConfig)


def parameter_fields() -> dict:
    """``{name: ConfigField}`` of every mapping-node parameter (no rclpy needed)."""
    out = {}
    for cls in node_config_classes():
        for f in config_fields(cls, target="ros"):
            if f.name in out:
                raise ValueError(f"parameter {f.name!r} is declared by two config classes")
            out[f.name] = f
    return out


def _coerce(name: str, value, default, choices):
    """The parameter value as the field's type (ints are accepted for floats), else ValueError."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"parameter {name!r} must be a {kind.__name__} (default {default!r}), "
                         f"got {type(value).__name__} {value!r}")
    if choices and value not in choices:
        raise ValueError(f"parameter {name!r} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def declare_config(node, cls):
    """Declare one ROS parameter per documented field of dataclass ``cls`` (default and help from
    the field; ``ParameterDescriptor.description`` = the help, plus the choices) and return a
    ``cls`` instance built from the parameters' values (overrides, YAML, ``-p name:=value``).

    Integers are accepted where the field is a float (``-p max_radius:=40``). Raises ValueError
    with one clear line for a value of the wrong type or outside the choices.
    """
    from rcl_interfaces.msg import ParameterDescriptor

    values = {}
    for f in config_fields(cls, target="ros"):
        if f.default is dataclasses.MISSING or f.default is None:
            raise ValueError(f"{cls.__name__}.{f.name} has no default: cannot be a ROS parameter")
        text = f.help + (f" (one of: {', '.join(map(str, f.choices))})" if f.choices else "")
        node.declare_parameter(f.name, f.default, ParameterDescriptor(description=text, dynamic_typing=True))
        values[f.name] = _coerce(f.name, node.get_parameter(f.name).value, f.default, f.choices)
    return cls(**values)


def parameters_help() -> str:
    """``sas_mapping_node --help``: every parameter with its default and help, from the same config
    dataclasses the node declares them from."""
    import textwrap

    lines = ["usage: sas_mapping_node [--ros-args -p NAME:=VALUE ... | --params-file FILE]",
             "", "The SAS-ROS mapping node. Parameters (defaults; config/rgbd.yaml lists them all):", ""]
    for cls in node_config_classes():
        lines.append(f"{cls.__name__}:")
        for f in config_fields(cls, target="ros"):
            choices = f" (one of: {', '.join(map(str, f.choices))})" if f.choices else ""
            default = "" if f.default is None else f.default
            lines.append(f"  {f.name} = {default!r}")
            lines += textwrap.wrap(f"{f.help}{choices}", width=96, initial_indent="      ",
                                   subsequent_indent="      ")
        lines.append("")
    lines.append("Topics, services and examples: README.md (ROS interface).")
    return "\n".join(lines)
