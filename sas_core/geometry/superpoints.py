"""Superpoints: ScanNet's segmentator (Felzenszwalb-Huttenlocher graph segmentation on normals).

The algorithm follows ScanNet's ``Segmentator/segmentator.cpp``:

1. Graph. On a mesh, each triangle (i1, i2, i3) gives the directed edges (i1, i2), (i1, i3),
   (i3, i2); vertex normals are the running mean of the unit normals of the incident triangles
   (not re-normalised). On a point cloud (no mesh) the graph is the k-nearest-neighbour graph
   (directed edges i -> j for the k nearest j of i) and normals are given or estimated with Open3D.
2. Weights, convexity-aware: for an edge a -> b with normals n_a, n_b and unit direction
   d = (p_b - p_a) / |p_b - p_a|, ``w = 1 - n_a . n_b``, squared when ``n_b . d > 0`` (a convex
   crease, so convex regions with differing normals still join easily).
3. Felzenszwalb-Huttenlocher: edges in non-decreasing weight order; two components A, B joined
   by edge w merge when ``w <= T(A)`` and ``w <= T(B)``, where ``T = kThresh`` initially and
   ``T(merged) = w + kThresh / |merged|``. Union-find with union by rank (numba).
4. Small segments: one more pass over the sorted edges joins any two different components when
   either has fewer than ``segMinVerts`` vertices.

``method="points"`` makes every point its own superpoint (outdoor LiDAR, as SAS does on nuScenes).
Superpoint ids returned here are contiguous 0..S-1 (ScanNet writes union-find root ids).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from sas_core.config import opt


@dataclass
class SuperpointConfig:
    """Parameters of :func:`superpoints`."""

    method: str = opt("graph", "'graph' (ScanNet segmentator) or 'points' (each point its own superpoint)",
                      choices=("graph", "points"))
    k_thresh: float = opt(0.01, "Felzenszwalb constant c (ScanNet's kThresh)")
    min_verts: int = opt(60, "segments smaller than this are merged into a neighbour (segMinVerts)")
    knn: int = opt(8, "neighbours per point for the point-cloud graph (no mesh)")
    max_edge: Optional[float] = opt(None, "drop kNN edges longer than this (m); None: 4 x median 1-NN distance")
    normal_knn: int = opt(16, "neighbours for Open3D normal estimation when normals are missing")
    color_weight: float = opt(0.0, "add this x |RGB difference| to edge weights (0 = ScanNet's segmentator)")


def superpoints(points, normals=None, mesh_triangles=None, k_thresh: float = 0.01, min_verts: int = 60,
                knn: int = 8, method: str = "graph", max_edge: Optional[float] = None,
                normal_knn: int = 16, colors=None, color_weight: float = 0.0) -> np.ndarray:
    """Segment a mesh or a point cloud into superpoints.

    Args:
        points: (N, 3) float vertex / point positions.
        normals: optional (N, 3) float normals. With a mesh and no normals they are computed from
            the triangles as ScanNet does; without a mesh and no normals Open3D estimates them
            (oriented consistently over the tangent-plane graph).
        mesh_triangles: optional (T, 3) integer vertex indices; when given the graph is the mesh.
        k_thresh: Felzenszwalb constant (ScanNet's kThresh).
        min_verts: minimum segment size (ScanNet's segMinVerts).
        knn: neighbours per point of the point-cloud graph.
        method: "graph" or "points" (identity: superpoint i = point i).
        max_edge: longest kNN edge kept (metres); None picks 4x the median nearest-neighbour spacing
            so separate surfaces with parallel normals are not bridged.
        normal_knn: neighbours used to estimate missing normals.
        colors: optional (N, 3) float RGB in [0, 1], used when ``color_weight`` > 0.
        color_weight: adds ``color_weight * |c_a - c_b|`` to every edge weight (an extension, not in
            ScanNet's segmentator; 0 disables it). It separates coplanar neighbours that normals
            cannot (a picture or a window a few mm proud of its wall) on kNN graphs.
            Needs ``colors``.

    Returns:
        (N,) int64 superpoint id per point, contiguous in 0..S-1 (ordered by first occurrence).
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got {points.shape}")
    n = len(points)
    if method == "points":
        return np.arange(n, dtype=np.int64)
    if method != "graph":
        raise ValueError(f"method must be 'graph' or 'points', got {method!r}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.isfinite(points).all():
        raise ValueError("points contain NaN or infinite coordinates")
    if k_thresh <= 0 or min_verts < 0:
        raise ValueError(f"k_thresh must be > 0 and min_verts >= 0, got {k_thresh}, {min_verts}")
    if normals is not None:
        normals = np.asarray(normals, dtype=np.float64)
        if normals.shape != points.shape:
            raise ValueError(f"normals are {normals.shape}, points are {points.shape}")
        if not np.isfinite(normals).all():
            raise ValueError("normals contain NaN or infinite values")

    if mesh_triangles is not None:
        tri = np.asarray(mesh_triangles)
        if tri.ndim != 2 or tri.shape[1] != 3 or not np.issubdtype(tri.dtype, np.integer):
            raise ValueError(f"mesh_triangles must be (T, 3) integers, got {tri.shape} {tri.dtype}")
        if tri.size and (tri.min() < 0 or tri.max() >= n):
            raise ValueError(f"mesh_triangles index outside [0, {n})")
        tri = tri.astype(np.int64)
        if normals is None:
            normals = mesh_vertex_normals(points, tri)
        a = np.stack([tri[:, 0], tri[:, 0], tri[:, 2]], axis=1).reshape(-1)
        b = np.stack([tri[:, 1], tri[:, 2], tri[:, 1]], axis=1).reshape(-1)
    else:
        if normals is None:
            normals = estimate_normals(points, normal_knn)
        a, b = knn_edges(points, knn, max_edge)

    w = edge_weights(points, normals, a, b)
    if color_weight:
        if colors is None:
            raise ValueError("color_weight > 0 needs colors")
        colors = np.asarray(colors, dtype=np.float32)
        if colors.shape != points.shape:
            raise ValueError(f"colors are {colors.shape}, points are {points.shape}")
        w = (w + np.float32(color_weight) * np.linalg.norm(colors[a] - colors[b], axis=1)).astype(np.float32)
    order = np.argsort(w, kind="stable")
    roots = _segment_graph(n, a[order], b[order], w[order], np.float32(k_thresh), int(min_verts))
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    # relabel so ids follow the first point of each segment (deterministic, independent of roots)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def mesh_vertex_normals(vertices, triangles) -> np.ndarray:
    """(V, 3) float64 vertex normals as ScanNet's segmentator computes them.

    The mean of the unit normals of a vertex's triangles, not re-normalised (so creases give
    shorter normals). Degenerate triangles contribute a zero normal. Unused vertices get (0, 0, 0).
    """
    v = np.asarray(vertices, dtype=np.float64)
    t = np.asarray(triangles, dtype=np.int64)
    fn = np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]])
    length = np.linalg.norm(fn, axis=1, keepdims=True)
    fn = np.divide(fn, length, out=np.zeros_like(fn), where=length > 0)
    acc = np.zeros_like(v)
    np.add.at(acc, t.reshape(-1), np.repeat(fn, 3, axis=0))
    count = np.bincount(t.reshape(-1), minlength=len(v)).astype(np.float64)
    return acc / np.maximum(count, 1)[:, None]


def estimate_normals(points, knn: int = 16, viewpoint=None) -> np.ndarray:
    """(N, 3) float64 unit normals: Open3D PCA over ``knn`` neighbours, signs made consistent.

    The segmentator compares normal directions (not just lines), so signs matter. They are
    propagated over a minimum spanning tree of the kNN graph weighted by ``1 - |n_i . n_j|``
    (Hoppe et al. 1992; Open3D's own ``orient_normals_consistent_tangent_plane`` takes minutes on
    100k points), and each connected part is then flipped so that most of its normals face
    ``viewpoint`` (default: the centre of the bounding box, i.e. into an indoor room, out of the
    objects standing in it). Pass oriented normals when you have them (meshes, depth images).
    """
    import open3d as o3d
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree

    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    k = int(max(3, min(knn, n - 1)))
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(k))
    normals = np.asarray(pcd.normals, dtype=np.float64).copy()
    if n < 3:
        return normals
    a, b = knn_edges(pts, min(k, 10), np.inf)
    w = 1.0 - np.abs(np.einsum("ij,ij->i", normals[a], normals[b])) + 1e-6   # > 0: zeros are "no edge"
    tree = minimum_spanning_tree(coo_matrix((w, (a, b)), shape=(n, n)).tocsr()).tocoo()
    n_comp, comp = connected_components(tree, directed=False)
    roots = np.unique(comp, return_index=True)[1]
    # one virtual node linked to a root of every part, so a single BFS reaches all points
    rows = np.r_[tree.row, np.full(n_comp, n)]
    cols = np.r_[tree.col, roots]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n + 1, n + 1)).tocsr()
    _, pred = breadth_first_order(graph, n, directed=False, return_predecessors=True)
    parent = pred[:n].astype(np.int64)
    parent[parent == n] = np.arange(n)[parent == n]          # part roots point to themselves
    parent[parent < 0] = np.arange(n)[parent < 0]
    rel = np.where(np.einsum("ij,ij->i", normals, normals[parent]) < 0, -1.0, 1.0)
    # sign relative to the part root = product of the relative signs up the tree (pointer jumping)
    sign, up = rel.copy(), parent.copy()
    rel[parent == np.arange(n)] = 1.0
    sign = rel.copy()
    while not np.array_equal(up[up], up):                 # about log2(tree depth) rounds
        sign, up = sign * sign[up], up[up]
    normals *= sign[:, None]
    view = np.asarray(viewpoint, dtype=np.float64) if viewpoint is not None else (pts.min(0) + pts.max(0)) / 2
    facing = np.sign(np.einsum("ij,ij->i", normals, view - pts))
    vote = np.bincount(comp, weights=facing, minlength=n_comp)
    normals *= np.where(vote[comp] < 0, -1.0, 1.0)[:, None]
    return normals


