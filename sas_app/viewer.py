"""The `sas view` web viewer: a labelled map in the browser, with a text box that asks it questions.

Built on ``viser`` (a three.js client served from its wheel, GUI widgets, a websocket to Python;
imported inside functions). One :class:`Viewer` draws a :class:`ViewScene` (positions, RGB,
labels, label scores, optional features, camera trajectory) and answers queries through a
backend:

* :class:`OfflineBackend`: a map folder / PLY / OpenScene ``.pth`` read into a :class:`ViewScene`
  (:func:`load_view_scene`); relevance is the cosine of every point's feature with the text
  embedding of the map's text encoder (the checkpoint's, as ``sas query`` uses it, or the
  synthetic text space), objects are :func:`sas_core.instances.instances_for_query` over the
  points above the threshold (what ``Mapper.query`` returns as objects).
* ``sas_ros.live_view.LiveMapClient`` wrapped by :class:`LiveBackend` (``sas view --ros``): the
  node's ``~/labelled_cloud`` as it updates, ``~/query`` and ``~/set_vocabulary`` calls.

GUI (right panel): Query text box (every change is queued; a worker answers the latest one),
relevance threshold slider, colour bar, the objects found; colour by RGB / label / score /
relevance; point size; points shown (a fixed random subset, so 1M+ maps stay interactive; see
``sas bench view`` for the figures); the vocabulary as a legend with one visibility checkbox per
class; the camera trajectory when the scene has one.

:func:`screenshot` drives a headless Chromium (Playwright, the system browser: :func:`find_browser`)
against the local server and saves the page as PNG.
"""

from __future__ import annotations

import html
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["COLOR_MODES", "LiveBackend", "OfflineBackend", "QueryView", "ViewScene", "Viewer", "browser_args",
           "find_browser", "load_view_scene", "open_page", "screenshot", "start_server", "stop_server",
           "synthetic_room_map"]

#: "Colour by" choices of the viewer (instance: the map's / cloud's object ids, when it has them).
COLOR_MODES = ("rgb", "label", "score", "instance", "relevance")
#: Colour of points below the relevance threshold (and of unlabelled points in label mode: the palette's).
DIM_COLOR = np.array((200, 200, 200), np.uint8)
RELEVANCE_CMAP = "turbo"
#: Environment variable naming the Chromium executable for screenshots and the browser test.
BROWSER_ENV = "SAS_CHROMIUM"


# ---------------------------------------------------------------------------------------- data

@dataclass
class ViewScene:
    """What the viewer draws.

    Attributes:
        positions: (N, 3) float32 points or voxel centres (map frame, metres).
        rgb: (N, 3) uint8 colours.
        labels: (N,) int64 class index into ``class_names`` (255 / -1 = none), or None.
        scores: (N,) float32 cosine of each point's label, or None.
        class_names: the vocabulary behind ``labels``.
        features: (N, D) float16 unit features (queries need them), or None.
        trajectory: (T, 4, 4) camera-to-map poses, or None.
        instance: (N,) int64 object id of each point (-1 = none; ``sas segment --instances``'s
            PLY property, a map's or the live cloud's ``instance``), or None.
        voxel_size: grid cell of the object grouping (the map's voxel size).
        source: a line saying where it came from.
        synthetic: the synthetic world's text space (outputs say so).
    """

    positions: np.ndarray
    rgb: np.ndarray
    labels: Optional[np.ndarray] = None
    scores: Optional[np.ndarray] = None
    class_names: List[str] = field(default_factory=list)
    features: Optional[np.ndarray] = None
    trajectory: Optional[np.ndarray] = None
    instance: Optional[np.ndarray] = None
    voxel_size: float = 0.05
    source: str = ""
    synthetic: bool = False

    def __len__(self) -> int:
        return int(len(self.positions))


@dataclass
class QueryView:
    """A query's answer as the viewer draws it.

    Attributes:
        text: the query text.
        threshold: the relevance threshold it was answered at.
        relevance: (N,) float32 relevance of every point of the scene (offline), or None.
        points, point_scores: (M, 3) / (M,) the matching points and their relevance (live: the
            node returns only these), or None when ``relevance`` covers every point.
        objects: per object a dict (score, n_points, box_center, box_size, box_yaw, aabb_min,
            aabb_max), best first (the keys of ``sas_ros.query_client.object_dict``).
        count: points at or above the threshold; best: the best relevance anywhere.
        message: a line for the GUI (errors included).
        ok: False when the query failed (``message`` says why).
    """

    text: str
    threshold: float
    relevance: Optional[np.ndarray] = None
    points: Optional[np.ndarray] = None
    point_scores: Optional[np.ndarray] = None
    objects: List[dict] = field(default_factory=list)
    count: int = 0
    best: float = float("nan")
    message: str = ""
    ok: bool = True


