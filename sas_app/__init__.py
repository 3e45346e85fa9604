"""SAS-ROS application layer: the ``sas`` command, its subcommands, the demo and the benchmarks.

The only package that may import both sides of the house: the ROS-free library ``sas_core``
and the ROS 2 nodes ``sas_ros`` (which themselves import only ``sas_core``). Everything here is
orchestration; algorithms live in ``sas_core``.
"""