def knn_edges(points, knn: int = 8, max_edge: Optional[float] = None):
    """Directed k-nearest-neighbour edges i -> j (j among the ``knn`` nearest of i).

    Mutual neighbours give both directions, like the two half-edges of a mesh edge in ScanNet's
    graph (a repeated edge never changes which components the segmentation can merge).

    Args:
        points: (N, 3) float.
        knn: neighbours per point.
        max_edge: longest edge kept; None = 4 x the median nearest-neighbour distance.

    Returns:
        (a, b): (E,) int64 endpoint arrays.
    """
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    k = int(min(max(knn, 1), n - 1))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    dist, idx = cKDTree(points).query(points, k=k + 1, workers=-1)
    dist, idx = dist[:, 1:].reshape(-1), idx[:, 1:].reshape(-1)
    if max_edge is None:
        spacing = float(np.median(dist[::k]))
        max_edge = 4.0 * spacing if spacing > 0 else np.inf
    src = np.repeat(np.arange(n, dtype=np.int64), k)
    keep = (dist <= max_edge) & (idx < n) & (idx != src)
    return src[keep], idx[keep].astype(np.int64)


def edge_weights(points, normals, a, b) -> np.ndarray:
    """(E,) float32 convexity-aware weights of edges a -> b (ScanNet's formula, see module doc)."""
    p = np.asarray(points, dtype=np.float32)
    nrm = np.asarray(normals, dtype=np.float32)
    d = p[b] - p[a]
    length = np.linalg.norm(d, axis=1, keepdims=True)
    d = np.divide(d, length, out=np.zeros_like(d), where=length > 0)
    dot = np.einsum("ij,ij->i", nrm[a], nrm[b])
    dot2 = np.einsum("ij,ij->i", nrm[b], d)
    w = 1.0 - dot
    return np.where(dot2 > 0, w * w, w).astype(np.float32)