def _instance_dict(inst) -> dict:
    """A :class:`sas_core.instances.Instance` with the keys of ``sas_ros.query_client.object_dict``."""
    as_list = lambda v: [round(float(x), 3) for x in v]  # noqa: E731
    return dict(score=round(float(inst.score), 4), n_points=int(inst.n_points), centroid=as_list(inst.centroid),
                box_center=as_list(inst.obb_center), box_size=as_list(inst.obb_size),
                box_yaw=round(float(inst.obb_yaw), 4), aabb_min=as_list(inst.aabb_min),
                aabb_max=as_list(inst.aabb_max))


def read_trajectory(path) -> np.ndarray:
    """(T, 4, 4) camera-to-world poses: a ``.npy`` (T, 4, 4) array, or a folder of 4x4 text files
    (OpenScene's ``2d/<scene>/pose/<i>.txt``, read in numeric order; non-finite poses skipped)."""
    from sas_core.data.openscene import _read_matrix

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"), key=lambda p: (len(p.stem), p.stem))
        poses = [_read_matrix(f, "pose") for f in files]
        arr = np.stack([p for p in poses if p.shape == (4, 4) and np.isfinite(p).all()]) if poses else None
    elif path.is_file() and path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    else:
        raise FileNotFoundError(f"trajectory {path}: give a .npy (T, 4, 4) file or a folder of 4x4 pose .txt files")
    if arr is None or arr.ndim != 3 or arr.shape[1:] != (4, 4) or not len(arr):
        raise ValueError(f"trajectory {path}: expected (T, 4, 4) poses, got {None if arr is None else arr.shape}")
    return arr.astype(np.float64)


def _openscene_poses(pth: Path) -> Optional[Path]:
    """``<root>/2d/<scene>/pose`` of an OpenScene ``<root>/<split>/<scene>.pth``, when it exists."""
    folder = pth.parent.parent / "2d" / pth.stem / "pose"
    return folder if folder.is_dir() else None


def load_view_scene(path, segmenter=None, vocabulary: Optional[Sequence[str]] = None,
                    trajectory=None, progress: bool = False) -> ViewScene:
    """Read what ``sas view`` shows.

    Args:
        path: a map folder (``~/save_map``, ``sas replay``: ``map.npz`` checked against its
            manifest, features included when the map has them), a PLY (``sas segment`` output:
            ``label`` / ``score`` properties), an OpenScene ``.pth`` or any cloud
            :func:`sas_core.infer.load_point_cloud` reads.
        segmenter: a :class:`sas_core.infer.Segmenter` (``--checkpoint``): computes the features
            of a cloud that has none, and labels it when it has no labels (or ``vocabulary`` is given).
        vocabulary: class names of the labels (default: the map's; a PLY / .pth: required to name
            its labels, else "class 0", ...).
        trajectory: a trajectory file or folder (:func:`read_trajectory`); by default a map
            folder's ``trajectory.npy`` and a ``.pth``'s OpenScene ``2d/<scene>/pose``.
    """
    from sas_core.infer import load_point_cloud

    path = Path(path)
    names = list(vocabulary) if vocabulary else []
    feats = scores = instance = None
    voxel = 0.05
    if path.is_dir():
        from sas_core.geometry.voxel_map import map_arrays_path, read_map_manifest

        manifest = read_map_manifest(path)
        with np.load(map_arrays_path(path), allow_pickle=False) as z:
            data = {k: z[k] for k in z.files if k != "coords"}
        pos = np.asarray(data["positions"], np.float32)
        rgb = np.asarray(data["colors"])
        rgb = rgb if rgb.dtype == np.uint8 else np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
        labels = np.asarray(data["labels"], np.int64)
        scores = np.asarray(data["scores"], np.float32)
        feats = data.get("features")
        instance = data.get("instance")
        if feats is not None and (feats.ndim != 2 or len(feats) != len(pos) or feats.shape[1] == 0):
            feats = None
        if not names:
            names = [str(c) for c in (manifest.get("vocabulary") or data.get("class_names", []))]
        voxel = float(manifest.get("voxel_size", data["voxel_size"]))
        source = f"map {path} ({len(pos)} voxels of {voxel * 100:.0f} cm)"
        if trajectory is None and (path / "trajectory.npy").is_file():
            trajectory = path / "trajectory.npy"
    else:
        cloud = load_point_cloud(path)
        pos, labels = cloud.positions, cloud.labels
        rgb = (np.full((len(pos), 3), 160, np.uint8) if cloud.colors is None
               else np.clip(np.round(cloud.colors * 255), 0, 255).astype(np.uint8))
        if path.suffix.lower() == ".ply":
            from sas_core.io import read_ply

            d = read_ply(path)
            scores = d["score"].astype(np.float32) if "score" in d else None
            instance = d["instance"].astype(np.int64) if "instance" in d else None
        if path.suffix.lower() == ".pth" and trajectory is None:
            trajectory = _openscene_poses(path)
        if segmenter is not None:
            voxel = float(segmenter.config.voxel_size)
        source = f"cloud {path} ({len(pos)} points)"
    if segmenter is not None:
        if feats is None:
            feats = segmenter.features(pos, rgb.astype(np.float32) / 255.0, progress=progress)
            feats = feats.cpu().numpy().astype(np.float16) if hasattr(feats, "cpu") else np.asarray(feats, np.float16)
        elif feats.shape[1] != segmenter.dim:
            raise ValueError(f"{path}: the map's features have {feats.shape[1]} dims, the checkpoint's "
                             f"{segmenter.dim}: they are of different models")
        if labels is None or vocabulary:
            if not names:
                raise ValueError(f"{path} has no labels: give the vocabulary to label it with")
            segmenter.set_vocabulary(names)
            labels, scores = segmenter.classify(feats)
    if labels is not None and not names and len(labels):
        top = int(labels[labels < 255].max()) if (labels < 255).any() else -1
        names = [f"class {k}" for k in range(top + 1)]
    traj = read_trajectory(trajectory) if trajectory is not None else None
    return ViewScene(positions=np.ascontiguousarray(pos, np.float32), rgb=np.ascontiguousarray(rgb, np.uint8),
                     labels=labels, scores=scores, class_names=names, features=feats, trajectory=traj,
                     instance=None if instance is None or len(instance) != len(pos) else np.asarray(instance, np.int64),
                     voxel_size=voxel, source=source)


