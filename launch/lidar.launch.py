"""SAS mapping node on a LiDAR (PointCloud2), poses from TF or an odometry topic.

    ros2 launch sas_ros lidar.launch.py checkpoint:=/path/to/sas_nuscenes.ckpt points:=/velodyne_points
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
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
        DeclareLaunchArgument("params_file", default_value=os.path.join(_config_dir(), "lidar.yaml"),
                              description="YAML parameters of the mapping node"),
        DeclareLaunchArgument("checkpoint", default_value="", description="distilled SAS checkpoint"),
        DeclareLaunchArgument("points", default_value="/lidar/points", description="PointCloud2 topic"),
        DeclareLaunchArgument("pose_topic", default_value="/odom",
                              description="Odometry / PoseStamped topic when TF is unavailable"),
        Node(
            package="sas_ros",
            executable="sas_mapping_node",
            name="sas_mapping_node",
            output="screen",
            parameters=[LaunchConfiguration("params_file"), {"checkpoint": LaunchConfiguration("checkpoint")}],
            remappings=[
                ("points", LaunchConfiguration("points")),
                ("pose", LaunchConfiguration("pose_topic")),
            ],
        ),
    ])