_SEGMENT_IMPL = None


def _segment_graph(n, a, b, w, c, min_verts):
    """Union-find over sorted edges (numba, compiled on first use and cached), (N,) int64 roots."""
    global _SEGMENT_IMPL
    if _SEGMENT_IMPL is None:
        import numba

        _SEGMENT_IMPL = numba.njit(cache=True, nogil=True)(_segment_kernel)
    return _SEGMENT_IMPL(np.int64(n), np.ascontiguousarray(a, np.int64), np.ascontiguousarray(b, np.int64),
                         np.ascontiguousarray(w, np.float32), np.float32(c), np.int64(min_verts))


def _segment_kernel(n, a, b, w, c, min_verts):  # pragma: no cover - runs compiled by numba
    """Felzenszwalb-Huttenlocher on edges sorted by weight, then the small-segment pass.

    Union by rank as ScanNet's ``universe``; ``find`` compresses the whole path (same roots).
    """
    parent = np.arange(n)
    rank = np.zeros(n, np.int64)
    size = np.ones(n, np.int64)
    threshold = np.full(n, c, np.float32)
    for phase in range(2):
        for i in range(len(w)):
            ra = rb = 0
            for end in range(2):  # find both endpoints' roots, compressing their paths
                x = a[i] if end == 0 else b[i]
                r = x
                while parent[r] != r:
                    r = parent[r]
                while parent[x] != r:
                    nxt = parent[x]
                    parent[x] = r
                    x = nxt
                if end == 0:
                    ra = r
                else:
                    rb = r
            if ra == rb:
                continue
            if phase == 0:
                ok = w[i] <= threshold[ra] and w[i] <= threshold[rb]
            else:
                ok = size[ra] < min_verts or size[rb] < min_verts
            if not ok:
                continue
            if rank[ra] > rank[rb]:
                parent[rb] = ra
                size[ra] += size[rb]
                r = ra
            else:
                parent[ra] = rb
                size[rb] += size[ra]
                if rank[ra] == rank[rb]:
                    rank[rb] += 1
                r = rb
            if phase == 0:
                threshold[r] = w[i] + c / np.float32(size[r])
    out = np.empty(n, np.int64)
    for i in range(n):
        r = i
        while parent[r] != r:
            r = parent[r]
        out[i] = r
    return out


