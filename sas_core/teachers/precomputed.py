"""OpenScene's precomputed fused 2D features as a per-point teacher.

OpenScene publishes multi-view fused LSeg (512-d) and OpenSeg (768-d) features per scene:
``<root>/<scene>_<k>.pt`` (ScanNet/Matterport: k = 0..K-1 point chunks) or ``<root>/<scene>.pt``
(nuScenes), each ``{"feat": (M, C) float16, "mask_full": (N,) bool}``. Users with those files can
use them as teachers (alone, or in capability fusion with other teachers in the same text space:
LSeg features live in CLIP ViT-B/32's space, OpenSeg's in ViT-L/14@336's).
Files are read by :mod:`sas_core.data.fused_features`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

DOWNLOAD_HINT = ("download OpenScene's fused 2D features (OpenScene README, 'Download' section, e.g. "
                 "scannet_multiview_lseg / scannet_multiview_openseg) on a machine with internet access and "
                 "point the feature root at the extracted folder")


@dataclass
class PrecomputedConfig:
    """Configuration of :class:`PrecomputedTeacher`."""

    root: str = ""  # folder with <scene>_<k>.pt or <scene>.pt files
    name: str = "lseg"  # teacher name (capability tables)
    file_index: Optional[int] = None  # use only chunk file k (None: merge every file of the scene)
    dim: Optional[int] = None  # expected feature size (512 LSeg, 768 OpenSeg), checked when set


class PrecomputedTeacher:
    """Serves OpenScene fused features per scene (a :class:`~sas_core.teachers.base.PointTeacher`)."""

    def __init__(self, config: PrecomputedConfig):
        self.config = config
        self.name = config.name
        self.root = Path(config.root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"fused feature folder {str(self.root)!r} not found: {DOWNLOAD_HINT}")
        self._dim: Optional[int] = config.dim

    def files(self, scene: str) -> List[Path]:
        """Feature files of ``scene`` (``<scene>_<k>.pt`` by k, or ``<scene>.pt``)."""
        from sas_core.data.fused_features import fused_feature_paths

        paths = fused_feature_paths(self.root, scene)
        if not paths:
            raise FileNotFoundError(f"no fused features for scene {scene!r} in {str(self.root)!r} "
                                    f"(expected {scene}_0.pt or {scene}.pt): {DOWNLOAD_HINT}")
        return paths

    @property
    def dim(self) -> int:
        """Feature size C (read from the first file when not configured)."""
        if self._dim is None:
            from sas_core.data.fused_features import load_fused_features

            first = next(iter(sorted(self.root.glob("*.pt"))), None)
            if first is None:
                raise FileNotFoundError(f"no .pt files in {str(self.root)!r}: {DOWNLOAD_HINT}")
            self._dim = int(load_fused_features(first)[0].shape[1])
        return self._dim

    def point_features(self, scene: str, file_index: Optional[int] = None, n_points: Optional[int] = None):
        """(features (N, C) float16, zero where no feature; mask (N,) bool) of ``scene``.

        Args:
            scene: scene id (or its ``.pth`` path).
            file_index: only chunk file k (default: ``config.file_index``; None merges all files).
            n_points: the scene's point count, checked against the files.
        """
        from sas_core.data.fused_features import load_scene_features

        self.files(scene)  # one clear error when the scene is missing
        k = self.config.file_index if file_index is None else file_index
        fused = load_scene_features(self.root, scene, n_points=n_points, file=k, dim=self.config.dim)
        self._dim = int(fused.features.shape[1])
        return fused.features, fused.mask
