"""ROS 2 nodes around ``sas_core``: conversions, synchronisation, pose sources, the mapping
node and a query client. Thin glue: all computation lives in ``sas_core``."""
