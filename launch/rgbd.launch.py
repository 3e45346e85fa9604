"""SAS mapping node on an RGB-D camera (e.g. RealSense / Azure Kinect driver topics).

    ros2 launch sas_ros rgbd.launch.py checkpoint:=/path/to/sas.ckpt camera:=/camera
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node


def _config_dir():
    try:
        from ament_index_python.packages import get_package_share_directory

        return os.path.join(get_package_share_directory("sas_ros"), "config")
    except Exception:  # running from the source tree
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")


def generate_launch_description():
    camera = LaunchConfiguration("camera")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(_config_dir(), "rgbd.yaml"),
                              description="YAML parameters of the mapping node"),
        DeclareLaunchArgument("checkpoint", default_value="", description="distilled SAS checkpoint"),
        DeclareLaunchArgument("camera", default_value="/camera", description="namespace of the camera driver"),
        DeclareLaunchArgument("pose_topic", default_value="/camera/pose",
                              description="PoseStamped of the optical frame (when TF is unavailable)"),
        Node(
            package="sas_ros",
            executable="sas_mapping_node",
            name="sas_mapping_node",
            output="screen",
            parameters=[LaunchConfiguration("params_file"), {"checkpoint": LaunchConfiguration("checkpoint")}],
            remappings=[
                ("color/image_raw", PathJoinSubstitution([camera, "color/image_raw"])),
                ("depth/image_raw", PathJoinSubstitution([camera, "aligned_depth_to_color/image_raw"])),
                ("color/camera_info", PathJoinSubstitution([camera, "color/camera_info"])),
                ("pose", LaunchConfiguration("pose_topic")),
            ],
        ),
    ])
