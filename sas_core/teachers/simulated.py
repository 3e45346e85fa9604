"""Simulated 2D teachers for the synthetic world.

They stand in for LSeg (a dense teacher) and SEEM (a mask teacher) where no real model can run,
and they drive the capability-fusion ablation, so their errors look like real ones:

* **Instance-coherent, class-dependent confusions.** Every object (ground-truth instance) of
  class ``c`` is mislabelled with probability ``class_error[c]`` as one of its plausible
  confusers (chair -> sofa, table -> desk, door -> wall, ...). The decision is a hash of
  (teacher seed, instance id, class), so the same object is mislabelled the same way in every
  frame; with probability ``flip_prob`` per (object, frame) the decision flips for that frame.
  Pixels without an instance id form one pseudo-object per class.
* **Different strengths.** :func:`make_simulated_pair` builds a dense teacher that is bad at
  small/thin objects and some furniture, and a mask teacher that is bad at large structure and
  other furniture (:data:`DENSE_CLASS_ERROR`, :data:`MASK_CLASS_ERROR`).
* **Dense teacher features** (per pixel, like LSeg): text embedding of the predicted class +
  a per-object offset + per-pixel noise (in a fixed random ``noise_rank``-dimensional subspace),
  L2-normalised; boundaries are blurred by reading the prediction at a randomly displaced
  pixel (Gaussian, ``blur_px``), and a fraction ``pixel_error`` of pixels takes the object's
  confuser.
* **Mask teacher features** (piecewise constant, like SEEM after text alignment): every mask
  gets exactly the text embedding of its caption ``caption_template.format(label)``, optionally
  with a per-object attribute word ("a wooden chair", the captioner's role); mask boundaries
  wobble (a smooth random displacement field of amplitude ``boundary_px``), pixels on mask
  borders are left uncovered with probability ``gap_prob``, objects smaller than ``min_area``
  pixels in a frame and a fraction ``miss_prob`` of objects per frame are not segmented.
  Uncovered pixels have ``valid == False``.

Pixels whose ground-truth class is 255 (e.g. ceiling) get no prediction. Everything is seeded
(teacher seed, object id, frame stamp/id) and vectorised over pixels with lookup tables indexed
by per-frame object indices. ``expected_accuracy()`` gives the per-class probability that an
object is labelled correctly, to compare capability tables against the truth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from sas_core.text import ATTRIBUTE_WORDS, CAPTION_TEMPLATE, SCANNET_20, stable_seed
from sas_core.types import IGNORE_LABEL, Frame

DEFAULT_CONFUSERS: Dict[str, Tuple[str, ...]] = {
    "wall": ("door", "curtain", "picture"),
    "floor": ("wall", "table"),
    "cabinet": ("bookshelf", "otherfurniture", "counter"),
    "bed": ("sofa",),
    "chair": ("sofa", "otherfurniture"),
    "sofa": ("chair", "bed"),
    "table": ("desk", "counter"),
    "door": ("wall", "cabinet"),
    "window": ("picture", "curtain"),
    "bookshelf": ("cabinet", "otherfurniture"),
    "picture": ("window", "wall"),
    "counter": ("table", "cabinet", "desk"),
    "desk": ("table",),
    "curtain": ("window", "shower curtain"),
    "refrigerator": ("cabinet", "door"),
    "shower curtain": ("curtain",),
    "toilet": ("sink", "bathtub"),
    "sink": ("counter", "toilet"),
    "bathtub": ("sink", "toilet"),
    "otherfurniture": ("cabinet", "table", "chair"),
}
"""Plausible wrong labels per class (names outside a teacher's vocabulary are ignored)."""

DENSE_CLASS_ERROR: Dict[str, float] = {
    "picture": 0.6, "shower curtain": 0.6, "otherfurniture": 0.6, "counter": 0.5, "desk": 0.5,
    "sink": 0.5, "bookshelf": 0.45, "curtain": 0.4, "refrigerator": 0.35, "bathtub": 0.3,
}
"""Dense (LSeg-like) teacher: bad at small/thin objects and some furniture."""

MASK_CLASS_ERROR: Dict[str, float] = {
    "door": 0.5, "window": 0.5, "cabinet": 0.5, "sofa": 0.45, "bed": 0.4, "table": 0.4,
    "wall": 0.35, "floor": 0.25,
}
"""Mask (SEEM-like) teacher: bad at large structure and other furniture."""


@dataclass
class SimulatedTeacherConfig:
    """Configuration of a :class:`SimulatedTeacher` (all probabilities in [0, 1])."""

    name: str = "simulated"  # teacher name (capability tables)
    kind: str = "dense"  # "dense" (per-pixel noisy features) or "mask" (piecewise-constant masks)
    seed: int = 0  # seed of every random decision of this teacher
    vocabulary: Tuple[str, ...] = SCANNET_20  # class names that frame.semantic indexes
    class_error: Dict[str, float] = field(default_factory=dict)  # per-class object mislabel probability
    default_error: float = 0.05  # mislabel probability of classes not in class_error
    confusers: Dict[str, Tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_CONFUSERS))  # wrong labels
    flip_prob: float = 0.02  # per (object, frame) probability that the object's decision flips
    instance_noise: float = 0.3  # norm of the per-object feature offset (dense)
    pixel_noise: float = 0.5  # norm of the per-pixel feature noise (dense)
    noise_rank: int = 32  # dimension of the pixel-noise subspace (0: full rank) (dense)
    blur_px: float = 1.5  # std in pixels of the boundary-blur displacement (dense)
    pixel_error: float = 0.03  # fraction of pixels taking their object's confuser (dense)
    boundary_px: float = 3.0  # amplitude in pixels of the mask-boundary wobble (mask)
    gap_prob: float = 0.5  # probability a mask-border pixel is uncovered (mask)
    miss_prob: float = 0.05  # per (object, frame) probability the object gets no mask (mask)
    min_area: int = 30  # objects with fewer pixels in a frame get no mask (mask)
    caption_template: str = CAPTION_TEMPLATE  # caption of a mask labelled x (mask)
    caption_attribute_prob: float = 0.5  # probability an object's caption gets an attribute word (mask)
    out_dtype: str = "float16"  # float16 | float32 features

    def __post_init__(self):
        if self.kind not in ("dense", "mask"):
            raise ValueError(f"kind must be 'dense' or 'mask', got {self.kind!r}")
        self.vocabulary = tuple(self.vocabulary)
        for key in ("default_error", "flip_prob", "pixel_error", "gap_prob", "miss_prob", "caption_attribute_prob"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {value}")
        for name, value in self.class_error.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"class_error[{name!r}] must be in [0, 1], got {value}")
        if self.out_dtype not in ("float16", "float32"):
            raise ValueError("out_dtype must be 'float16' or 'float32'")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vocabulary"] = list(self.vocabulary)
        d["confusers"] = {k: list(v) for k, v in self.confusers.items()}
        return d


