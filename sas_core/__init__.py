"""SAS core library: Segment Any 3D Scene with integrated 2D priors.

Pure Python/NumPy/PyTorch. Never imports ROS (``rclpy`` or any ``*_msgs``); a test enforces it.
Heavy dependencies (torch, open3d, open_clip, ...) are imported inside the functions that use
them, so ``import sas_core`` stays cheap.
"""

__version__ = "0.1.0"
