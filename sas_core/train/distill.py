"""3D distillation of fused 2D features into a sparse MinkUNet (SAS section 3.4-3.5).

Schedule (paper): ``epochs`` epochs (100); stage 1 (the first 70%) minimises the superpoint
distillation losses ``L_p + L_sp`` (eq. 10); stage 2 (the last 30%) adds temporal ensembling
self-distillation ``L_p^ST + L_sp^ST`` (eq. 11-13). Adam, lr 1e-4 decayed linearly to 1e-5 over
all iterations, weight decay 0. At most 20k supervised voxels are sampled per batch.

Modes (the bottom half of the paper's Table 3):

* ``pixel_point``: OpenScene's ``1 - cos(f3d, f2d)`` on every sampled voxel, all epochs;
* ``sp``: superpoint distillation (eq. 10) all epochs, no TESD;
* ``sp_tesd``: superpoint distillation, plus TESD in the last ``stage2_fraction`` of epochs (SAS).

Options from related systems (issue #15):

* ``loss``: the stage-1/2 distillation terms, comma-separated from ``point``, ``superpoint``, ``mask``
  (default by mode: ``point`` for pixel_point, ``point,superpoint`` otherwise). ``mask`` adds the
  mask-level loss of MaskField / XMask3D (:mod:`sas_core.train.masks`; every training scene needs
  ``masks``); ``point`` is OpenScene's pixel-point loss without ``superpoint`` and eq. 10's L_p with it.
* scene-level labels (3DSS-VLG, :mod:`sas_core.train.scene_labels`): scenes with ``classes`` get
  TESD pseudo-labels restricted to their list and, with ``scene_adapter``, targets specialised by the
  residual adapter (:mod:`sas_core.train.adapter`) before distillation (embeddings soft guidance).

Engineering: tqdm progress bars; a JSON-lines log (``<out_dir>/log.jsonl``: one line per step and
one per epoch with the validation mIoU); a checkpoint after every epoch (``<out_dir>/last.pt``,
written atomically by :func:`sas_core.nn.save_checkpoint`) holding model, optimizer, scheduler,
epoch, RNG states and the TESD history, so ``resume=True`` continues an interrupted run to the
same state as an uninterrupted one (all randomness - scene order, augmentation, voxel sampling -
is derived from (seed, epoch, step, rank)). Data-parallel with torchrun / DDP: scenes are sharded
statically over processes (each keeps the TESD history of its scenes), every loss term is divided
by its count over the *joint* batch (all-reduced), so the averaged DDP gradient equals the
gradient of one process on the joint batch; gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from sas_core.config import opt
from sas_core.train.datasets import Batch, DataConfig, VoxelDataset, collate, epoch_batches

MODES = ("pixel_point", "sp", "sp_tesd")
LR_SCHEDULES = ("linear", "onecycle")
LOSS_TERMS = ("point", "superpoint", "mask")


@dataclass
class DistillConfig:
    """Settings of `sas distill` (defaults: the paper's schedule on ScanNet)."""

    arch: str = opt("MinkUNet18A", "3D backbone (sas_core.nn.build_model)")
    model_kwargs: dict = opt(factory=dict, help="extra build_model arguments (e.g. a reduced width)")
    mode: str = opt("sp_tesd", "pixel_point | sp | sp_tesd (Table 3 rows)", choices=MODES)
    epochs: int = opt(100, "total epochs")
    stage2_fraction: float = opt(0.3, "last fraction of epochs that adds TESD (mode sp_tesd)")
    batch_size: int = opt(2, "scenes per batch per process")
    lr: float = opt(1e-4, "initial Adam learning rate")
    final_lr: float = opt(1e-5, "learning rate reached at the last iteration")
    lr_schedule: str = opt("linear", "linear: lr decays linearly to final_lr over all iterations (the paper); "
                                     "onecycle: linear warm-up from final_lr to lr over warmup_fraction of the "
                                     "iterations, then cosine decay to final_lr", choices=LR_SCHEDULES)
    warmup_fraction: float = opt(0.1, "onecycle: fraction of the iterations spent warming up")
    weight_decay: float = opt(0.0, "Adam weight decay")
    max_voxels: int = opt(20000, "at most this many supervised voxels per batch enter the losses")
    voxel_size: float = opt(0.02, "metres (2 cm indoor, 5 cm outdoor)")
    augment: bool = opt(True, "OpenScene augmentation (elastic distortion, rotation, scale, flips)")
    input_color: bool = opt(False, "network input RGB in [-1, 1] (OpenScene option) instead of all ones (SAS)")
    tesd_alpha: float = opt(0.99, "EMA constant of the temporal ensemble (per visit of a scene)")
    tesd_temperature: float = opt(0.07, "TESD logits = cos(f3d, text) / temperature; 0: the raw dot product "
                                        "f3d . text of the authors' public code")
    tesd_weight: float = opt(1.0, "weight of the TESD cross-entropies")
    tesd_guide: bool = opt(False, "superpoint pseudo-labels take the fused 2D label where its text score is higher "
                                  "(OpenScene's 2D-3D ensemble rule; not in the paper)")
    tesd_balance: bool = opt(False, "weight the TESD cross-entropies per pseudo-class, each present class equally "
                                    "(not in the paper: a diagnostic of self-training that favours frequent classes)")
    seed: int = opt(0, "seeds initialisation, order, augmentation and sampling")
    val_every: int = opt(1, "validate every N epochs (0: never)")
    out_dir: str = opt("distill_output", "checkpoints and logs")
    resume: bool = opt(True, "continue from <out_dir>/last.pt when it exists")
    keep_epochs: bool = opt(False, "also keep <out_dir>/epoch_NNN.pt for every epoch")
    device: str = opt("cpu", "cpu | cuda | cuda:N")
    progress: bool = opt(True, "tqdm progress bars")
    log_every: int = opt(1, "write a step line to log.jsonl every N steps")
    threads: int = opt(0, "torch CPU threads for training (0: leave torch's setting)")
    loss: str = opt("", "distillation terms of stage 1 and 2, comma-separated from point, superpoint, mask "
                        "('': by --mode: point for pixel_point, point,superpoint otherwise); mask: the mask-level "
                        "loss (MaskField / XMask3D), needs <features>/<scene>.masks.npz")
    mask_weight: float = opt(1.0, "weight of the mask-level loss")
    mask_target: str = opt("fused", "target of a mask: fused (mean fused 2D feature over its points) or teacher "
                                    "(the mask's own 2D feature stored with it)", choices=("fused", "teacher"))
    membership_weight: float = opt(0.0, "weight of MaskField's focal + Dice mask-membership terms with Hungarian "
                                        "matching (0: off; needs mask in --loss)")
    scene_adapter: bool = opt(True, "with scene labels: train 3DSS-VLG's embeddings-specialisation adapter on the "
                                    "fused targets and distil against its output (soft guidance)")
    adapter_epochs: int = opt(20, "epochs of the embeddings-specialisation adapter")
    adapter_alpha: float = opt(0.05, "adapter residual ratio (3DSS-VLG: 0.05)")
    adapter_reduction: int = opt(4, "adapter hidden width = feature size / reduction (768 -> 192)")
    adapter_lr: float = opt(1e-2, "adapter Adam learning rate")

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown distillation mode {self.mode!r}; choose one of {MODES}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.stage2_fraction <= 1.0:
            raise ValueError(f"stage2_fraction must be in [0, 1], got {self.stage2_fraction}")
        if self.tesd_temperature < 0:
            raise ValueError(f"tesd_temperature must be >= 0 (0: raw dot product), got {self.tesd_temperature}")
        if self.max_voxels < 1:
            raise ValueError("max_voxels must be >= 1")
        if self.lr <= 0 or self.final_lr < 0:
            raise ValueError("learning rates must be positive")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        terms = self.loss_terms
        unknown = [t for t in terms if t not in LOSS_TERMS]
        if unknown or not terms:
            raise ValueError(f"--loss {self.loss!r}: choose a comma-separated subset of {', '.join(LOSS_TERMS)}")
        if self.mode == "pixel_point" and "superpoint" in terms:
            raise ValueError("mode pixel_point has no superpoint term; use --mode sp or sp_tesd")
        if self.membership_weight > 0 and "mask" not in terms:
            raise ValueError("membership_weight needs the mask term (--loss ...,mask)")

    @property
    def loss_terms(self) -> tuple:
        """The stage-1/2 distillation terms (``loss``, or the mode's default)."""
        if not str(self.loss).strip():
            return ("point",) if self.mode == "pixel_point" else ("point", "superpoint")
        return tuple(t.strip() for t in str(self.loss).split(",") if t.strip())

    @property
    def stage1_epochs(self) -> int:
        """Epochs before TESD starts (the paper: 70 of 100)."""
        if self.mode != "sp_tesd":
            return self.epochs
        return self.epochs - int(round(self.epochs * self.stage2_fraction))


# ------------------------------------------------------------------------------------------------
# helpers


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init_distributed(device: str = "cpu") -> tuple:
    """Join the process group torchrun describes (env RANK / WORLD_SIZE); returns (rank, world)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_input(feats, coords):
    """The network input: a sas_core.nn.SparseTensor of (M, Cin) features at (M, 4) coordinates."""
    from sas_core.nn import SparseTensor

    return SparseTensor(feats, coords)


def forward_features(model, batch: Batch):
    """(M, C) network output for the voxels of ``batch``."""
    out = model(make_input(batch.feats, batch.coords))
    return out.features if hasattr(out, "features") else out


def lr_factor(step: int, total: int, ratio: float, schedule: str = "linear", warmup: float = 0.1) -> float:
    """Learning rate of iteration ``step`` of ``total`` relative to the peak ``lr`` (``ratio`` = final_lr / lr).

    ``linear`` (the paper): 1 at step 0 down to ``ratio`` at the last step. ``onecycle``: up from
    ``ratio`` to 1 over the first ``warmup`` fraction of the steps, then a half cosine down to ``ratio``
    at the last step (a higher peak is reached safely and the rate is annealed at the end).
    """
    last = max(1, total - 1)
    t = min(max(step, 0), last) / last
    if schedule == "linear":
        return 1.0 - (1.0 - ratio) * t
    if schedule != "onecycle":
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if t < warmup:
        return ratio + (1.0 - ratio) * t / warmup
    u = (t - warmup) / max(1e-12, 1.0 - warmup)
    return ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * u))


def rng_state() -> dict:
    import torch

    name, key, pos, has_gauss, gauss = np.random.get_state()
    # plain types and tensors only, so checkpoints load as data (sas_core.io.load_torch_file)
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(key.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


@dataclass
class DistillResult:
    """What :func:`distill` returns."""

    model: object  # the trained nn.Module (unwrapped)
    checkpoint: Optional[str]  # path of the last checkpoint (rank 0), None elsewhere
    history: list  # per-epoch dicts (epoch, losses, val mIoU)
    config: DistillConfig


class Distiller:
    """The training loop (one process; DDP when a process group is initialised).

    Args:
        config: :class:`DistillConfig`.
        train_scenes: sequence of :class:`~sas_core.train.datasets.SceneData` with features.
        text: (K, C) unit class text embeddings (pseudo-labels, validation).
        class_names: the K names (validation tables, checkpoint).
        val_scenes: optional scenes with ``labels`` for validation mIoU.
        text_encoder_config: the text encoder's ``config()`` dict, stored in the checkpoint.
        model: optional prebuilt network (else ``build_model(config.arch, 3, C)``).
        stop_after_epochs: stop (as if interrupted) once this many epochs are done in this call.
    """

    def __init__(self, config: DistillConfig, train_scenes: Sequence, text, class_names: Sequence[str],
                 val_scenes: Optional[Sequence] = None, text_encoder_config: Optional[dict] = None, model=None):
        import torch

        self.cfg = config
        self.device = torch.device(config.device)
        self.rank, self.world = (_dist().get_rank(), _dist().get_world_size()) if _dist() else (0, 1)
        if not train_scenes:
            raise ValueError("no training scenes")
        dims = {s.feature_dim for s in train_scenes}
        if 0 in dims or len(dims) != 1:
            raise ValueError(f"every training scene needs fused 2D features of one size, got sizes {sorted(dims)}")
        self.dim = dims.pop()
        self.text = torch.as_tensor(text, dtype=torch.float32).to(self.device)
        if self.text.ndim != 2 or self.text.shape[1] != self.dim:
            raise ValueError(f"text embeddings {tuple(self.text.shape)} do not match {self.dim}-d features")
        self.class_names = list(class_names)
        if len(self.class_names) != self.text.shape[0]:
            raise ValueError(f"{len(self.class_names)} class names for {self.text.shape[0]} text embeddings")
        train_scenes = list(train_scenes)
        from sas_core.train.scene_labels import scene_class_masks

        self.allowed = {k: torch.from_numpy(v).to(self.device)
                        for k, v in scene_class_masks(train_scenes, self.class_names).items() if v is not None}
        if self.allowed and config.tesd_guide:
            raise ValueError("tesd_guide (fused-guided TESD pseudo-labels) is not combined with scene-level labels")
        self.adapter_history: list = []
        if self.allowed and config.scene_adapter and config.adapter_epochs > 0:
            from sas_core.train.adapter import AdapterConfig, specialize_scenes

            acfg = AdapterConfig(reduction=config.adapter_reduction, alpha=config.adapter_alpha,
                                 epochs=config.adapter_epochs, lr=config.adapter_lr, seed=config.seed)
            train_scenes, self.adapter_history = specialize_scenes(train_scenes, self.text, self.class_names, acfg,
                                                                   str(self.device))
        self._masks = {}
        if "mask" in config.loss_terms:
            self._masks = self._prepare_masks(train_scenes)
        self.text_encoder_config = text_encoder_config or {}
        data_cfg = DataConfig(voxel_size=config.voxel_size, augment=config.augment, input_color=config.input_color)
        self.train = VoxelDataset(list(train_scenes), data_cfg, seed=config.seed)
        self.val = VoxelDataset(list(val_scenes), data_cfg, seed=config.seed) if val_scenes else None
        torch.manual_seed(config.seed)
        if model is None:
            from sas_core.nn import build_model

            model = build_model(config.arch, in_channels=data_cfg.in_channels, out_channels=self.dim,
                                **config.model_kwargs)
        self.model = model.to(self.device)
        self.net = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=None if self.device.type == "cpu" else [self.device])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.steps_per_epoch = len(epoch_batches(len(self.train), config.batch_size, 0, config.seed, self.rank, self.world))
        total = max(1, self.steps_per_epoch * config.epochs)
        ratio = config.final_lr / config.lr

        def factor(step):  # a plain function: the scheduler's state_dict stays plain data
            return lr_factor(step, total, ratio, config.lr_schedule, config.warmup_fraction)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        from sas_core.train.tesd import TemporalEnsemble

        self.tesd = TemporalEnsemble(config.tesd_alpha)
        self.epoch = 0  # epochs completed
        self.history: list = []
        self.out_dir = Path(config.out_dir)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out_dir / "log.jsonl"

    def _prepare_masks(self, scenes) -> dict:
        """{scene: (mask ids (P,), point indices (P,), targets (M, C))} torch tensors for the mask loss."""
        import torch

        from sas_core.train.masks import fused_mask_targets

        missing = [s.name for s in scenes if s.masks is None]
        if missing:
            raise ValueError(f"the mask loss needs masks for every training scene; none for {missing[:5]} "
                             "(sas_core.train.masks; `sas fuse --save-masks`)")
        out = {}
        for s in scenes:
            m = s.masks
            if self.cfg.mask_target == "teacher":
                if m.features is None:
                    raise ValueError(f"scene {s.name!r}: its masks have no features (mask_target 'teacher')")
                tgt, valid = np.asarray(m.features, np.float32), np.ones(len(m), bool)
            else:
                tgt, valid = fused_mask_targets(m, s.features, s.mask)
            if tgt.shape[1] != self.dim:
                raise ValueError(f"scene {s.name!r}: mask targets are {tgt.shape[1]}-d, features {self.dim}-d")
            keep = np.flatnonzero(valid)
            remap = np.full(len(m), -1, np.int64)
            remap[keep] = np.arange(len(keep))
            ids = remap[m.mask_ids()]
            ok = ids >= 0
            out[s.name] = (torch.from_numpy(ids[ok]).to(self.device), torch.from_numpy(m.indices[ok]).to(self.device),
                           torch.from_numpy(tgt[keep]).to(self.device))
        return out

    def _batch_masks(self, batch: Batch):
        """Per scene of the batch: (mask ids (P,), voxel rows (P,), targets (M, C)), rows into the batch."""
        parts = []
        for b, name in enumerate(batch.names):
            ids, idx, tgt = self._masks[name]
            lo = int(batch.offsets[b])
            parts.append((ids, lo + batch.inverse[b].to(self.device)[idx], tgt))
        return parts

    def _batch_allowed(self, batch: Batch):
        """(M, K) bool classes allowed per voxel by its scene's label list, or None (no lists)."""
        import torch

        if not any(name in self.allowed for name in batch.names):
            return None
        allowed = torch.ones((batch.n_voxels, len(self.class_names)), dtype=torch.bool, device=self.device)
        for b, name in enumerate(batch.names):
            if name in self.allowed:
                allowed[int(batch.offsets[b]):int(batch.offsets[b + 1])] = self.allowed[name]
        return allowed

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "last.pt"

    def model_config(self) -> dict:
        """Plain-data description stored in checkpoints (rebuilds the model and its text space)."""
        return {"arch": self.cfg.arch, "in_channels": 3, "out_channels": self.dim,
                "model_kwargs": dict(self.cfg.model_kwargs), "voxel_size": self.cfg.voxel_size,
                "input_color": self.cfg.input_color,
                "text_encoder": self.text_encoder_config, "vocabulary": self.class_names,
                "distill": asdict(self.cfg), "synthetic": bool(self.text_encoder_config.get("kind") == "synthetic")}

    def _gathered_tesd(self) -> dict:
        state = self.tesd.state_dict()
        dist = _dist()
        if dist is None:
            return state
        parts = [None] * self.world
        dist.all_gather_object(parts, state)
        merged = {"alpha": state["alpha"], "scenes": {}}
        for p in parts:
            merged["scenes"].update(p["scenes"])
        return merged

    def save(self) -> Optional[Path]:
        """Write ``last.pt`` (rank 0; every rank must call it, TESD histories are gathered)."""
        tesd = self._gathered_tesd()
        if self.rank != 0:
            return None
        from sas_core.nn import save_checkpoint

        extra = {"epoch": self.epoch, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "tesd": tesd,
                 "history": self.history, "world_size": self.world}
        save_checkpoint(self.checkpoint_path, self.model, self.model_config(), extra)
        if self.cfg.keep_epochs:
            save_checkpoint(self.out_dir / f"epoch_{self.epoch:03d}.pt", self.model, self.model_config(), extra)
        return self.checkpoint_path

    def load(self, path) -> None:
        """Restore model, optimizer, scheduler, epoch, RNG and this process's TESD history (``tesd_alpha``
        stays this config's)."""
        import torch
        from sas_core.nn import load_checkpoint

        model, config, extra = load_checkpoint(path, map_location=self.device)
        if config.get("out_channels") != self.dim or config.get("arch") != self.cfg.arch:
            raise ValueError(f"checkpoint {path} is a {config.get('arch')} with {config.get('out_channels')} "
                             f"outputs, this run trains a {self.cfg.arch} with {self.dim}")
        self.model.load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        self.epoch = int(extra["epoch"])
        self.history = list(extra.get("history", []))
        mine = {self.train.scene(i).name for i in range(self.rank, len(self.train), self.world)}
        tesd = extra["tesd"]
        # the histories come from the checkpoint, the EMA constant from this run's config: a run branched
        # from another run's checkpoint (SP+TESD from the SP run) keeps its own tesd_alpha
        self.tesd.load_state_dict({"alpha": self.cfg.tesd_alpha,
                                   "scenes": {k: v for k, v in tesd["scenes"].items() if k in mine}})
        set_rng_state(extra["rng"])

    # -- one step ----------------------------------------------------------------------------------
    def batch(self, indices, epoch: int) -> Batch:
        samples = [self.train.sample(i, epoch) for i in indices]
        return collate(samples, [self.train.scene(i) for i in indices], feature_dim=self.dim,
                       input_color=self.cfg.input_color).to(self.device)

    def _global(self, values):
        """All-reduce a list of counts (floats) over processes."""
        import torch

        t = torch.tensor(values, dtype=torch.float64)
        dist = _dist()
        if dist is not None:
            dist.all_reduce(t)
        return t.tolist()

    def _sample(self, candidates, generator):
        import torch

        if candidates.numel() <= self.cfg.max_voxels:
            return candidates
        pick = torch.randperm(candidates.numel(), generator=generator)[: self.cfg.max_voxels]
        return candidates[pick.to(candidates.device)].sort().values

    def losses(self, batch: Batch, epoch: int, step: int, tesd: bool) -> dict:
        """Forward + losses of one batch: dict of the weighted total ``loss`` and its terms."""
        import torch

        from sas_core.train.losses import point_loss, superpoint_distillation_loss, tesd_loss
        from sas_core.train.masks import mask_loss, membership_loss

        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.cfg.seed, epoch, step, self.rank])
                                                .generate_state(1)[0]))
        out = forward_features(self.net, batch)
        if out.shape[0] != batch.n_voxels:
            raise ValueError(f"the network returned {out.shape[0]} rows for {batch.n_voxels} voxels")
        sel = self._sample(torch.nonzero(batch.supervised).squeeze(1), gen)
        f3d, f2d, seg = out[sel], batch.target[sel], batch.superpoints[sel]
        terms = {}  # name -> (local sum, local count)
        chosen = self.cfg.loss_terms
        if "superpoint" in chosen:
            lp, lsp = superpoint_distillation_loss(f3d, f2d, seg, reduction="sum")
            terms["superpoint"] = lsp
            if "point" in chosen:
                terms["point"] = lp
        elif "point" in chosen:
            terms["point"] = point_loss(f3d, f2d, reduction="sum")
        if "mask" in chosen:
            parts = self._batch_masks(batch)
            base, ids, rows, tgts = 0, [], [], []
            for i, r, t in parts:
                ids.append(i + base)
                rows.append(r)
                tgts.append(t)
                base += len(t)
            terms["mask"] = mask_loss(out, torch.cat(ids), torch.cat(rows), torch.cat(tgts), reduction="sum")
            if self.cfg.membership_weight > 0:
                fs, fc, ds, dc = out.sum() * 0.0, 0, out.sum() * 0.0, 0
                for i, r, t in parts:
                    (a, na), (d, nd) = membership_loss(out, i, r, len(t), reduction="sum")
                    fs, fc, ds, dc = fs + a, fc + na, ds + d, dc + nd
                terms["membership_focal"], terms["membership_dice"] = (fs, fc), (ds, dc)
        if tesd:
            with torch.no_grad():
                ens = []
                for b, name in enumerate(batch.names):
                    lo, hi = int(batch.offsets[b]), int(batch.offsets[b + 1])
                    inv, first = batch.inverse[b].to(self.device), batch.first[b].to(self.device)
                    points = self.tesd.update(name, out[lo:hi].detach()[inv])  # eq. 11, every point
                    ens.append(points[first])
                ens = torch.cat(ens)
            sel_t = self._sample(torch.arange(batch.n_voxels, device=out.device), gen)
            seg_t = batch.superpoints[sel_t]
            allowed = self._batch_allowed(batch)  # scene-level labels (3DSS-VLG): absent classes masked
            guide = dict(fused=batch.target[sel_t], supervised=batch.supervised[sel_t]) if self.cfg.tesd_guide else {}
            p_lab, sp_lab = self.tesd.pseudo_labels(ens[sel_t], seg_t, self.text,
                                                    allowed=None if allowed is None else allowed[sel_t],
                                                    **guide)  # eq. 12
            lpt, lspt = tesd_loss(out[sel_t], seg_t, p_lab, sp_lab, self.text, self.cfg.tesd_temperature or None,
                                  reduction="sum", balance=bool(self.cfg.tesd_balance))  # eq. 13
            terms["tesd_point"], terms["tesd_superpoint"] = lpt, lspt
            diagnostics = self._tesd_diagnostics(out[sel_t].detach(), p_lab, batch.labels[sel_t])
        names = sorted(terms)
        counts = self._global([float(terms[k][1]) for k in names])
        result, total = {}, out.sum() * 0.0
        for k, n in zip(names, counts):
            value = terms[k][0] * (self.world / max(n, 1.0))  # DDP averages gradients over processes
            weight = (self.cfg.tesd_weight if k.startswith("tesd") else self.cfg.mask_weight if k == "mask"
                      else self.cfg.membership_weight if k.startswith("membership") else 1.0)
            total = total + weight * value
            result[k] = float(terms[k][0].detach()) / max(terms[k][1], 1)
        result["loss"] = total
        result["voxels"] = int(sel.numel())
        if tesd:
            result.update(diagnostics)
        return result

    def _tesd_diagnostics(self, out, pseudo, labels) -> dict:
        """Of the voxels the TESD terms saw: how well the network fits its pseudo-labels (``tesd_fit``,
        argmax of its own output = pseudo-label) and, where ground truth is known (synthetic and
        evaluation scenes), the accuracy of the pseudo-labels and of the network (``tesd_pseudo_acc``,
        ``tesd_net_acc``). Read only, for the training log: they tell a self-training that cannot fit its
        labels from one whose labels are wrong."""
        import torch

        from sas_core.text import text_labels
        from sas_core.types import IGNORE_LABEL

        with torch.no_grad():
            pred = text_labels(out, self.text, normalize=True)[0].to(pseudo.device)  # the inference rule
            res = {"tesd_fit": float((pred == pseudo).float().mean()) if pred.numel() else float("nan")}
            known = labels.to(pseudo.device) != IGNORE_LABEL
            gt = labels.to(pseudo.device)[known]
            nan = float("nan")  # no ground truth here: NaN (an epoch mean with such a batch is NaN too)
            res["tesd_pseudo_acc"] = float((pseudo[known] == gt).float().mean()) if gt.numel() else nan
            res["tesd_net_acc"] = float((pred[known] == gt).float().mean()) if gt.numel() else nan
        return res

    def train_step(self, batch: Batch, epoch: int, step: int, tesd: bool) -> dict:
        """One optimisation step; returns the loss terms as floats."""
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        res = self.losses(batch, epoch, step, tesd)
        res["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        res["loss"] = float(res["loss"].detach()) / self.world
        return res

    # -- TESD initialisation and validation --------------------------------------------------------
    def _scene_point_features(self, dataset: VoxelDataset, i: int):
        """(N, C) float32 outputs of scene i for every point (eval mode, no augmentation)."""
        import torch

        smp = dataset.sample(i, 0, augment=False)
        batch = collate([smp], [dataset.scene(i)], feature_dim=self.dim, input_color=self.cfg.input_color).to(self.device)
        with torch.no_grad():
            out = forward_features(self.model, batch)
        return out[batch.inverse[0].to(self.device)].float()

    def initialize_tesd(self) -> None:
        """Start the history of this process's scenes from superpoint-averaged predictions."""
        import torch

        self.model.eval()
        for i in range(self.rank, len(self.train), self.world):
            scene = self.train.scene(i)
            if scene.name not in self.tesd:
                feats = self._scene_point_features(self.train, i)
                self.tesd.initialize(scene.name, feats, torch.from_numpy(scene.superpoints).to(self.device))

    def validate(self) -> Optional[dict]:
        """mIoU / mAcc over the validation scenes (rank 0 computes, others return None)."""
        if self.val is None or self.rank != 0:
            return None
        from sas_core.eval import confusion_matrix, miou_macc

        self.model.eval()
        k = len(self.class_names)
        conf = np.zeros((k, k + 1), dtype=np.int64)
        for i in range(len(self.val)):
            scene = self.val.scene(i)
            if scene.labels is None:
                continue
            pred = predict_labels(self._scene_point_features(self.val, i), self.text)
            conf += confusion_matrix(pred, scene.labels, k)
        res = miou_macc(conf, self.class_names)
        return {"miou": float(res["miou"]), "macc": float(res["macc"])}

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, stop_after_epochs: Optional[int] = None) -> DistillResult:
        import torch

        cfg = self.cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.resume and self.checkpoint_path.exists():
            self.load(self.checkpoint_path)
        done_here = 0
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        while self.epoch < cfg.epochs:
            epoch = self.epoch
            tesd = cfg.mode == "sp_tesd" and epoch >= cfg.stage1_epochs
            if tesd:
                self.initialize_tesd()
            batches = epoch_batches(len(self.train), cfg.batch_size, epoch, cfg.seed, self.rank, self.world)
            bar = tqdm(batches, desc=f"distill {cfg.mode} epoch {epoch + 1}/{cfg.epochs}" + (" [TESD]" if tesd else ""),
                       disable=not cfg.progress or self.rank != 0, leave=False) if tqdm else batches
            sums, t0 = {}, time.time()
            for step, indices in enumerate(bar):
                res = self.train_step(self.batch(indices, epoch), epoch, step, tesd)
                for key, v in res.items():
                    sums[key] = sums.get(key, 0.0) + float(v)
                if tqdm:
                    bar.set_postfix(loss=f"{res['loss']:.4f}")
                if self.rank == 0 and cfg.log_every and step % cfg.log_every == 0:
                    _append_jsonl(self.log_path, {"kind": "step", "epoch": epoch + 1, "step": step,
                                                  "lr": self.scheduler.get_last_lr()[0], "tesd": tesd,
                                                  **{k: float(v) for k, v in res.items()}})
            self.epoch = epoch + 1
            record = {"kind": "epoch", "epoch": self.epoch, "tesd": tesd, "seconds": time.time() - t0,
                      **{k: v / max(1, len(batches)) for k, v in sums.items()}}
            if cfg.val_every and (self.epoch % cfg.val_every == 0 or self.epoch == cfg.epochs):
                val = self.validate()
                if val is not None:
                    record.update({f"val_{k}": v for k, v in val.items()})
            self.history.append(record)
            if self.rank == 0:
                _append_jsonl(self.log_path, record)
            self.save()
            done_here += 1
            if stop_after_epochs is not None and done_here >= stop_after_epochs and self.epoch < cfg.epochs:
                break
        self.model.eval()
        torch.manual_seed(cfg.seed)  # leave the global RNG reproducible for callers
        return DistillResult(self.model, str(self.checkpoint_path) if self.rank == 0 else None, self.history, cfg)