# ------------------------------------------------------------------------------ hashing

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, salt: int, *keys) -> np.ndarray:
    """Deterministic uniforms in [0, 1) from integer keys (arrays broadcast), vectorised."""
    with np.errstate(over="ignore"):
        h = _mix(np.asarray([(seed * 0x9E3779B1 + salt * 0x85EBCA77) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        for k in keys:
            h = _mix(h ^ (np.asarray(k).astype(np.int64).view(np.uint64) * _GOLDEN))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------- teacher

class SimulatedTeacher:
    """A teacher driven by a frame's ground truth (see the module docstring).

    Args:
        config: :class:`SimulatedTeacherConfig`.
        encoder: the shared text encoder (e.g. ``SyntheticTextEncoder``); class names of
            ``config.vocabulary`` (dense) and captions (mask) are encoded with it.
    """

    def __init__(self, config: SimulatedTeacherConfig, encoder):
        import torch

        self.config = config
        self.encoder = encoder
        self.name = config.name
        self.kind = config.kind
        vocab = config.vocabulary
        self.n_classes = len(vocab)
        self.class_text = encoder.encode(list(vocab)).float()  # (K, C)
        self.dim = int(self.class_text.shape[1])
        index = {n: i for i, n in enumerate(vocab)}
        unknown = [n for n in config.class_error if n not in index]
        if unknown:
            raise ValueError(f"class_error names not in the vocabulary: {unknown}")
        self.error = np.array([config.class_error.get(n, config.default_error) for n in vocab], np.float64)
        # confuser table (K, max_confusers), padded by repetition; fallback: one seeded other class
        lists = []
        for i, n in enumerate(vocab):
            conf = [index[c] for c in config.confusers.get(n, ()) if c in index and c != n]
            if not conf and self.n_classes > 1:
                j = int(hash_uniform(config.seed, 7, i)[0] * (self.n_classes - 1))
                conf = [j if j < i else j + 1]
            lists.append(conf or [i])
        width = max(len(c) for c in lists)
        self.confuser_table = np.array([(c * width)[:width] for c in lists], np.int64)
        self.confuser_count = np.array([len(c) for c in lists], np.int64)
        self._offset_cache: Dict[Tuple[int, int], np.ndarray] = {}
        self._caption_cache: Dict[str, "torch.Tensor"] = {}
        gen = torch.Generator().manual_seed(stable_seed("sas-sim-noise-basis", config.seed) % (2 ** 63))
        rank = config.noise_rank if 0 < config.noise_rank < self.dim else self.dim
        if rank < self.dim:
            q, _ = torch.linalg.qr(torch.randn(self.dim, rank, generator=gen))
            self._noise_basis = q.T.contiguous()  # (rank, C) orthonormal rows
        else:
            self._noise_basis = None
        self._rank = rank

    # ------------------------------------------------------------------ truth tables
    def class_error_rates(self) -> Dict[str, float]:
        """Configured per-class probability that an object is mislabelled (before flips)."""
        return {n: float(e) for n, e in zip(self.config.vocabulary, self.error)}

    def expected_accuracy(self) -> np.ndarray:
        """(K,) probability that an object of each class is labelled correctly in a frame
        (including per-frame flips): ``1 - (e (1 - f) + (1 - e) f)``."""
        e, f = self.error, self.config.flip_prob
        return 1.0 - (e * (1 - f) + (1 - e) * f)

    # ------------------------------------------------------------------ per-frame logic
    def _frame_key(self, frame: Frame) -> int:
        return stable_seed("frame", repr(float(frame.stamp)), frame.frame_id) & 0x7FFFFFFFFFFFFFFF

    def _objects(self, frame: Frame):
        """Per-pixel object index into unique (object key, class) pairs.

        Returns (obj (H, W) int64 with -1 where no prediction, keys (M,), classes (M,))."""
        if frame.semantic is None:
            raise ValueError(f"simulated teacher {self.name!r} needs ground-truth labels (frame.semantic), which "
                             "only the synthetic world has; for real recordings choose a real teacher: dense_clip "
                             "or mask_clip, with local CLIP weights (README: Real weights and real datasets)")
        sem = np.asarray(frame.semantic, np.int64)
        if frame.instance is not None:
            inst = np.asarray(frame.instance, np.int64)
            if inst.shape != sem.shape:
                raise ValueError(f"instance image {inst.shape} does not match semantic {sem.shape}")
        else:
            inst = np.full(sem.shape, -1, np.int64)
        valid = sem != IGNORE_LABEL
        bad = valid & ((sem < 0) | (sem >= self.n_classes))
        if bad.any():
            raise ValueError(f"frame.semantic has labels {np.unique(sem[bad])[:5].tolist()} outside the "
                             f"{self.n_classes}-class vocabulary of teacher {self.name!r} (255 = none)")
        key = np.where(inst >= 0, inst, -(sem + 2))  # stuff without instance ids: one object per class
        pair = key * 4096 + np.where(valid, sem, 0)
        uniq, inverse = np.unique(pair[valid], return_inverse=True)
        obj = np.full(sem.shape, -1, np.int64)
        obj[valid] = inverse
        classes = uniq - np.floor_divide(uniq, 4096) * 4096
        keys = np.floor_divide(uniq, 4096)
        return obj, keys, classes

    def _decide(self, keys: np.ndarray, classes: np.ndarray, frame_key: int):
        """Predicted class and confuser per object -> (pred (M,), confuser (M,))."""
        s = self.config.seed
        wrong = hash_uniform(s, 1, keys, classes) < self.error[classes]
        pick = (hash_uniform(s, 2, keys, classes) * self.confuser_count[classes]).astype(np.int64)
        confuser = self.confuser_table[classes, pick]
        flip = hash_uniform(s, 3, keys, classes, frame_key) < self.config.flip_prob
        wrong = wrong ^ flip
        return np.where(wrong, confuser, classes), confuser

    def predicted_classes(self, frame: Frame) -> np.ndarray:
        """(H, W) int64 class each pixel's object is labelled as (255 where no ground truth),
        before boundary effects and pixel noise (the instance-level decision)."""
        obj, keys, classes = self._objects(frame)
        pred, _ = self._decide(keys, classes, self._frame_key(frame))
        out = np.full(obj.shape, IGNORE_LABEL, np.int64)
        out[obj >= 0] = pred[obj[obj >= 0]]
        return out

    def _offsets(self, keys: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(M, C) per-object offsets of norm ~instance_noise (cached across frames)."""
        out = np.empty((len(keys), self.dim), np.float32)
        scale = self.config.instance_noise / np.sqrt(self.dim)
        for row, (k, c) in enumerate(zip(keys.tolist(), classes.tolist())):  # loop over objects
            vec = self._offset_cache.get((k, c))
            if vec is None:
                rng = np.random.default_rng(stable_seed("sas-sim-offset", self.config.seed, k, c))
                vec = (rng.standard_normal(self.dim) * scale).astype(np.float32)
                self._offset_cache[(k, c)] = vec
            out[row] = vec
        return out

    def features(self, frame: Frame):
        """(features (H, W, C) L2-normalised ``out_dtype``, valid (H, W) bool) torch CPU tensors."""
        obj, keys, classes = self._objects(frame)
        fkey = self._frame_key(frame)
        pred, confuser = self._decide(keys, classes, fkey)
        rng = np.random.default_rng(stable_seed("sas-sim-frame", self.config.seed, self.kind, fkey))
        if self.kind == "dense":
            return self._dense(obj, keys, classes, pred, confuser, rng, fkey)
        return self._mask(obj, keys, classes, pred, rng, fkey)

    def _dense(self, obj, keys, classes, pred, confuser, rng, fkey):
        import torch

        cfg = self.config
        h, w = obj.shape
        if cfg.blur_px > 0 and len(keys):
            yy, xx = np.mgrid[0:h, 0:w]
            dy = np.rint(rng.normal(0.0, cfg.blur_px, (h, w))).astype(np.int64)
            dx = np.rint(rng.normal(0.0, cfg.blur_px, (h, w))).astype(np.int64)
            obj = obj[np.clip(yy + dy, 0, h - 1), np.clip(xx + dx, 0, w - 1)]
        valid = obj >= 0
        n_pix = h * w
        # two table rows per object: [predicted class, confuser] + the object's offset; a last zero row
        # for pixels without prediction (zeroed again after the noise, below)
        choice = np.zeros(n_pix, np.int64)
        if cfg.pixel_error > 0:
            choice = (rng.random(n_pix) < cfg.pixel_error).astype(np.int64)
        rows = np.where(valid.reshape(-1), obj.reshape(-1) * 2 + choice, 2 * len(keys))
        offsets = torch.from_numpy(self._offsets(keys, classes))
        labels = torch.from_numpy(np.stack([pred, confuser], 1).reshape(-1))
        table = torch.cat([self.class_text[labels] + offsets.repeat_interleave(2, dim=0),
                           torch.zeros(1, self.dim)])  # (2M + 1, C)
        rows_t = torch.from_numpy(rows)
        z = None
        if cfg.pixel_noise > 0:
            gen = torch.Generator().manual_seed(stable_seed("sas-sim-pixel", cfg.seed, fkey) % (2 ** 63))
            z = torch.randn(n_pix, self._rank, generator=gen)
            alpha = cfg.pixel_noise / np.sqrt(self._rank)
        f = torch.index_select(table, 0, rows_t)  # (H*W, C) float32
        if z is not None and self._noise_basis is not None:
            f.addmm_(z, self._noise_basis, alpha=alpha)  # noise in a fixed rank-r subspace
        elif z is not None:
            f.add_(z, alpha=alpha)  # full-rank noise
        f.div_(torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min_(1e-12))
        out = f.to(getattr(torch, cfg.out_dtype))
        invalid = np.flatnonzero(~valid.reshape(-1))
        if len(invalid):
            out[torch.from_numpy(invalid)] = 0
        return out.reshape(h, w, self.dim), torch.from_numpy(valid)

    def captions(self, keys: np.ndarray, classes: np.ndarray, pred: np.ndarray) -> list:
        """Caption per object: ``caption_template`` of the predicted label, with a per-object
        attribute word ("a wooden chair") with probability ``caption_attribute_prob``."""
        cfg = self.config
        has_attr = hash_uniform(cfg.seed, 5, keys, classes) < cfg.caption_attribute_prob
        which = (hash_uniform(cfg.seed, 6, keys, classes) * len(ATTRIBUTE_WORDS)).astype(np.int64)
        vocab = cfg.vocabulary
        return [cfg.caption_template.format(f"{ATTRIBUTE_WORDS[a]} {vocab[p]}" if h else vocab[p])
                for p, h, a in zip(pred.tolist(), has_attr.tolist(), which.tolist())]

    def _encode_captions(self, captions):
        import torch

        missing = sorted({c for c in captions if c not in self._caption_cache})
        if missing:
            for c, v in zip(missing, self.encoder.encode(missing).float()):
                self._caption_cache[c] = v
        if not captions:
            return torch.zeros(0, self.dim)
        return torch.stack([self._caption_cache[c] for c in captions])

    def mask_ids(self, frame: Frame) -> np.ndarray:
        """(H, W) int64 mask index per pixel (-1: no mask) of a ``kind="mask"`` teacher: the masks
        whose features :meth:`features` returns (same wobble, gaps and misses), for 3D instance
        proposals (:mod:`sas_core.instances`)."""
        if self.kind != "mask":
            raise ValueError(f"teacher {self.name!r} is a {self.kind} teacher; mask ids need kind='mask'")
        obj, keys, classes = self._objects(frame)
        fkey = self._frame_key(frame)
        rng = np.random.default_rng(stable_seed("sas-sim-frame", self.config.seed, self.kind, fkey))
        return self._mask_ids(obj, keys, classes, rng, fkey)

    def _mask_ids(self, obj, keys, classes, rng, fkey):
        import torch
        import torch.nn.functional as F

        cfg = self.config
        h, w = obj.shape
        m = len(keys)
        # which objects get a mask in this frame
        area = np.bincount(obj[obj >= 0], minlength=m)
        missed = hash_uniform(cfg.seed, 4, keys, classes, fkey) < cfg.miss_prob
        covered_obj = (area >= cfg.min_area) & ~missed
        # wobbly boundaries: nearest-neighbour lookup through a smooth displacement field
        if cfg.boundary_px > 0 and m:
            gh, gw = max(2, h // 24), max(2, w // 24)
            field_lr = torch.from_numpy(rng.normal(0.0, cfg.boundary_px, (1, 2, gh, gw)).astype(np.float32))
            disp = F.interpolate(field_lr, size=(h, w), mode="bicubic", align_corners=True)[0].numpy()
            yy, xx = np.mgrid[0:h, 0:w]
            sy = np.clip(np.rint(yy + disp[0]).astype(np.int64), 0, h - 1)
            sx = np.clip(np.rint(xx + disp[1]).astype(np.int64), 0, w - 1)
            obj = obj[sy, sx]
        mask_id = np.where(obj >= 0, obj, -1)
        mask_id = np.where((mask_id >= 0) & covered_obj[np.maximum(mask_id, 0)], mask_id, -1)
        if cfg.gap_prob > 0:
            border = np.zeros((h, w), bool)
            border[:-1] |= mask_id[:-1] != mask_id[1:]
            border[1:] |= mask_id[1:] != mask_id[:-1]
            border[:, :-1] |= mask_id[:, :-1] != mask_id[:, 1:]
            border[:, 1:] |= mask_id[:, 1:] != mask_id[:, :-1]
            drop = border & (rng.random((h, w)) < cfg.gap_prob)
            mask_id = np.where(drop, -1, mask_id)
        return mask_id

    def _mask(self, obj, keys, classes, pred, rng, fkey):
        import torch

        cfg = self.config
        mask_id = self._mask_ids(obj, keys, classes, rng, fkey)
        h, w = mask_id.shape
        vectors = self._encode_captions(self.captions(keys, classes, pred))  # (M, C), exact text embeddings
        table = torch.cat([torch.zeros(1, self.dim), vectors]).to(getattr(torch, cfg.out_dtype))  # row 0: none
        out = torch.index_select(table, 0, torch.from_numpy(mask_id.reshape(-1) + 1))
        return out.reshape(h, w, self.dim), torch.from_numpy(mask_id >= 0)

    def __repr__(self) -> str:
        return f"SimulatedTeacher({self.name!r}, kind={self.kind!r}, seed={self.config.seed})"


def make_simulated_pair(encoder, seed: int = 0, vocabulary: Optional[Sequence[str]] = None,
                        dense_overrides: Optional[dict] = None, mask_overrides: Optional[dict] = None):
    """A dense and a mask simulated teacher that are good at different classes.

    Args:
        encoder: shared text encoder (its ``vocabulary`` is used when ``vocabulary`` is None).
        seed: base seed; the two teachers use ``seed`` and ``seed + 1``.
        vocabulary: class names ``frame.semantic`` indexes (default: the encoder's or ScanNet-20).
        dense_overrides / mask_overrides: SimulatedTeacherConfig fields to override.
    Returns:
        (dense teacher "sim_dense", mask teacher "sim_mask").
    """
    vocab = tuple(vocabulary if vocabulary is not None else getattr(encoder, "vocabulary", SCANNET_20))
    dense_cfg = dict(name="sim_dense", kind="dense", seed=seed, vocabulary=vocab,
                     class_error={k: v for k, v in DENSE_CLASS_ERROR.items() if k in vocab})
    mask_cfg = dict(name="sim_mask", kind="mask", seed=seed + 1, vocabulary=vocab,
                    class_error={k: v for k, v in MASK_CLASS_ERROR.items() if k in vocab})
    dense_cfg.update(dense_overrides or {})
    mask_cfg.update(mask_overrides or {})
    return (SimulatedTeacher(SimulatedTeacherConfig(**dense_cfg), encoder),
            SimulatedTeacher(SimulatedTeacherConfig(**mask_cfg), encoder))
