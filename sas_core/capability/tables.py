"""Capability tables: ``S[teacher][class] = sum(intersection) / sum(union)`` against reference masks.

The reference masks are diffusion pseudo-masks (SAS section 3.2), ground-truth masks of synthetic
probe renders, or a user's labelled images; whatever the source, the table has one format:

    {"format": "sas-capability", "version": 1,
     "teachers": [T names], "vocabulary": [K class names],
     "scores": T x K (float in [0, 1] or null where a class has no evidence),
     "intersection": T x K pixel counts, "union": T x K pixel counts, "images": K image counts,
     "provenance": {"source": ..., "models": {...}, "seed": ..., "n_images_per_class": ..., ...}}

Sum over images of the intersections divided by the sum of the unions follows the paper's public
code (MCC/miou/cal_miou.py); eq. 3 of the paper writes a per-image mean, available here as
``reduce="mean"`` (stored per image as the running sum ``iou_sum``).
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

FORMAT = "sas-capability"
VERSION = 1


def _grid(values, T, K, name, allow_null=False):
    arr = np.full((T, K), np.nan, dtype=np.float64)
    if not isinstance(values, list) or len(values) != T:
        raise ValueError(f"capability table: {name!r} must be a list of {T} rows")
    for t, row in enumerate(values):
        if not isinstance(row, list) or len(row) != K:
            raise ValueError(f"capability table: {name!r} row {t} must have {K} entries")
        for k, v in enumerate(row):
            if v is None:
                if not allow_null:
                    raise ValueError(f"capability table: {name!r}[{t}][{k}] is null")
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"capability table: {name!r}[{t}][{k}] = {v!r} is not a finite number")
            arr[t, k] = float(v)
    return arr


@dataclass
class CapabilityTable:
    """Per-teacher, per-class capability.

    Attributes:
        teachers: T teacher names (unique).
        vocabulary: K class names (unique).
        scores: (T, K) float64 in [0, 1]; NaN where a class had no evidence (no reference pixels).
        provenance: plain-JSON dict: source, models, vocabulary name, image count, seed, ...
        intersection, union: optional (T, K) pixel counts behind ``scores``.
        images: optional (K,) number of images per class.
    """

    teachers: list
    vocabulary: list
    scores: np.ndarray
    provenance: dict = field(default_factory=dict)
    intersection: Optional[np.ndarray] = None
    union: Optional[np.ndarray] = None
    images: Optional[np.ndarray] = None

    def __post_init__(self):
        self.teachers = [str(t) for t in self.teachers]
        self.vocabulary = [str(v) for v in self.vocabulary]
        if len(set(self.teachers)) != len(self.teachers) or not self.teachers:
            raise ValueError(f"capability table: teacher names must be unique and non-empty: {self.teachers}")
        if len(set(self.vocabulary)) != len(self.vocabulary) or not self.vocabulary:
            raise ValueError("capability table: vocabulary must be unique and non-empty")
        self.scores = np.asarray(self.scores, dtype=np.float64)
        T, K = len(self.teachers), len(self.vocabulary)
        if self.scores.shape != (T, K):
            raise ValueError(f"capability table: scores shape {self.scores.shape} != (T={T}, K={K})")
        finite = self.scores[np.isfinite(self.scores)]
        if np.isinf(self.scores).any() or (finite.size and (finite.min() < 0 or finite.max() > 1 + 1e-9)):
            raise ValueError("capability table: scores must lie in [0, 1] (NaN = no evidence)")
        for name in ("intersection", "union"):
            v = getattr(self, name)
            if v is not None:
                v = np.asarray(v, dtype=np.float64)
                if v.shape != (T, K):
                    raise ValueError(f"capability table: {name} shape {v.shape} != {(T, K)}")
                setattr(self, name, v)
        if self.images is not None:
            self.images = np.asarray(self.images, dtype=np.int64)
            if self.images.shape != (K,):
                raise ValueError(f"capability table: images shape {self.images.shape} != ({K},)")

    # ---------------------------------------------------------------- access

    def score(self, teacher: str, class_name: str) -> float:
        return float(self.scores[self._teacher_index(teacher), self._class_index(class_name)])

    def _teacher_index(self, teacher: str) -> int:
        try:
            return self.teachers.index(teacher)
        except ValueError:
            raise ValueError(f"teacher {teacher!r} is not in the capability table ({self.teachers})") from None

    def _class_index(self, name: str) -> int:
        try:
            return self.vocabulary.index(name)
        except ValueError:
            raise ValueError(f"class {name!r} is not in the capability table's vocabulary") from None

    def matrix(self, teachers: Optional[Sequence[str]] = None, vocabulary: Optional[Sequence[str]] = None,
               fill: Optional[float] = None) -> np.ndarray:
        """(T', K') float32 scores in the requested teacher and class order (for the fusion).

        fill: value for classes without evidence (NaN); None -> the mean over the teacher's other
        classes (a neutral prior), or 0.0 if the teacher has no evidence at all.
        """
        ti = [self._teacher_index(t) for t in (teachers or self.teachers)]
        ki = [self._class_index(k) for k in (vocabulary or self.vocabulary)]
        s = self.scores.copy()
        if fill is None:
            with np.errstate(all="ignore"):
                row_mean = np.nanmean(np.where(np.isfinite(s), s, np.nan), axis=1)
            row_mean = np.nan_to_num(row_mean, nan=0.0)
            s = np.where(np.isnan(s), row_mean[:, None], s)
        else:
            s = np.where(np.isnan(s), float(fill), s)
        return s[np.ix_(ti, ki)].astype(np.float32)

    def tensor(self, teachers=None, vocabulary=None, fill=None, device=None):
        import torch

        return torch.from_numpy(self.matrix(teachers, vocabulary, fill)).to(device)

    # ---------------------------------------------------------------- I/O

    def to_json(self) -> dict:
        def rows(a, as_int=False):
            if a is None:
                return None
            return [[(None if not np.isfinite(v) else (int(v) if as_int else float(v))) for v in r] for r in a]

        d = {
            "format": FORMAT,
            "version": VERSION,
            "teachers": self.teachers,
            "vocabulary": self.vocabulary,
            "scores": rows(self.scores),
            "provenance": self.provenance,
        }
        if self.intersection is not None:
            d["intersection"] = rows(self.intersection, as_int=True)
        if self.union is not None:
            d["union"] = rows(self.union, as_int=True)
        if self.images is not None:
            d["images"] = [int(x) for x in self.images]
        return d

    def save(self, path) -> Path:
        """Write the table as JSON, atomically. Returns the path."""
        from sas_core.io import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return path

    @classmethod
    def from_json(cls, d: dict, origin: str = "capability table") -> "CapabilityTable":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{origin}: not a SAS capability table (format != {FORMAT!r})")
        if d.get("version") != VERSION:
            raise ValueError(f"{origin}: unsupported capability table version {d.get('version')!r}")
        for key in ("teachers", "vocabulary", "scores"):
            if key not in d:
                raise ValueError(f"{origin}: missing {key!r}")
        teachers, vocab = d["teachers"], d["vocabulary"]
        if not isinstance(teachers, list) or not isinstance(vocab, list):
            raise ValueError(f"{origin}: teachers and vocabulary must be lists")
        T, K = len(teachers), len(vocab)
        scores = _grid(d["scores"], T, K, "scores", allow_null=True)
        inter = _grid(d["intersection"], T, K, "intersection") if d.get("intersection") is not None else None
        union = _grid(d["union"], T, K, "union") if d.get("union") is not None else None
        images = np.asarray(d["images"], dtype=np.int64) if d.get("images") is not None else None
        prov = d.get("provenance", {})
        if not isinstance(prov, dict):
            raise ValueError(f"{origin}: provenance must be an object")
        try:
            return cls(teachers, vocab, scores, prov, inter, union, images)
        except ValueError as exc:
            raise ValueError(f"{origin}: {exc}") from None

    @classmethod
    def load(cls, path) -> "CapabilityTable":
        """Read and validate a table written by ``save``; clear errors for missing/corrupt files."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"capability table {path} not found (build one with `sas capability`)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"capability table {path} is corrupt: {exc}") from None
        return cls.from_json(d, origin=f"capability table {path}")


