"""Inference facade: a distilled 3D checkpoint in, per-point features, labels and relevance out.

In the spirit of segment-anything's ``SamPredictor``: NumPy point clouds in, NumPy labels and
scores out (features are a torch tensor, so they can stay on the GPU)::

    seg = Segmenter.from_checkpoint("model.pth")
    feats = seg.features(points)                     # (N, C) float16, L2-normalised
    seg.set_vocabulary(get_vocabulary("scannet20"))  # prompts "a {} in a scene"
    labels, scores = seg.classify(feats)             # (N,) int64, (N,) float32
    rel = seg.relevance(feats, "a soft place to sit")  # (N,) float32 cosine in [-1, 1]

Checkpoints are written by :func:`sas_core.nn.save_checkpoint`; their JSON config must give
``voxel_size`` (metres; default 0.02) and ``text_encoder`` (a text encoder's ``.config()`` dict,
rebuilt with :func:`sas_core.text.text_encoder_from_config`), and may give ``input_color``
(network input is RGB in [-1, 1] instead of all ones). Keys are also looked up under ``data``
and ``model`` sub-dicts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from sas_core.config import opt
from sas_core.types import PointCloud

__all__ = ["InferenceConfig", "PRECISIONS", "Segmenter", "ensemble_features", "load_point_cloud"]


#: Choices of :attr:`InferenceConfig.precision`.
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class InferenceConfig:
    """How :class:`Segmenter` runs the network."""

    voxel_size: float = opt(0.02, "metres per voxel (2 cm indoor, 5 cm outdoor)")
    max_voxels: int = opt(400_000, "voxels per network pass; larger scenes are cut into x-y tiles")
    chunk_margin: int = opt(48, "tile overlap in voxels (context on each side, outputs discarded)")
    point_chunk: int = opt(262_144, "points per matrix product in classify / relevance")
    input_color: bool = opt(False, "network input: RGB in [-1, 1] (True) or all ones (False, SAS/OpenScene)")
    fp16_matmul_on_cpu: bool = opt(False, "CPU half matmuls are slow; compute scores in float32 there")
    precision: str = opt("fp32", "network arithmetic: fp32, bf16 (CPU or CUDA) or fp16 (CUDA)", choices=PRECISIONS)


def _find(config: dict, key: str, default=None):
    for scope in (config, config.get("data") or {}, config.get("model") or {}, config.get("inference") or {}):
        if isinstance(scope, dict) and key in scope:
            return scope[key]
    return default


class Segmenter:
    """Open-vocabulary 3D segmentation with a distilled sparse U-Net.

    Args:
        model: a MinkUNet (``forward(SparseTensor) -> SparseTensor`` with C output channels).
        voxel_size: metres per voxel the model was trained with.
        text_encoder: a :class:`sas_core.text.TextEncoder` of the space the features live in
            (None: only :meth:`features` works until one is given).
        config: an :class:`InferenceConfig` (its ``voxel_size`` is replaced by ``voxel_size``).
        device: torch device for the network.
    """

    def __init__(self, model, voxel_size: float = 0.02, text_encoder=None, config: Optional[InferenceConfig] = None,
                 device: str = "cpu"):
        import torch

        if not voxel_size > 0:
            raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
        self.config = InferenceConfig(**{**(config.__dict__ if config else {}), "voxel_size": float(voxel_size)})
        self.device = torch.device(device)
        if self.config.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.config.precision!r}")
        if self.config.precision == "fp16" and self.device.type == "cpu":
            raise ValueError("precision fp16 runs on CUDA only; on CPU use bf16 (fast on CPUs with "
                             "AVX512-BF16 or AMX) or fp32")
        self.model = model.to(self.device).eval()
        self._bf16_model = None  # CPU bf16 copy of the model, made on first use
        self.text_encoder = text_encoder
        self.class_names: Tuple[str, ...] = ()
        self.text_embeddings = None  # (K, C) float32 on device
        self.checkpoint_config: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", text_encoder=None,
                        config: Optional[InferenceConfig] = None) -> "Segmenter":
        """Load a checkpoint written by :func:`sas_core.nn.save_checkpoint`.

        Args:
            path: checkpoint file.
            device: torch device.
            text_encoder: overrides the text encoder stored in the checkpoint config.
            config: inference settings (voxel size and input mode come from the checkpoint).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is corrupt, not a SAS-ROS checkpoint, or its text encoder config is bad.
        """
        from sas_core.nn import load_checkpoint
        from sas_core.text import text_encoder_from_config

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found (train one with `sas distill`, or give the path "
                                    "of a distilled SAS-ROS checkpoint)")
        model, ckpt_config, _ = load_checkpoint(path, map_location="cpu")
        ckpt_config = dict(ckpt_config or {})
        if text_encoder is None:
            te_config = _find(ckpt_config, "text_encoder")
            if te_config is not None:
                try:
                    text_encoder = text_encoder_from_config(te_config, device=device)
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}: cannot rebuild the text encoder from its config: {e}") from e
        cfg = InferenceConfig(**(config.__dict__ if config else {}))
        cfg.input_color = bool(_find(ckpt_config, "input_color", cfg.input_color))
        voxel_size = float(_find(ckpt_config, "voxel_size", cfg.voxel_size))
        seg = cls(model, voxel_size=voxel_size, text_encoder=text_encoder, config=cfg, device=device)
        seg.checkpoint_config = ckpt_config
        return seg

    # ------------------------------------------------------------------ features
    @property
    def dim(self) -> int:
        """Feature size C."""
        return int(self.model.out_channels)

    def features(self, positions, colors=None, progress: bool = False):
        """Per-point features of a point cloud.

        Args:
            positions: (N, 3) float coordinates in metres (NumPy or torch).
            colors: optional (N, 3) float RGB in [0, 1]; needed only for ``input_color`` models.
            progress: show a progress bar over tiles.

        Returns:
            (N, C) torch.float16 on the segmenter's device, rows L2-normalised (every point gets
            the feature of its voxel).
        """
        import torch

        from sas_core.geometry.voxelize import voxelize

        pos = positions.detach().cpu().numpy() if isinstance(positions, torch.Tensor) else np.asarray(positions)
        if pos.ndim != 2 or pos.shape[1] != 3:
            raise ValueError(f"positions must be (N, 3), got {pos.shape}")
        if len(pos) == 0:
            raise ValueError("cannot segment an empty point cloud")
        coords, inverse, first = voxelize(pos, self.config.voxel_size)
        in_ch = int(getattr(self.model, "in_channels", 3))
        if self.config.input_color:
            if colors is None:
                raise ValueError("this model takes colours as input; pass colors (N, 3) in [0, 1]")
            colors = np.asarray(colors, dtype=np.float32)
            if colors.shape != pos.shape:
                raise ValueError(f"colors are {colors.shape}, positions are {pos.shape}")
            feats_in = colors[first] * 2.0 - 1.0
            if in_ch != 3:
                raise ValueError(f"input_color needs a 3-channel model, this one takes {in_ch}")
        else:
            feats_in = np.ones((len(coords), in_ch), dtype=np.float32)
        voxel_feats = self._run_tiled(coords, feats_in, progress)                 # (M, C) float32
        out = torch.nn.functional.normalize(voxel_feats, dim=1).half()
        return out[torch.from_numpy(inverse).to(out.device)]

    def _run_tiled(self, coords: np.ndarray, feats_in: np.ndarray, progress: bool):
        """Network outputs (M, C) float32 for voxel ``coords`` (M, 3), tiling big scenes in x-y."""
        import torch

        m = len(coords)
        cfg = self.config
        if m <= cfg.max_voxels:
            return self._forward(coords, feats_in)
        lo, hi = coords.min(0), coords.max(0)
        n_tiles = int(np.ceil(m / (0.5 * cfg.max_voxels)))
        extent = (hi - lo + 1)[:2].astype(np.float64)
        nx = max(1, int(round(np.sqrt(n_tiles * extent[0] / extent[1]))))
        ny = max(1, int(np.ceil(n_tiles / nx)))
        size = np.ceil(extent / [nx, ny]).astype(np.int64)
        tile = ((coords[:, :2] - lo[:2]) // size).astype(np.int64)
        out = torch.empty((m, self.dim), dtype=torch.float32, device=self.device)
        tiles = [(i, j) for i in range(nx) for j in range(ny)]
        if progress:
            from tqdm import tqdm

            tiles = tqdm(tiles, desc="tiles", unit="tile")
        margin = cfg.chunk_margin
        for i, j in tiles:
            core = (tile[:, 0] == i) & (tile[:, 1] == j)
            if not core.any():
                continue
            tlo = lo[:2] + np.array([i, j]) * size - margin
            thi = lo[:2] + (np.array([i, j]) + 1) * size - 1 + margin
            sel = np.all((coords[:, :2] >= tlo) & (coords[:, :2] <= thi), axis=1)
            idx = np.nonzero(sel)[0]
            res = self._forward(coords[idx], feats_in[idx])
            keep = core[idx]
            out[torch.from_numpy(idx[keep]).to(self.device)] = res[torch.from_numpy(np.nonzero(keep)[0]).to(self.device)]
        return out

    def _forward(self, coords: np.ndarray, feats_in: np.ndarray):
        import torch

        from sas_core.nn import SparseTensor

        c = np.concatenate([np.zeros((len(coords), 1), np.int32), coords.astype(np.int32)], axis=1)
        with torch.inference_mode():
            x = SparseTensor(torch.from_numpy(np.ascontiguousarray(feats_in)).to(self.device),
                             torch.from_numpy(c).to(self.device))
            precision = self.config.precision
            if precision == "fp32":
                y = self.model(x)
            elif self.device.type == "cpu":  # bf16 (validated): a bf16 copy, no autocast on CPU
                if self._bf16_model is None:
                    self._bf16_model = copy.deepcopy(self.model).to(torch.bfloat16)
                y = self._bf16_model(x.replace_feature(x.F.to(torch.bfloat16)))
            else:
                dtype = torch.bfloat16 if precision == "bf16" else torch.float16
                with torch.autocast(self.device.type, dtype=dtype):
                    y = self.model(x)
            return y.F.float()

    # ------------------------------------------------------------------ text
    def _require_text_encoder(self):
        if self.text_encoder is None:
            raise ValueError("this segmenter has no text encoder (the checkpoint config has no 'text_encoder'); "
                             "pass text_encoder= to Segmenter.from_checkpoint")
        return self.text_encoder

    def set_vocabulary(self, names: Sequence[str], templates=None, openscene_other: bool = False) -> None:
        """Cache the class text embeddings of ``names``.

        Args:
            names: K class names (labels index them).
            templates: None (prompt "a {} in a scene"), a template ensemble name or templates with "{}".
            openscene_other: OpenScene's bare "other" prompt for the catch-all class.

        Raises:
            ValueError: empty/duplicate names, or words the text encoder does not know.
        """
        import torch

        from sas_core.text import class_embeddings

        names = [str(n).strip() for n in names]
        if not names or any(not n for n in names):
            raise ValueError(f"vocabulary must be non-empty class names, got {names!r}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate class names in vocabulary: {dup}")
        emb = class_embeddings(self._require_text_encoder(), names, templates, openscene_other=openscene_other)
        if emb.shape[1] != self.dim:
            raise ValueError(f"text embeddings have {emb.shape[1]} dims but the model outputs {self.dim}: "
                             "the checkpoint and the text encoder do not match")
        self.class_names = tuple(names)
        self.text_embeddings = torch.nn.functional.normalize(emb.float(), dim=1).to(self.device)

    def encode_text(self, text: str):
        """(C,) float32 L2-normalised embedding of a free text."""
        import torch

        if not isinstance(text, str) or not text.strip():
            raise ValueError("query text must be a non-empty string")
        emb = self._require_text_encoder().encode([text]).float()
        if emb.shape[1] != self.dim:
            raise ValueError(f"text embedding has {emb.shape[1]} dims but the model outputs {self.dim}")
        return torch.nn.functional.normalize(emb, dim=1)[0].to(self.device)

    def _scores(self, features, text):
        """Chunked ``features @ text.T`` as float32; features (N, C), text (K, C) -> (N, K) torch."""
        import torch

        f = torch.as_tensor(features)
        if f.dim() != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {tuple(f.shape)}")
        f = f.to(self.device)
        t = text.to(self.device)
        half = f.device.type != "cpu" or self.config.fp16_matmul_on_cpu
        t = t.half() if half else t.float()
        out = []
        with torch.inference_mode():
            for s in range(0, len(f), self.config.point_chunk):
                chunk = f[s:s + self.config.point_chunk]
                out.append((chunk.half() if half else chunk.float()) @ t.T)
        return torch.cat(out).float() if out else torch.zeros((0, t.shape[0]), device=self.device)

    def classify(self, features, allowed=None) -> Tuple[np.ndarray, np.ndarray]:
        """Label every point with the closest class of the vocabulary.

        Args:
            features: (N, C) torch or NumPy, L2-normalised (as :meth:`features` returns).
            allowed: optional (K,) bool, the scene's label list (3DSS-VLG,
                :mod:`sas_core.train.scene_labels`): absent classes are masked (-999) and never chosen.

        Returns:
            labels (N,) int64 index into the vocabulary; scores (N,) float32 cosine of that class.
        """
        if self.text_embeddings is None:
            raise ValueError("no vocabulary: call set_vocabulary(names) first")
        s = self._scores(features, self.text_embeddings)
        if allowed is not None:
            from sas_core.train.scene_labels import mask_scores

            if len(allowed) != s.shape[1]:
                raise ValueError(f"allowed classes ({len(allowed)}) do not match the {s.shape[1]}-class vocabulary")
            s = mask_scores(s, allowed)
        score, label = s.max(dim=1)
        return label.cpu().numpy().astype(np.int64), score.cpu().numpy().astype(np.float32)

    def class_scores(self, features) -> np.ndarray:
        """(N, K) float32 cosine of every point with every class of the vocabulary."""
        if self.text_embeddings is None:
            raise ValueError("no vocabulary: call set_vocabulary(names) first")
        return self._scores(features, self.text_embeddings).cpu().numpy()

    def relevance(self, features, text: str) -> np.ndarray:
        """(N,) float32 cosine similarity in [-1, 1] of each point's feature with a free text."""
        s = self._scores(features, self.encode_text(text)[None])[:, 0]
        return s.clamp_(-1.0, 1.0).cpu().numpy().astype(np.float32)

    def ensemble(self, features_3d, features_2d, mask=None):
        """OpenScene's 2D-3D ensemble over the current vocabulary (see :func:`ensemble_features`)."""
        if self.text_embeddings is None:
            raise ValueError("no vocabulary: call set_vocabulary(names) first")
        return ensemble_features(features_3d, features_2d, self.text_embeddings, mask)

    def segment(self, positions, colors=None, progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`features` then :meth:`classify`: (labels (N,) int64, scores (N,) float32)."""
        return self.classify(self.features(positions, colors, progress=progress))


def ensemble_features(features_3d, features_2d, text, mask=None):
    """OpenScene's 2D-3D ensemble (``run/evaluate.py``, feature_type "ensemble").

    For each point the 3D (distilled) and the 2D (fused) feature are both compared with every
    class text embedding after L2 normalisation (``x / (|x| + 1e-5)``); the point keeps the 2D
    feature when its best class score is strictly higher than the 3D feature's best class score,
    else the 3D feature.

    Args:
        features_3d: (N, C) torch/NumPy 3D features.
        features_2d: (N, C) torch/NumPy fused 2D features (zeros where none).
        text: (K, C) class text embeddings.
        mask: optional (N,) bool, False where the point has no 2D feature (then 3D is kept).

    Returns:
        (features (N, C) torch.float16 as chosen, use_2d (N,) NumPy bool).
    """
    import torch

    f3 = torch.as_tensor(features_3d).float()
    f2 = torch.as_tensor(features_2d).to(f3.device).float()
    if f3.shape != f2.shape:
        raise ValueError(f"3D features are {tuple(f3.shape)}, 2D features are {tuple(f2.shape)}")
    t = torch.as_tensor(text).to(f3.device).float()
    s3 = (f3 / (f3.norm(dim=1, keepdim=True) + 1e-5)) @ t.T
    s2 = (f2 / (f2.norm(dim=1, keepdim=True) + 1e-5)) @ t.T
    use_2d = s3.max(dim=1).values < s2.max(dim=1).values
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask, dtype=bool)).to(f3.device)
        if m.shape != use_2d.shape:
            raise ValueError(f"mask is {tuple(m.shape)}, expected ({len(f3)},)")
        use_2d &= m
    out = torch.where(use_2d[:, None], f2, f3).half()
    return out, use_2d.cpu().numpy()


# ---------------------------------------------------------------------- point cloud files

def load_point_cloud(path) -> PointCloud:
    """Read a point cloud file.

    Formats: ``.ply`` (binary little-endian vertex table: x, y, z, optional red/green/blue,
    nx/ny/nz, label), OpenScene ``.pth`` (``(coords, colors in [-1, 1], labels)`` or a dict with
    those keys; labels optional), ``.npy`` ((N, 3) positions or (N, 6) positions + RGB in [0, 1]
    or [0, 255]) and ``.npz`` (keys ``positions``/``coords``, optional ``colors``, ``labels``); a
    saved map folder (``sas replay`` / ``~/save_map``, checked against its manifest) is read through
    its ``map.ply``.

    Returns:
        :class:`PointCloud` (colors float32 in [0, 1], labels int64 with 255 = ignore).
    """
    from sas_core.io import read_ply

    path = Path(path)
    if path.is_dir():  # a saved map folder (sas replay, the node's ~/save_map): its checked PLY
        from sas_core.geometry.voxel_map import MAP_PLY, read_map_manifest

        read_map_manifest(path)
        path = path / MAP_PLY
    if not path.is_file():
        raise FileNotFoundError(f"point cloud {path} not found")
    suffix = path.suffix.lower()
    colors = labels = normals = None
    if suffix == ".ply":
        d = read_ply(path)
        pos = d["positions"]
        if all(k in d for k in ("red", "green", "blue")):
            colors = np.stack([d["red"], d["green"], d["blue"]], 1).astype(np.float32)
            colors = colors / 255.0 if d["red"].dtype == np.uint8 or colors.max() > 1.0 else colors
        if all(k in d for k in ("nx", "ny", "nz")):
            normals = np.stack([d["nx"], d["ny"], d["nz"]], 1).astype(np.float32)
        if "label" in d:
            labels = d["label"].astype(np.int64)
    elif suffix == ".pth":
        from sas_core.data.openscene import read_pth

        pos, colors, labels = read_pth(path)
        colors = np.clip((colors + 1.0) / 2.0, 0.0, 1.0)  # OpenScene stores [-1, 1]
    elif suffix in (".npy", ".npz"):
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: cannot read ({e})") from e
        if suffix == ".npz":
            keys = set(arr.files)
            key = "positions" if "positions" in keys else "coords" if "coords" in keys else None
            if key is None:
                raise ValueError(f"{path}: .npz needs a 'positions' or 'coords' array, has {sorted(keys)}")
            pos = arr[key]
            colors = arr["colors"] if "colors" in keys else None
            labels = arr["labels"].astype(np.int64) if "labels" in keys else None
        else:
            if arr.ndim != 2 or arr.shape[1] not in (3, 6):
                raise ValueError(f"{path}: .npy must be (N, 3) or (N, 6), got {arr.shape}")
            pos = arr[:, :3]
            if arr.shape[1] == 6:
                colors = arr[:, 3:6].astype(np.float32)
        if colors is not None:
            colors = np.asarray(colors, dtype=np.float32)
            if colors.size and colors.max() > 1.0:
                colors = colors / 255.0
    else:
        raise ValueError(f"{path}: unsupported point cloud format {suffix!r} (use .ply, .pth, .npy or .npz)")
    pos = np.asarray(pos, dtype=np.float32)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"{path}: coordinates must be (N, 3), got {pos.shape}")
    if len(pos) == 0:
        raise ValueError(f"{path}: the point cloud is empty")
    finite = np.isfinite(pos).all(1)
    if not finite.all():
        raise ValueError(f"{path}: {int((~finite).sum())} points have NaN/inf coordinates")
    return PointCloud(positions=pos, colors=colors, normals=normals, labels=labels)
