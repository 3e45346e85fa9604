"""Scene-level label guidance (3DSS-VLG, Xu et al., ECCV 2024): per-scene class lists restrict labels.

A *scene label list* names the classes present in one scene: a weak label a person gives in seconds,
or a robot's task list. Where a scene has one, every argmax over the class text embeddings in that
scene is restricted to the list: the scores of absent classes are replaced by :data:`MASKED_LOGIT`
(-999, the public code's value) before the argmax. That applies to

* the TESD pseudo-labels of stage 2 (:meth:`sas_core.train.tesd.TemporalEnsemble.pseudo_labels`);
* the pseudo-labels of the embeddings-specialisation adapter (:mod:`sas_core.train.adapter`);
* classification (``sas segment --scene-labels``) and evaluation (``sas eval --scene-labels``)
  when asked.

File layout (OpenScene style, next to the scene files): ``<root>/<split>/<scene>.labels.txt``, one
class per line (``#`` comments and blank lines skipped), or one JSON manifest ``{"scene": ["wall",
"chair", ...], ...}``. :func:`load_scene_labels` reads either (a folder of ``*.labels.txt`` files,
one such file, or a ``.json`` manifest); `sas synth` writes the lists of its rooms (the classes
present).

On the live node the scene list is the vocabulary itself: ``~/set_vocabulary`` with the task's
classes relabels the map among exactly those classes, which is the same argmax as masking every
other class of a larger vocabulary with -999 (so no separate scene-list service is needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

MASKED_LOGIT = -999.0
"""Score given to classes absent from a scene's list (3DSS-VLG's public code)."""

LABELS_SUFFIX = ".labels.txt"


def read_labels_file(path) -> Tuple[str, ...]:
    """Class names of one ``<scene>.labels.txt`` (one per line; ``#`` comments, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scene label file {path} not found")
    names = tuple(n for n in (ln.strip() for ln in path.read_text(encoding="utf-8").splitlines())
                  if n and not n.startswith("#"))
    if not names:
        raise ValueError(f"scene label file {path} lists no class")
    return names


def scene_of_labels_file(path) -> str:
    """Scene name of ``<scene>.labels.txt``."""
    name = Path(path).name
    return name[: -len(LABELS_SUFFIX)] if name.endswith(LABELS_SUFFIX) else Path(path).stem


def load_scene_labels(path) -> Dict[str, Tuple[str, ...]]:
    """{scene: class names} from a JSON manifest, a folder of ``<scene>.labels.txt`` or one such file.

    Raises FileNotFoundError when ``path`` does not exist or holds no list, ValueError on a
    malformed manifest.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob(f"*{LABELS_SUFFIX}"))
        if not files:
            raise FileNotFoundError(f"{path} has no <scene>{LABELS_SUFFIX} files")
        return {scene_of_labels_file(f): read_labels_file(f) for f in files}
    if not path.is_file():
        raise FileNotFoundError(f"scene labels {path} not found (a folder of <scene>{LABELS_SUFFIX}, one such "
                                "file, or a JSON manifest {scene: [classes]})")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                                 for v in data.values()):
            raise ValueError(f"{path}: a scene label manifest is a JSON object {{scene: [class, ...]}}")
        out = {str(k): tuple(c.strip() for c in v if c.strip()) for k, v in data.items()}
        empty = [k for k, v in out.items() if not v]
        if empty:
            raise ValueError(f"{path}: scenes with an empty class list: {empty[:5]}")
        return out
    return {scene_of_labels_file(path): read_labels_file(path)}


def write_scene_labels(folder, scene: str, classes: Sequence[str]) -> Path:
    """Write ``<folder>/<scene>.labels.txt`` (atomically); returns its path."""
    from sas_core.io import atomic_write_text

    names = [str(c).strip() for c in classes if str(c).strip()]
    if not names:
        raise ValueError(f"scene {scene!r}: no class to write")
    path = Path(folder) / f"{scene}{LABELS_SUFFIX}"
    atomic_write_text(path, "\n".join(names) + "\n")
    return path


def class_mask(present: Sequence[str], class_names: Sequence[str], scene: str = "") -> np.ndarray:
    """(K,) bool: which of the vocabulary's ``class_names`` are in the scene's list ``present``.

    Names of the list outside the vocabulary are an error (a typo would silently drop a class)."""
    index = {n: i for i, n in enumerate(class_names)}
    unknown = [c for c in present if c not in index]
    if unknown:
        where = f" of scene {scene!r}" if scene else ""
        raise ValueError(f"scene labels{where} name classes outside the vocabulary: {unknown[:10]} "
                         f"(vocabulary: {', '.join(class_names)})")
    allowed = np.zeros(len(class_names), dtype=bool)
    allowed[[index[c] for c in present]] = True
    if not allowed.any():
        raise ValueError(f"scene {scene!r} has an empty class list")
    return allowed


def mask_scores(scores, allowed):
    """Scores (..., K) with absent classes set to :data:`MASKED_LOGIT`.

    ``allowed``: (K,) or broadcastable (..., K) bool (torch or NumPy); None returns ``scores``."""
    if allowed is None:
        return scores
    import torch

    if isinstance(scores, torch.Tensor):
        a = torch.as_tensor(allowed, dtype=torch.bool, device=scores.device)
        return scores.masked_fill(~a, MASKED_LOGIT)
    return np.where(np.asarray(allowed, bool), scores, MASKED_LOGIT)


def masked_text_labels(features, text, allowed=None, chunk: int = 65536):
    """Argmax of ``cos(features, text)`` over the allowed classes: (labels (N,) int64, scores (N,) f32).

    Args:
        features: (N, C) torch or NumPy.
        text: (K, C) class text embeddings.
        allowed: None (every class: :func:`sas_core.text.text_labels`), (K,) bool for the whole
            cloud, or (N, K) bool per row.
    Returns torch tensors on ``features``' device; an absent class is never returned.
    """
    import torch

    from sas_core.text import text_labels

    if allowed is None:
        return text_labels(features, text, normalize=True, chunk=chunk)
    f = torch.as_tensor(features)
    t = torch.nn.functional.normalize(torch.as_tensor(text).to(f.device, torch.float32), dim=1)
    a = torch.as_tensor(allowed, dtype=torch.bool, device=f.device)
    if a.shape[-1] != t.shape[0] or a.dim() not in (1, 2) or (a.dim() == 2 and a.shape[0] != f.shape[0]):
        raise ValueError(f"allowed classes {tuple(a.shape)} do not match {f.shape[0]} rows x {t.shape[0]} classes")
    if not bool(a.any(dim=-1).all()):
        raise ValueError("a row allows no class")
    labels = torch.empty(f.shape[0], dtype=torch.int64, device=f.device)
    scores = torch.empty(f.shape[0], dtype=torch.float32, device=f.device)
    for s in range(0, f.shape[0], max(1, int(chunk))):
        block = torch.nn.functional.normalize(f[s:s + chunk].float(), dim=1) @ t.t()
        block = mask_scores(block, a if a.dim() == 1 else a[s:s + chunk])
        scores[s:s + chunk], labels[s:s + chunk] = block.max(dim=1)
    return labels, scores


def scene_class_masks(scenes: Sequence, class_names: Sequence[str]) -> Dict[str, Optional[np.ndarray]]:
    """{scene name: (K,) bool or None} from the ``classes`` of :class:`~sas_core.train.datasets.SceneData`."""
    return {s.name: (None if getattr(s, "classes", None) is None else class_mask(s.classes, class_names, s.name))
            for s in scenes}


def attach_scene_labels(scenes: Sequence, labels: Mapping[str, Sequence[str]], class_names: Sequence[str],
                        require_any: bool = True) -> list:
    """Set ``scene.classes`` from ``labels`` ({scene: names}) on every scene found there (checked against
    ``class_names``); returns the names of the scenes that have no list. ``require_any``: raise when
    no scene matched (a wrong folder, or names that do not match)."""
    missing = []
    for s in scenes:
        if s.name in labels:
            class_mask(labels[s.name], class_names, s.name)  # validate now, not mid-training
            s.classes = tuple(labels[s.name])
        else:
            missing.append(s.name)
    if require_any and scenes and len(missing) == len(scenes):
        raise ValueError(f"no scene label list matches these scenes (first: {missing[:3]}; lists for "
                         f"{sorted(labels)[:3]}...)")
    return missing


def scene_list(labels: Mapping[str, Sequence[str]], scene: str, source: str = "") -> Tuple[str, ...]:
    """The list of ``scene`` in ``labels``; a single list (one ``.labels.txt`` file given) applies to
    any scene. Raises KeyError naming the scenes that have one."""
    if scene in labels:
        return tuple(labels[scene])
    if len(labels) == 1:
        return tuple(next(iter(labels.values())))
    raise KeyError(f"no scene label list for {scene!r} in {source or 'the scene labels'} "
                   f"(lists for: {', '.join(sorted(labels)[:5])}{' ...' if len(labels) > 5 else ''})")