class CapabilityAccumulator:
    """Running sums of intersection and union per (teacher, class) over images.

    ``add(t, k, pred_mask, ref_mask)`` with (H, W) bool masks; ``table(provenance)`` gives the
    ``CapabilityTable`` (``reduce="sum"``: sum I / sum U as the public code; ``"mean"``: mean of
    per-image IoU as eq. 3).
    """

    def __init__(self, teachers: Sequence[str], vocabulary: Sequence[str]):
        self.teachers = list(teachers)
        self.vocabulary = list(vocabulary)
        T, K = len(self.teachers), len(self.vocabulary)
        self.inter = np.zeros((T, K), dtype=np.int64)
        self.union = np.zeros((T, K), dtype=np.int64)
        self.iou_sum = np.zeros((T, K), dtype=np.float64)
        self.n_pairs = np.zeros((T, K), dtype=np.int64)
        self.images = np.zeros(K, dtype=np.int64)

    def add(self, teacher: int, class_index: int, pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
        """Accumulate one image; returns its IoU (NaN when both masks are empty)."""
        p = np.asarray(pred_mask, dtype=bool)
        r = np.asarray(ref_mask, dtype=bool)
        if p.shape != r.shape:
            raise ValueError(f"teacher mask {p.shape} and reference mask {r.shape} differ in size")
        i = int(np.count_nonzero(p & r))
        u = int(np.count_nonzero(p | r))
        self.inter[teacher, class_index] += i
        self.union[teacher, class_index] += u
        if u > 0:
            self.iou_sum[teacher, class_index] += i / u
            self.n_pairs[teacher, class_index] += 1
        return i / u if u else float("nan")

    def count_image(self, class_index: int) -> None:
        self.images[class_index] += 1

    def table(self, provenance: Optional[dict] = None, reduce: str = "sum") -> CapabilityTable:
        with np.errstate(invalid="ignore", divide="ignore"):
            if reduce == "sum":
                scores = np.where(self.union > 0, self.inter / np.maximum(self.union, 1), np.nan)
            elif reduce == "mean":
                scores = np.where(self.n_pairs > 0, self.iou_sum / np.maximum(self.n_pairs, 1), np.nan)
            else:
                raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        prov = dict(provenance or {})
        prov.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        prov["reduce"] = reduce
        return CapabilityTable(self.teachers, self.vocabulary, scores, prov, self.inter.copy(),
                               self.union.copy(), self.images.copy())
