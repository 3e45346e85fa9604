"""Replay a ROS 2 bag (e.g. one written by ``sas synth``) into the SAS mapping node.

    ros2 launch sas_ros bag_replay.launch.py bag:=synth_00000.bag checkpoint:=/path/to/sas.ckpt

Without ros2 bag (no ROS install), ``sas replay BAG`` runs the same pipeline offline.
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _config_dir():
    try:
        from ament_index_python.packages import get_package_share_directory

        return os.path.join(get_package_share_directory("sas_ros"), "config")
    except Exception:  # running from the source tree
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("bag", description="bag folder (sqlite3 or mcap)"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(_config_dir(), "bag_replay.yaml"),
                              description="YAML parameters of the mapping node"),
        DeclareLaunchArgument("checkpoint", default_value="", description="distilled SAS checkpoint"),
        DeclareLaunchArgument("rate", default_value="1.0", description="bag playback rate"),
        Node(
            package="sas_ros",
            executable="sas_mapping_node",
            name="sas_mapping_node",
            output="screen",
            parameters=[LaunchConfiguration("params_file"), {"checkpoint": LaunchConfiguration("checkpoint")}],
            remappings=[
                ("color/image_raw", "/camera/color/image_raw"),
                ("depth/image_raw", "/camera/depth/image_raw"),
                ("color/camera_info", "/camera/color/camera_info"),
                ("pose", "/camera/pose"),
                ("points", "/lidar/points"),
            ],
        ),
        ExecuteProcess(cmd=["ros2", "bag", "play", LaunchConfiguration("bag"), "--rate", LaunchConfiguration("rate")],
                       output="screen"),
    ])