def predict_labels(features, text) -> np.ndarray:
    """(N,) int64 argmax of cos(features, text) for (N, C) features and (K, C) text (inference rule)."""
    from sas_core.text import text_labels

    return text_labels(features, text, normalize=True)[0].cpu().numpy()


def distill(config: DistillConfig, train_scenes: Sequence, text, class_names: Sequence[str],
            val_scenes: Optional[Sequence] = None, text_encoder_config: Optional[dict] = None, model=None,
            stop_after_epochs: Optional[int] = None) -> DistillResult:
    """Train (or resume) a 3D network on fused 2D features; see :class:`Distiller`."""
    return Distiller(config, train_scenes, text, class_names, val_scenes, text_encoder_config, model).run(
        stop_after_epochs)


def scene_point_features(model, scene, voxel_size: float, device="cpu", input_color: bool = False):
    """(N, C) float32 features of every point of a :class:`SceneData` from a trained model."""
    import torch

    ds = VoxelDataset([scene], DataConfig(voxel_size=voxel_size, augment=False))
    smp = ds.sample(0, 0, augment=False)
    batch = collate([smp], [scene], feature_dim=max(1, scene.feature_dim), input_color=input_color).to(device)
    model.eval()
    with torch.no_grad():
        out = forward_features(model, batch)
    return out[batch.inverse[0].to(out.device)].float()

