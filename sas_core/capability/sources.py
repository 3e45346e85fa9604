"""Reference images with class masks for capability tables, and the table builder.

A *source* yields, for each class of the vocabulary, samples ``(key, frame, ref_mask)``: an RGB
image (wrapped in a ``Frame`` so any ``Teacher`` can run on it) and the reference mask of the class
object in it. Three sources share one table format:

* ``DiffusionSource``  - Stable Diffusion images + SAM pseudo-masks (the paper's annotation-free
  construction, section 3.2); images, attention maps and masks are cached on disk.
* ``SyntheticProbeSource`` - probe renders of single objects of each class from the synthetic world
  (``sas_core.data.synthetic.render_object_probes``) with ground-truth masks.
* ``FolderSource`` - a user's labelled images: ``root/<class name>/images/<stem>.png|jpg`` and
  ``root/<class name>/masks/<stem>.png`` (non-zero = the object).

``build_table`` runs every teacher on every sample: a teacher's mask for class k is the set of valid
pixels whose argmax against the vocabulary's text embeddings is k; ``S[t][k] = sum I / sum U``.
Per-sample counts are appended to ``cache_dir/counts.jsonl`` so an interrupted run resumes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from sas_core.capability.tables import CapabilityAccumulator, CapabilityTable
from sas_core.types import IGNORE_LABEL, Frame

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
PROBE_INSTANCE_BASE = 10_000_000  # instance ids of probe objects (scene ids are small)


def image_frame(rgb: np.ndarray, semantic: Optional[np.ndarray] = None, instance: Optional[np.ndarray] = None,
                frame_id: str = "capability") -> Frame:
    """Wrap an RGB image (H, W, 3) uint8 as a ``Frame`` for a teacher (constant depth, identity pose)."""
    from sas_core.teachers.base import frame_from_image

    frame = frame_from_image(rgb, semantic, instance)
    frame.frame_id = frame_id
    return frame


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.strip())


# --------------------------------------------------------------------------------------------
# image/mask cache


def _save_png(path: Path, array: np.ndarray) -> None:
    from sas_core.viz import save_png

    save_png(path, array)


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im).copy()


def load_mask(path: Path) -> np.ndarray:
    a = _load_png(path)
    if a.ndim == 3:
        a = a[..., :3].max(axis=-1)
    return a > 0


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


# --------------------------------------------------------------------------------------------
# sources


class DiffusionSource:
    """Stable Diffusion images + SAM pseudo-masks, cached under ``cache_dir/<class>/``."""

    name = "diffusion"

    def __init__(self, synthesizer, masker, images_per_class: int, cache_dir):
        self.synth = synthesizer
        self.masker = masker
        self.n = int(images_per_class)
        self.cache = Path(cache_dir)

    def samples(self, class_name: str, class_index: int) -> Iterator:
        d = self.cache / "images" / slug(class_name)
        for i in range(self.n):
            img_p, att_p, coarse_p, mask_p = (d / f"{i:04d}_{s}.png" for s in ("image", "attention", "coarse", "pseudo"))
            if img_p.exists() and mask_p.exists():
                rgb, ref = load_rgb(img_p), load_mask(mask_p)
            else:
                rgb, att, coarse = self.synth.synthesize(class_name, i)
                ref, _, _ = self.masker(rgb, coarse)
                _save_png(img_p, rgb)
                _save_png(att_p, (np.clip(att, 0, 1) * 255).round().astype(np.uint8))
                _save_png(coarse_p, coarse.astype(np.uint8) * 255)
                _save_png(mask_p, ref.astype(np.uint8) * 255)
            yield f"{slug(class_name)}/{i}", image_frame(rgb), ref

    def count(self, class_name: str) -> int:
        return self.n

    def provenance(self) -> dict:
        cfg = self.synth.config
        return {
            "source": "diffusion",
            "models": {**self.synth.models(), "sam": f"{self.masker.config.sam_model}:{self.masker.config.sam_checkpoint or 'given'}"},
            "prompt": cfg.prompt, "steps": cfg.steps, "guidance": cfg.guidance,
            "n_images_per_class": self.n, "seed": cfg.seed_offset, "image_size": [cfg.height, cfg.width],
            "attention_factors": list(cfg.attention_factors), "threshold": cfg.threshold,
        }


class SyntheticProbeSource:
    """Probe renders of single objects of each class (synthetic world) with ground-truth masks.

    Each probe becomes a frame whose ``semantic`` image is the class index on the object and 255
    elsewhere and whose ``instance`` is a fresh id on the object (-1 elsewhere), so simulated
    teachers (which are driven by ground truth) can run on it. Only the object is labelled, so a
    teacher's false positives on the probe's background are not measured (see the report).

    ``probes`` (optional dict) caches renders across sources with the same settings.
    """

    name = "synthetic"

    def __init__(self, n_per_class: int = 20, seed: int = 0, width: int = 320, height: int = 240,
                 probes: Optional[dict] = None):
        self.n, self.seed, self.width, self.height = int(n_per_class), int(seed), int(width), int(height)
        self._probes = probes if probes is not None else {}

    def samples(self, class_name: str, class_index: int) -> Iterator:
        from sas_core.data.synthetic import render_object_probes

        key = (class_name, self.n, self.seed, self.width, self.height)
        if key not in self._probes:
            self._probes[key] = render_object_probes(class_name, self.n, seed=self.seed, width=self.width,
                                                     height=self.height)
        probes = self._probes[key]
        for i, probe in enumerate(probes):
            rgb, mask = probe[0], np.asarray(probe[1], dtype=bool)
            sem = np.full(mask.shape, IGNORE_LABEL, dtype=np.int64)
            sem[mask] = class_index
            # a fresh object id per probe, far from scene ids, so a simulated teacher draws a new
            # (independent) decision for every probe object instead of reusing one per class
            inst = np.where(mask, PROBE_INSTANCE_BASE + class_index * 100_000 + i, -1).astype(np.int64)
            frame = image_frame(rgb, sem, inst, frame_id=f"probe/{slug(class_name)}/{i}")
            frame.stamp = float(i)
            yield f"{slug(class_name)}/{i}", frame, mask

    def count(self, class_name: str) -> int:
        return self.n

    def provenance(self) -> dict:
        return {"source": "synthetic", "n_images_per_class": self.n, "seed": self.seed,
                "image_size": [self.height, self.width], "models": {"reference": "ground truth (synthetic world)"},
                "note": "synthetic world, not real data"}


class FolderSource:
    """User images with masks: ``root/<class>/images/<stem>.{png,jpg}`` + ``root/<class>/masks/<stem>.png``.

    The class folder name is the class name with non-alphanumerics replaced by ``_`` (or the exact
    name). Classes without a folder contribute no evidence (NaN in the table).
    """

    name = "folder"

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"capability image folder {self.root} not found "
                                    "(expected <root>/<class>/images/*.png and <root>/<class>/masks/*.png)")

    def _pairs(self, class_name: str) -> list:
        for cand in (class_name, slug(class_name)):
            d = self.root / cand
            if (d / "images").is_dir():
                pairs = []
                for img in sorted((d / "images").iterdir()):
                    if img.suffix.lower() in IMAGE_EXTS:
                        m = d / "masks" / (img.stem + ".png")
                        if not m.exists():
                            raise FileNotFoundError(f"mask {m} for image {img} is missing")
                        pairs.append((img, m))
                return pairs
        return []

    def samples(self, class_name: str, class_index: int) -> Iterator:
        for img, m in self._pairs(class_name):
            rgb, mask = load_rgb(img), load_mask(m)
            if mask.shape != rgb.shape[:2]:
                raise ValueError(f"mask {m} is {mask.shape}, image {img} is {rgb.shape[:2]}")
            yield f"{slug(class_name)}/{img.stem}", image_frame(rgb), mask

    def count(self, class_name: str) -> int:
        return len(self._pairs(class_name))

    def provenance(self) -> dict:
        return {"source": "folder", "root": str(self.root.resolve()), "models": {"reference": "user masks"}}


# --------------------------------------------------------------------------------------------
# teacher masks and the table builder


def teacher_class_mask(teacher, frame: Frame, text, class_index: int) -> np.ndarray:
    """(H, W) bool: valid pixels whose argmax over the vocabulary's text embeddings is ``class_index``.

    teacher: any object with ``features(frame) -> (features (h, w, C) tensor, valid (h, w) bool)``;
    text: (K, C) class embeddings. Outputs at another resolution are resized (nearest) to the frame.
    """
    import torch
    import torch.nn.functional as F

    from sas_core.text import text_labels

    feats, valid = teacher.features(frame)
    feats = torch.as_tensor(feats)
    valid = torch.as_tensor(np.asarray(valid) if not isinstance(valid, torch.Tensor) else valid).bool()
    pred = text_labels(feats, text)[0]  # (h, w) argmax of f . text_k
    m = (pred == class_index) & valid.to(pred.device)
    H, W = frame.color.shape[:2]
    if m.shape != (H, W):
        m = F.interpolate(m[None, None].float(), size=(H, W), mode="nearest")[0, 0] > 0.5
    return m.cpu().numpy()


@dataclass
class BuildResult:
    table: CapabilityTable
    path: Optional[Path]
    reused: int  # samples whose counts came from a previous (interrupted) run


def build_table(source, teachers: Sequence, text, vocabulary: Sequence[str], cache_dir=None,
                output=None, provenance: Optional[dict] = None, reduce: str = "sum",
                classes: Optional[Sequence[str]] = None, progress: bool = True) -> BuildResult:
    """Run every teacher on every sample of ``source`` and write the capability table.

    Args:
        source: a source (``samples(class_name, class_index)``, ``count(class_name)``, ``provenance()``).
        teachers: objects with ``name`` and ``features(frame)``.
        text: (K, C) text embeddings of ``vocabulary`` in the teachers' space.
        vocabulary: K class names (the table's columns).
        cache_dir: folder for per-sample counts (``counts.jsonl``) -> resumable; None = no cache.
        output: path of the JSON table (written atomically), or None.
        classes: subset of the vocabulary to evaluate (others stay NaN); default all.
    """
    from tqdm import tqdm

    names = [getattr(t, "name", f"teacher{i}") for i, t in enumerate(teachers)]
    acc = CapabilityAccumulator(names, vocabulary)
    done = {}
    log = None
    if cache_dir is not None:
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        log_path = cache / "counts.jsonl"
        if log_path.exists():
            for line in log_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    done[(rec["teacher"], rec["class"], rec["key"])] = (int(rec["i"]), int(rec["u"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a torn last line from an interrupted run
        log = open(log_path, "a")
    wanted = list(classes) if classes else list(vocabulary)
    for c in wanted:
        if c not in vocabulary:
            raise ValueError(f"class {c!r} is not in the vocabulary")
    total = sum(source.count(c) for c in wanted)
    reused = 0
    bar = tqdm(total=total, desc="capability", unit="img", disable=not progress)
    try:
        for c in wanted:
            k = list(vocabulary).index(c)
            for key, frame, ref in source.samples(c, k):
                acc.count_image(k)
                ref = np.asarray(ref, dtype=bool)
                for t, (name, teacher) in enumerate(zip(names, teachers)):
                    rec_key = (name, c, key)
                    if rec_key in done:
                        i, u = done[rec_key]
                        acc.inter[t, k] += i
                        acc.union[t, k] += u
                        if u > 0:
                            acc.iou_sum[t, k] += i / u
                            acc.n_pairs[t, k] += 1
                        reused += 1
                        continue
                    pm = teacher_class_mask(teacher, frame, text, k)
                    i = int(np.count_nonzero(pm & ref))
                    u = int(np.count_nonzero(pm | ref))
                    acc.add(t, k, pm, ref)
                    if log is not None:
                        log.write(json.dumps({"teacher": name, "class": c, "key": key, "i": i, "u": u}) + "\n")
                        log.flush()
                        os.fsync(log.fileno())
                bar.update(1)
    finally:
        bar.close()
        if log is not None:
            log.close()
    prov = {**source.provenance(), **(provenance or {})}
    prov.setdefault("teachers", names)
    prov["classes_evaluated"] = wanted if classes else "all"
    table = acc.table(prov, reduce=reduce)
    path = table.save(output) if output is not None else None
    return BuildResult(table, path, reused)