def superpoints_from_config(points, config: SuperpointConfig, normals=None, mesh_triangles=None,
                            colors=None) -> np.ndarray:
    """:func:`superpoints` with the parameters of a :class:`SuperpointConfig`."""
    return superpoints(points, normals, mesh_triangles, k_thresh=config.k_thresh, min_verts=config.min_verts,
                       knn=config.knn, method=config.method, max_edge=config.max_edge,
                       normal_knn=config.normal_knn, colors=colors, color_weight=config.color_weight)


def mesh_superpoints_at(positions, triangle_ids, vertices, triangles, config: Optional[SuperpointConfig] = None,
                        vertex_superpoints=None) -> np.ndarray:
    """Superpoints of surface samples of a mesh: segment the mesh, give each sample its nearest vertex's id.

    This is how ScanNet-style superpoints reach points that are not mesh vertices (for example the
    synthetic world's surface samples, which record the triangle they lie on).

    Args:
        positions: (N, 3) sample positions.
        triangle_ids: (N,) int index of the triangle each sample lies on.
        vertices: (V, 3) mesh vertices; triangles: (T, 3) vertex indices.
        config: segmentation parameters (``method="points"`` gives every sample its own id).
        vertex_superpoints: optional precomputed (V,) ids of the mesh vertices.

    Returns:
        (N,) int64 superpoint ids (those of the vertices, so contiguous over the used vertices).
    """
    config = config or SuperpointConfig()
    positions = np.asarray(positions, dtype=np.float64)
    if config.method == "points":
        return np.arange(len(positions), dtype=np.int64)
    tri = np.asarray(triangles, dtype=np.int64)
    tid = np.asarray(triangle_ids, dtype=np.int64)
    if tid.shape != (len(positions),):
        raise ValueError(f"triangle_ids must be ({len(positions)},), got {tid.shape}")
    if tid.size and (tid.min() < 0 or tid.max() >= len(tri)):
        raise ValueError(f"triangle_ids outside [0, {len(tri)})")
    if vertex_superpoints is None:
        vertex_superpoints = superpoints_from_config(vertices, config, mesh_triangles=tri)
    corners = tri[tid]                                                     # (N, 3)
    v = np.asarray(vertices, dtype=np.float64)
    d = np.linalg.norm(v[corners] - positions[:, None, :], axis=2)         # (N, 3)
    nearest = corners[np.arange(len(tid)), np.argmin(d, axis=1)]
    return np.asarray(vertex_superpoints, dtype=np.int64)[nearest]