def synthetic_room_map(folder, seed: int = 3, n_frames: int = 12, text_dim: int = 64, overwrite: bool = False):
    """Write the map folder of a synthetic room as the live node builds it (mode fusion, the
    simulated teacher, ``text_dim``-dim synthetic text space; ``~/save_map``'s format) and its
    camera trajectory ``<folder>/trajectory.npy`` (T, 4, 4); returns the folder. For the tests,
    the README screenshot and trying the viewer: ``sas view FOLDER --synthetic-text``."""
    from sas_core.data.synthetic import SynthConfig, generate_scene
    from sas_core.io import atomic_path
    from sas_core.mapping import Mapper, MapperConfig

    room = generate_scene(SynthConfig(seed=int(seed), n_frames=int(n_frames), with_lidar=False))
    mapper = Mapper(MapperConfig(mode="fusion", vocabulary=",".join(room.class_names), text_dim=int(text_dim)))
    for f in room.frames:
        mapper.integrate_rgbd(f)
    mapper.label_pass(full=True)
    folder = mapper.save(folder, overwrite=overwrite)
    with atomic_path(Path(folder) / "trajectory.npy") as tmp:
        np.save(tmp, np.stack([f.pose for f in room.frames]))
    return folder


# ---------------------------------------------------------------------------------------- backends

class OfflineBackend:
    """Queries over a :class:`ViewScene` with features and a text encoder.

    Relevance: cosine of every point's (unit) feature with the text's embedding
    (:func:`sas_core.text.text_labels`, chunked); objects: the points at or above the threshold
    grouped on the voxel grid (:func:`sas_core.instances.instances_for_query` with
    :class:`sas_core.mapping.MapperConfig`'s ``object_min_points`` and ``query_max_objects``),
    best first. Requests are bounded as the node bounds them (:class:`sas_core.mapping.ServiceLimits`).
    """

    live = False

    def __init__(self, scene: ViewScene, encoder=None, template: str = "a {} in a scene"):
        from sas_core.mapping import MapperConfig, ServiceLimits

        self.scene = scene
        self.encoder = encoder
        self.template = template
        self.limits = ServiceLimits()
        cfg = MapperConfig()
        self.min_points, self.max_objects = int(cfg.object_min_points), int(cfg.query_max_objects)
        self.default_threshold = float(cfg.query_threshold)
        self.reason = ("" if encoder is not None and scene.features is not None else
                       "queries need features and a text encoder: " +
                       ("this file has no features (give --checkpoint)" if scene.features is None
                        else "give --checkpoint (its text encoder) or --synthetic-text (a synthetic-world map)"))

    @property
    def can_query(self) -> bool:
        return not self.reason

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        emb = self.encoder.encode(list(texts))
        emb = np.asarray(emb.float().cpu().numpy() if hasattr(emb, "cpu") else emb, np.float32)
        if emb.shape[1] != self.scene.features.shape[1]:
            raise ValueError(f"the text encoder gives {emb.shape[1]} dims, the features have "
                             f"{self.scene.features.shape[1]}: they are of different models")
        return emb

    def relevance(self, text: str) -> np.ndarray:
        """(N,) float32 cosine of every point with ``text`` (raises ValueError on an unknown text)."""
        from sas_core.text import check_texts, text_labels

        if not self.can_query:
            raise ValueError(self.reason)
        (text,) = check_texts([text], 1, self.limits.max_text_length)
        if not text.strip():
            raise ValueError("empty query text")
        _, sc = text_labels(self.scene.features, self._embed([text]), normalize=True)
        return sc.cpu().numpy().astype(np.float32)

    def query(self, text: str, threshold: float) -> QueryView:
        from sas_core.instances import instances_for_query

        try:
            rel = self.relevance(text)
        except ValueError as exc:
            return QueryView(text, threshold, ok=False, message=" ".join(str(exc).split()))
        index = np.flatnonzero(rel >= threshold)
        objects = instances_for_query(self.scene.positions, index=index, scores=rel[index],
                                      voxel_size=self.scene.voxel_size, min_points=self.min_points, name=text,
                                      max_instances=self.max_objects)
        best = float(rel.max()) if len(rel) else float("nan")
        return QueryView(text, threshold, relevance=rel, objects=[_instance_dict(o) for o in objects],
                         count=int(len(index)), best=best,
                         message=f"{len(index)} points >= {threshold:.2f}, best {best:.3f}, {len(objects)} objects")

    def set_vocabulary(self, names: Sequence[str]) -> str:
        """Relabel the scene with ``names`` (argmax of the class prompts' cosines); returns a line."""
        from sas_core.text import check_vocabulary, class_embeddings, text_labels

        if not self.can_query:
            raise ValueError(self.reason)
        names = list(check_vocabulary(names, self.limits.max_vocabulary, self.limits.max_text_length))
        if not names:
            raise ValueError("no class names")
        emb = class_embeddings(self.encoder, names, self.template)
        labels, scores = text_labels(self.scene.features, emb.float(), normalize=True)
        self.scene.labels, self.scene.scores = labels.cpu().numpy().astype(np.int64), scores.cpu().numpy()
        self.scene.class_names = names
        return f"vocabulary set to {len(names)} classes"

    def snapshot(self):
        """``(version, scene)``: an offline scene never changes by itself (version 0)."""
        return 0, self.scene


class LiveBackend:
    """``sas view --ros``: a :class:`sas_ros.live_view.LiveMapClient` as a viewer backend."""

    live = True
    can_query = True
    reason = ""

    def __init__(self, client, default_threshold: float = 0.0):
        self.client = client
        self.default_threshold = float(default_threshold)
        self._version, self._scene = -1, None

    def snapshot(self):
        """``(version, scene)`` of the node's latest ``~/labelled_cloud`` (None before the first)."""
        version, cloud, names = self.client.latest()
        if cloud is None:
            return version, None
        if version != self._version:
            self._scene = ViewScene(positions=cloud["positions"], rgb=cloud["colors"], labels=cloud.get("labels"),
                                    scores=cloud.get("scores"), class_names=list(names), instance=cloud.get("instance"),
                                    source=f"live node {self.client.node_name}")
            self._version = version
        return version, self._scene

    def query(self, text: str, threshold: float) -> QueryView:
        try:
            ans = self.client.query(text, threshold)
        except (TimeoutError, ValueError, RuntimeError) as exc:
            return QueryView(text, threshold, ok=False, message=" ".join(str(exc).split()))
        if not ans["success"]:
            return QueryView(text, threshold, ok=False, message=ans["message"])
        q = ans["queries"][0]
        scores = np.asarray(q["scores"], np.float32)
        # threshold 0 asks for the node's default: colour from the lowest score it returned
        used = float(scores.min()) if len(scores) and threshold == 0.0 else threshold
        return QueryView(text, used, points=np.asarray(q["points"], np.float32).reshape(-1, 3),
                         point_scores=scores, objects=q["objects"], count=q["count"],
                         best=q["best_score"], message=f"{q['count']} points >= threshold, best {q['best_score']:.3f}, "
                                                       f"{len(q['objects'])} objects (node)")

    def set_vocabulary(self, names: Sequence[str]) -> str:
        return self.client.set_vocabulary(list(names))


# ---------------------------------------------------------------------------------------- colours

def _cmap_colors(x: np.ndarray, cmap: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[cmap](np.clip(x, 0.0, 1.0))[:, :3] * 255).astype(np.uint8)


def colorbar_html(lo: float, hi: float, cmap: str = RELEVANCE_CMAP, title: str = "relevance") -> str:
    """An HTML colour bar from ``lo`` to ``hi`` (CSS gradient of the colormap)."""
    stops = _cmap_colors(np.linspace(0, 1, 11), cmap)
    grad = ", ".join(f"rgb({r},{g},{b})" for r, g, b in stops.tolist())
    return (f'<div style="font-size:0.8em">{html.escape(title)}'
            f'<div style="height:12px;border-radius:3px;background:linear-gradient(to right, {grad})"></div>'
            f'<div style="display:flex;justify-content:space-between"><span>{lo:.2f}</span>'
            f'<span>{hi:.2f}</span></div></div>')