def cache_path(scene_path, config: SuperpointConfig) -> Path:
    """Where the superpoints of the scene file ``scene_path`` are cached: next to it, named by config."""
    scene_path = Path(scene_path)
    key = hashlib.sha1(repr(sorted(asdict(config).items())).encode()).hexdigest()[:10]
    return scene_path.with_name(f"{scene_path.stem}.superpoints.{config.method}.{key}.npy")


def cached_superpoints(scene_path, points, config: Optional[SuperpointConfig] = None, normals=None,
                       mesh_triangles=None, colors=None, compute=None) -> np.ndarray:
    """Superpoints of a scene, computed once and cached as ``.npy`` next to the scene file.

    The cache file name carries the method and a hash of the config; a cache whose length differs
    from ``len(points)`` (or that cannot be read) is recomputed. Written atomically.

    ``compute``: optional zero-argument callable that returns the (N,) ids instead of
    :func:`superpoints_from_config` (for example a :func:`mesh_superpoints_at` closure).

    Returns:
        (N,) int64 superpoint ids.
    """
    from sas_core.io import atomic_path

    config = config or SuperpointConfig()
    path = cache_path(scene_path, config)
    n = len(points)
    if path.exists():
        try:
            sp = np.load(path)
            if sp.shape == (n,) and np.issubdtype(sp.dtype, np.integer):
                return sp.astype(np.int64)
        except (OSError, ValueError):
            pass
    if compute is not None:
        sp = np.asarray(compute(), dtype=np.int64)
        if sp.shape != (n,):
            raise ValueError(f"compute() returned shape {sp.shape}, expected ({n},)")
    else:
        sp = superpoints_from_config(points, config, normals=normals, mesh_triangles=mesh_triangles,
                                     colors=colors)
    with atomic_path(path) as tmp:
        np.save(tmp, sp)
    return sp


def boundary_error(sp, instances, ignore=-1) -> float:
    """Fraction of points whose superpoint's majority instance differs from their own instance.

    Args:
        sp: (N,) superpoint ids.
        instances: (N,) instance ids; points with ``ignore`` are not counted (nor vote).

    Returns:
        Boundary-crossing error in [0, 1] (0: every superpoint lies inside one instance).
    """
    sp = np.asarray(sp, dtype=np.int64)
    inst = np.asarray(instances, dtype=np.int64)
    keep = inst != ignore
    sp, inst = sp[keep], inst[keep]
    if sp.size == 0:
        return 0.0
    _, sp_c = np.unique(sp, return_inverse=True)
    _, in_c = np.unique(inst, return_inverse=True)
    pair = sp_c.astype(np.int64) * (in_c.max() + 1) + in_c
    uniq, counts = np.unique(pair, return_counts=True)
    sp_of, in_of = uniq // (in_c.max() + 1), uniq % (in_c.max() + 1)
    order = np.lexsort((-counts, sp_of))            # per superpoint, largest count first
    first = np.ones(len(order), bool)
    first[1:] = sp_of[order][1:] != sp_of[order][:-1]
    majority = np.empty(sp_c.max() + 1, np.int64)
    majority[sp_of[order][first]] = in_of[order][first]
    return float(np.mean(majority[sp_c] != in_c))


def load_scannet_segs(path, n_points: Optional[int] = None) -> np.ndarray:
    """Superpoints from ScanNet's released ``<scene>_vh_clean_2.0.010000.segs.json`` (``segIndices``).

    Those were made by the segmentator on the full mesh, whose vertices are exactly the points of
    OpenScene's ScanNet ``.pth`` files, so they are the paper's superpoints.

    Args:
        path: the ``.segs.json`` file.
        n_points: expected vertex count, checked when given.

    Returns:
        (N,) int64 contiguous superpoint ids.
    """
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
        seg = np.asarray(data["segIndices"], dtype=np.int64)
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a ScanNet segs.json file ({e})") from e
    if seg.ndim != 1 or (n_points is not None and len(seg) != n_points):
        raise ValueError(f"{path}: {seg.shape} segment indices, expected ({n_points},)")
    return np.unique(seg, return_inverse=True)[1].reshape(-1).astype(np.int64)