def legend_html(names: Sequence[str], counts: np.ndarray) -> str:
    """The vocabulary with each class's colour (the label palette) and point count."""
    from sas_core.viz import label_palette

    pal = label_palette()
    rows = []
    for k, name in enumerate(names):
        r, g, b = pal[k % 255].tolist()
        n = int(counts[k]) if k < len(counts) else 0
        rows.append(f'<div class="sas-legend-row" style="display:flex;align-items:center;gap:6px;font-size:0.8em">'
                    f'<span style="display:inline-block;width:12px;height:12px;background:rgb({r},{g},{b})"></span>'
                    f'<span class="sas-legend-name">{html.escape(name)}</span>'
                    f'<span style="margin-left:auto;color:#888">{n}</span></div>')
    return '<div class="sas-legend">' + "".join(rows) + "</div>"


def _yaw_wxyz(yaw: float) -> tuple:
    return (float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2)))


def _rotation_wxyz(R: np.ndarray) -> tuple:
    from sas_core.data.msg_codec import matrix_to_quaternion

    x, y, z, w = matrix_to_quaternion(np.asarray(R, np.float64)).tolist()
    return (w, x, y, z)


# ---------------------------------------------------------------------------------------- viewer

class Viewer:
    """The viewer on a viser server (see the module docstring).

    Args:
        server: a ``viser.ViserServer``.
        backend: :class:`OfflineBackend` or :class:`LiveBackend`.
        max_points: points shown at most (a fixed random subset of the scene; the GUI changes it).
        point_size: initial point size in metres (default: the scene's voxel size).
        threshold: initial relevance threshold (default: the backend's).
    """

    def __init__(self, server, backend, max_points: int = 1_000_000, point_size: Optional[float] = None,
                 threshold: Optional[float] = None, poll: float = 0.5):
        self.server = server
        self.backend = backend
        self.lock = threading.RLock()
        self.query_view: Optional[QueryView] = None
        self.n_draws = 0
        self.drawn_query: Optional[str] = None  # the query the last redraw showed
        self._pending: Optional[str] = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._version = None
        self._order = np.zeros(0, np.int64)
        self._framed = False
        self._legend_names: List[str] = []
        self._class_boxes: list = []
        self._object_nodes: list = []
        self._traj_nodes: list = []
        self.scene: Optional[ViewScene] = None
        server.scene.set_up_direction("+z")
        version, scene = backend.snapshot()
        voxel = scene.voxel_size if scene is not None else 0.05
        self._build_gui(max_points, point_size or voxel, backend.default_threshold if threshold is None else threshold)
        if scene is not None:
            self._set_scene(version, scene)
        self._worker = threading.Thread(target=self._work, name="sas-view-query", daemon=True)
        self._worker.start()
        self._poller = None
        if backend.live:
            self._poller = threading.Thread(target=self._poll, args=(poll,), name="sas-view-live", daemon=True)
            self._poller.start()

    # ------------------------------------------------------------------ GUI
    def _build_gui(self, max_points: int, point_size: float, threshold: float) -> None:
        gui = self.server.gui
        self.info = gui.add_markdown("loading ...")
        self.query_box = gui.add_text("Query", initial_value="", hint="free text, e.g. \"a chair\"; Enter or any "
                                                                     "change runs it",
                                      disabled=not self.backend.can_query)
        self.threshold = gui.add_slider("Threshold", min=-1.0, max=1.0, step=0.01, initial_value=float(threshold))
        self.clear_button = gui.add_button("Clear query")
        self.colorbar = gui.add_html("", visible=False)
        self.result = gui.add_markdown(self.backend.reason and f"*{self.backend.reason}*")
        self.color_by = gui.add_dropdown("Colour by", options=COLOR_MODES, initial_value="rgb")
        self.point_size = gui.add_slider("Point size (m)", min=0.002, max=0.2, step=0.002,
                                         initial_value=float(np.clip(point_size, 0.002, 0.2)))
        self.max_points = gui.add_number("Points shown", initial_value=int(max_points), min=1000, step=1000)
        self.show_boxes = gui.add_checkbox("Object boxes", initial_value=True)
        self.show_traj = gui.add_checkbox("Trajectory", initial_value=True, visible=False)
        if self.backend.can_query:
            self.vocab_box = gui.add_text("Vocabulary", initial_value="", hint="comma-separated class names")
            self.vocab_button = gui.add_button("Set vocabulary")
            self.vocab_button.on_click(lambda _: self._set_vocabulary())
        self.legend_folder = gui.add_folder("Classes")
        with self.legend_folder:
            self.legend = gui.add_html("")
        self.visible_folder = gui.add_folder("Show classes", expand_by_default=False)

        self.query_box.on_update(lambda _: self.submit(self.query_box.value))
        self.threshold.on_update(lambda _: self.submit(self.query_box.value) if self.query_box.value.strip() else None)
        self.clear_button.on_click(lambda _: self.clear_query())
        for h in (self.color_by, self.point_size, self.max_points, self.show_boxes, self.show_traj):
            h.on_update(lambda _: self.redraw())

    def _build_legend(self, names: List[str]) -> None:
        for box in self._class_boxes:
            box.remove()
        self._class_boxes = []
        with self.visible_folder:
            for name in names:
                box = self.server.gui.add_checkbox(name, initial_value=True, hint=f"show the points labelled {name}")
                box.on_update(lambda _: self.redraw())
                self._class_boxes.append(box)
        self._legend_names = list(names)

    # ------------------------------------------------------------------ state
    def _set_scene(self, version, scene: ViewScene) -> None:
        with self.lock:
            self.scene = scene
            self._version = version
            n = len(scene)
            if len(self._order) != n:  # a fixed random order: the first k are the k points shown
                self._order = np.random.default_rng(0).permutation(n)
            if list(scene.class_names) != self._legend_names:
                self._build_legend(list(scene.class_names))
            if not self._framed and n:
                self._frame_camera(scene)
            if scene.trajectory is not None:
                self._draw_trajectory(scene.trajectory)
            if self.query_view is not None and self.query_view.relevance is not None \
                    and len(self.query_view.relevance) != n:
                self.query_view = None
            self.redraw()

    def _frame_camera(self, scene: ViewScene) -> None:
        lo, hi = np.percentile(scene.positions, [1, 99], axis=0)
        centre, extent = (lo + hi) / 2, float(np.max(hi - lo))
        cam = self.server.initial_camera
        cam.look_at = tuple(float(v) for v in centre)
        cam.position = tuple(float(v) for v in centre + np.array([-0.45, -0.6, 0.65]) * max(extent, 1.0))
        cam.up = (0.0, 0.0, 1.0)
        for client in self.server.get_clients().values():
            client.camera.look_at, client.camera.position = cam.look_at, cam.position
        self._framed = True

    def _draw_trajectory(self, traj: np.ndarray) -> None:
        if self._traj_nodes:
            return
        self.show_traj.visible = True
        vis = bool(self.show_traj.value)
        centres = traj[:, :3, 3].astype(np.float32)
        if len(centres) >= 2:
            seg = np.stack([centres[:-1], centres[1:]], 1)
            self._traj_nodes.append(self.server.scene.add_line_segments(
                "/trajectory/path", seg, colors=(255, 120, 0), thickness=2.0, thickness_units="screen", visible=vis))
        step = max(1, len(traj) // 20)  # at most ~20 camera frames drawn
        for i, T in enumerate(traj[::step]):
            self._traj_nodes.append(self.server.scene.add_camera_frustum(
                f"/trajectory/frames/{i}", fov=1.0, aspect=4 / 3, scale=0.1, color=(255, 120, 0),
                wxyz=_rotation_wxyz(T[:3, :3]), position=tuple(float(v) for v in T[:3, 3]), visible=vis))

    def submit(self, text: str) -> None:
        """Queue a query (the worker answers the latest; an empty text clears it)."""
        with self.lock:
            self._pending = str(text)
        self._wake.set()

    def clear_query(self) -> None:
        with self.lock:
            self.query_view = None
            self.query_box.value = ""
            self._pending = None
        self.redraw()

    def query_now(self, text: str) -> QueryView:
        """Answer ``text`` at the slider's threshold now (what the text box does), and redraw."""
        text = str(text)
        if not text.strip():
            with self.lock:
                self.query_view = None
            self.redraw()
            return None
        view = self.backend.query(text, float(self.threshold.value))
        with self.lock:
            if view.ok:
                self.query_view = view
                if self.color_by.value != "relevance":
                    self.color_by.value = "relevance"  # its on_update redraws too
            self.result.content = self._result_markdown(view)
        self.redraw()
        return view

    def _set_vocabulary(self) -> None:
        names = [n.strip() for n in self.vocab_box.value.split(",") if n.strip()]
        try:
            msg = self.backend.set_vocabulary(names)
        except ValueError as exc:
            msg = f"vocabulary unchanged: {' '.join(str(exc).split())}"
        self.result.content = html.escape(str(msg))
        if not self.backend.live:
            self._legend_names = []
            self._set_scene(self._version, self.scene)

    def _work(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(0.2):
                continue
            self._wake.clear()
            with self.lock:
                text, self._pending = self._pending, None
            if text is None:
                continue
            try:
                self.query_now(text)
            except Exception as exc:  # noqa: BLE001 - the viewer keeps serving; the GUI shows the problem
                self.result.content = f"query failed: {html.escape(type(exc).__name__)}: {html.escape(str(exc)[:200])}"

    def _poll(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                version, scene = self.backend.snapshot()
                if scene is not None and version != self._version:
                    self._set_scene(version, scene)
            except Exception as exc:  # noqa: BLE001
                self.info.content = f"live update failed: {html.escape(str(exc)[:200])}"

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._worker.join(timeout=5)
        if self._poller is not None:
            self._poller.join(timeout=5)

    @staticmethod
    def _result_markdown(view: QueryView) -> str:
        if not view.ok:
            return f"**{html.escape(view.text)}**: {html.escape(view.message)}"
        lines = [f"**{html.escape(view.text)}**: {html.escape(view.message)}"]
        for k, o in enumerate(view.objects[:10]):
            c = o["box_center"]
            lines.append(f"- #{k} score {o['score']:.3f}, {o['n_points']} pts at ({c[0]:.2f}, {c[1]:.2f}, {c[2]:.2f})")
        return "\n".join(lines)

    # ------------------------------------------------------------------ drawing
    def shown_indices(self) -> np.ndarray:
        """Indices of the points drawn: the first ``Points shown`` of a fixed random order, less the
        classes whose checkbox is off."""
        scene = self.scene
        idx = self._order
        if scene.labels is not None and self._class_boxes:
            visible = np.ones(256, bool)
            for k, box in enumerate(self._class_boxes[:255]):
                visible[k] = bool(box.value)
            lab = scene.labels[idx]
            ok = (lab < 0) | (lab >= 256)
            ok |= visible[np.clip(lab, 0, 255)]
            idx = idx[ok]
        return idx[: max(1, int(self.max_points.value))]

    def colors(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), 3) uint8 colours of the chosen mode."""
        from sas_core.viz import label_colors

        scene, mode, view = self.scene, self.color_by.value, self.query_view
        if mode == "label" and scene.labels is not None:
            return label_colors(scene.labels[idx])
        if mode == "instance" and scene.instance is not None:
            inst = scene.instance[idx]
            return np.where((inst < 0)[:, None], DIM_COLOR, label_colors(np.where(inst < 0, 0, inst % 251 + 4)))
        if mode == "score" and scene.scores is not None:
            s = scene.scores[idx]
            return _cmap_colors((s - np.nanmin(scene.scores)) / max(float(np.ptp(scene.scores)), 1e-6), "viridis")
        if mode == "relevance" and view is not None and view.relevance is not None:
            rel = view.relevance[idx]
            lo, hi = view.threshold, max(view.best, view.threshold + 1e-3)
            out = _cmap_colors((rel - lo) / (hi - lo), RELEVANCE_CMAP)
            below = rel < lo
            out[below] = (0.3 * scene.rgb[idx][below] + 0.7 * DIM_COLOR).astype(np.uint8)  # context, faded
            return out
        if mode == "relevance" and view is not None:  # live: the node's matches are drawn on top
            return (0.35 * scene.rgb[idx] + 0.65 * DIM_COLOR).astype(np.uint8)
        return scene.rgb[idx]

    def redraw(self) -> None:
        """Draw the scene with the GUI's current settings (points, colours, boxes, colour bar)."""
        with self.lock:
            scene = self.scene
            if scene is None:
                self.info.content = "waiting for the first cloud ..."
                return
            idx = self.shown_indices()
            cols = self.colors(idx)
            pts = scene.positions[idx]
            centre = scene.positions.mean(0) if len(scene) else np.zeros(3, np.float32)
            size = float(self.point_size.value)
            # float16 on the wire, relative to the centre (cm precision up to ~20 m from it)
            self.server.scene.add_point_cloud("/map", (pts - centre).astype(np.float32), cols, point_size=size,
                                              position=tuple(float(v) for v in centre), point_shape="square",
                                              point_shading="flat")
            view = self.query_view
            live_pts = view is not None and view.points is not None and self.color_by.value == "relevance"
            if live_pts and len(view.points):
                lo, hi = view.threshold, max(view.best, view.threshold + 1e-3)
                self.server.scene.add_point_cloud("/query_points", view.points.astype(np.float32),
                                                  _cmap_colors((view.point_scores - lo) / (hi - lo), RELEVANCE_CMAP),
                                                  point_size=size * 1.3, point_shading="flat")
            else:
                self.server.scene.add_point_cloud("/query_points", np.zeros((1, 3), np.float32), (0, 0, 0),
                                                  point_size=size, visible=False)
            self._draw_objects(view if (view is not None and self.show_boxes.value
                                        and self.color_by.value == "relevance") else None)
            if self.color_by.value == "relevance" and view is not None:
                self.colorbar.content = colorbar_html(view.threshold, max(view.best, view.threshold))
                self.colorbar.visible = True
            elif self.color_by.value == "score" and scene.scores is not None and len(scene):
                self.colorbar.content = colorbar_html(float(np.nanmin(scene.scores)), float(np.nanmax(scene.scores)),
                                                      "viridis", "label score")
                self.colorbar.visible = True
            else:
                self.colorbar.visible = False
            if scene.labels is not None and self._legend_names:
                k = len(self._legend_names)
                lab = scene.labels[(scene.labels >= 0) & (scene.labels < k)]
                self.legend.content = legend_html(self._legend_names, np.bincount(lab, minlength=k))
            for h in self._traj_nodes:
                h.visible = bool(self.show_traj.value)
            self.info.content = (f"{html.escape(scene.source)}  \n{len(idx):,} of {len(scene):,} points shown"
                                 + ("  \n*synthetic text space*" if scene.synthetic else ""))
            self.n_draws += 1
            self.drawn_query = None if view is None else view.text

    def _draw_objects(self, view: Optional[QueryView]) -> None:
        for node in self._object_nodes:
            node.remove()
        self._object_nodes = []
        if view is None:
            return
        for k, o in enumerate(view.objects):
            size = np.maximum(np.asarray(o["box_size"], np.float64), 0.02)
            box = self.server.scene.add_box(f"/objects/{k}", color=(255, 40, 40), dimensions=tuple(size),
                                            wireframe=True, position=tuple(o["box_center"]),
                                            wxyz=_yaw_wxyz(float(o["box_yaw"])))
            top = np.asarray(o["box_center"], np.float64) + [0, 0, size[2] / 2 + 0.05]
            label = self.server.scene.add_label(f"/objects/{k}_label", f"{view.text} {o['score']:.2f}",
                                                position=tuple(float(v) for v in top), anchor="bottom-center")
            self._object_nodes += [box, label]


# ---------------------------------------------------------------------------------------- server, browser

def start_server(host: str = "127.0.0.1", port: int = 8080, verbose: bool = False):
    """A ``viser.ViserServer`` on ``host:port`` (viser takes the next free port when it is taken;
    ``server.get_port()`` says which). viser's banner, which it prints to stdout whatever
    ``verbose`` says, is kept out of stdout (``--json`` outputs stay one JSON object)."""
    import contextlib
    import io

    import viser

    with contextlib.redirect_stdout(io.StringIO()):
        return viser.ViserServer(host=host, port=int(port), verbose=verbose)


def stop_server(server) -> None:
    """``server.stop()`` without viser's "Server stopped" line on stdout."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        server.stop()


def find_browser() -> Optional[str]:
    """The Chromium executable: ``$SAS_CHROMIUM``, else ``chromium`` / ``chromium-browser`` /
    ``google-chrome`` on the PATH (Debian's ``chromium``: ``apt-get install chromium``), else None."""
    env = os.environ.get(BROWSER_ENV)
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_args() -> List[str]:
    """Chromium flags: WebGL on the CPU (SwiftShader) so a headless server without a GPU renders,
    and no sandbox when running as root (these machines)."""
    args = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")
    return args


def open_page(playwright, url: str, width: int = 1280, height: int = 800, init_script: Optional[str] = None):
    """``(browser, page)``: headless Chromium (:func:`find_browser`) showing ``url``."""
    exe = find_browser()
    if exe is None:
        raise FileNotFoundError("no Chromium found: install Debian's chromium (`apt-get install chromium`; "
                                f"scripts/setup_env.sh does) or set {BROWSER_ENV} to a Chromium executable")
    browser = playwright.chromium.launch(executable_path=exe, headless=True, args=browser_args())
    page = browser.new_page(viewport={"width": int(width), "height": int(height)})
    if init_script:
        page.add_init_script(init_script)
    page.goto(url)
    return browser, page


def wait_for_client(server, timeout: float = 30.0, known: Sequence[int] = ()):
    """The first viser client (browser tab) that is not in ``known``; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for cid, client in server.get_clients().items():
            if cid not in known:
                return client
        time.sleep(0.05)
    raise TimeoutError(f"no browser connected to the viewer within {timeout:.0f} s")


def hide_notifications(page) -> None:
    """Hide viser's toasts (the 'software WebGL' warning of a GPU-less headless browser) from the page."""
    page.add_style_tag(content=".mantine-Notifications-root, .mantine-Notification-root { display: none !important; }")


def screenshot(server, viewer: Viewer, out, query: Optional[str] = None, width: int = 1280, height: int = 800,
               timeout: float = 60.0, color_by: Optional[str] = None) -> dict:
    """Render the viewer once in headless Chromium and save the page as PNG ``out`` (atomically).

    The page is the real client (the 3D view and the GUI panel); the query runs through the same
    path as the text box; ``color_by`` (one of :data:`COLOR_MODES`) is applied after it. Returns
    ``dict(seconds, url)``.
    """
    from playwright.sync_api import sync_playwright

    from sas_core.io import atomic_path

    url = f"http://127.0.0.1:{server.get_port()}/"
    t0 = time.perf_counter()
    with sync_playwright() as p:
        browser, page = open_page(p, url, width, height)
        try:
            client = wait_for_client(server, timeout)
            if query:
                viewer.query_box.value = query  # shows the text in the box
                view = viewer.query_now(query)
                if view is not None and not view.ok:
                    raise ValueError(f"query {query!r}: {view.message}")
            if color_by:
                viewer.color_by.value = color_by
                viewer.redraw()
            client.get_render(height=64, width=64, timeout=timeout)  # every message so far is applied
            page.wait_for_timeout(500)
            hide_notifications(page)
            page.wait_for_timeout(200)
            with atomic_path(out, suffix=".png") as tmp:
                page.screenshot(path=str(tmp))
        finally:
            browser.close()
    return dict(seconds=round(time.perf_counter() - t0, 2), url=url)
