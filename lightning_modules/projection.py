"""Training a learned, gated projection head on frozen, cached features (``train.py fit``).

Thin by design: the head and its losses live in :mod:`.components.projection_head`, feature extraction and
matching in :class:`.components.pipeline.FusedCorrespondence` (whose per-image cache makes every image
extracted once for the whole run, not once per epoch or pair), the metric and the test loop in
:class:`.zero_shot.ZeroShotCorrespondence`, which this module extends: after ``fit``, ``trainer.test`` scores
the trained head with the benchmark's protocol, and ``evaluate.py test --model.pipeline.projection_ckpt`` does the
same from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .components.features import ImageFeatures, check_sources, pair_features, source_maps
from .components.keypoints import AnnotationSize, annotation_geometry
from .components.pipeline import FusedCorrespondence
from .components.projection_head import TRAINING_CHECKPOINT_KEY, GatedProjectionHead, correspondence_loss
from .metrics import PCK
from .zero_shot import ZeroShotCorrespondence, place_feature_caches

__all__ = ["ProjectionHeadTraining", "pair_loss"]


def pair_loss(
    descriptors: dict[str, torch.Tensor],
    features: dict[str, ImageFeatures],
    sample: dict[str, Any],
    annotation_size: AnnotationSize,
    temperature: float,
    flow_weight: float,
) -> torch.Tensor:
    """The supervised loss of one pair from the head's descriptors of its two images.

    Keypoints are mapped to feature cells as in matching (:func:`.components.pipeline.annotation_geometry`);
    the source points are rescaled to the target's square, which keeps their cells (the loss takes one
    square side), so ``annotation_size="original"`` (a square per image) works too.

    Args:
        descriptors: ``[D, G, G]`` descriptors by image key (:func:`~.components.features.sample_image_key`).
        features: Raw features by image key (original image sizes).
        sample: A pair sample (``src_image_path``, ``trg_image_path``, ``src_kps``, ``trg_kps``, ``kps_valid``).
        annotation_size: The keypoint-to-cell square (see :class:`~.components.pipeline.FusedCorrespondence`).
        temperature: Softmax temperature of the loss.
        flow_weight: Weight of the soft-argmax flow term.
    """
    source, target = pair_features(features, sample)
    src_descriptors, trg_descriptors = pair_features(descriptors, sample)
    src_geo, trg_geo = annotation_geometry(source, annotation_size), annotation_geometry(target, annotation_size)
    device = src_descriptors.device
    valid = sample["kps_valid"].bool().cpu()
    src_points = src_geo.forward_points(sample["src_kps"][valid].float()) * (trg_geo.size / src_geo.size)
    trg_points = trg_geo.forward_points(sample["trg_kps"][valid].float())
    return correspondence_loss(
        src_descriptors, trg_descriptors, src_points.to(device), trg_points.to(device),
        trg_geo.size, temperature, flow_weight,
    )


class ProjectionHeadTraining(ZeroShotCorrespondence):
    """Train a :class:`GatedProjectionHead` over frozen SD / DINO features (the supervised setting).

    The head's input channels are read from the features of the first training image (so any featurizer
    configuration works without stating them); its weights are initialised under Lightning's seed. Validation
    scores PCK with the datamodule's protocol on its ``val`` split and logs ``val/pck@<alpha>`` (the protocol's
    headline average; model selection monitors ``val/pck@0.1``) and every average as
    ``val/pck@<alpha>/<average>``. Each training step logs ``train/loss`` and the gate of every source
    (``gate/<source>``, the mean over channels for per-channel gates), so a logger (W&B) shows the gates over
    time. Checkpoints hold the head and its config only, never the frozen featurizers.

    Args:
        pipeline: The method (:class:`~.components.pipeline.FusedCorrespondence`) with frozen featurizers for
            every source (``sd`` and / or ``dino``) and the feature cache (its ``feature_cache_gb`` memory is
            shared by all epochs; real-size SD features are about 60 MB an image in fp32: for all of SPair trn
            use ``feature_cache_dir`` as well). Only the featurizers of ``sources`` run; the trained head takes
            the place of co-PCA and fusion, so the pipeline's ``alpha``, ``pca_dims`` and ``fusion`` are unused.
        sources: Feature sources of the head, out of ``"sd"`` (all extracted SD layers merged to the DINO
            grid, raw channels) and ``"dino"``.
        out_dim: Channels of each source's projected block.
        hidden_dim: Width of a 1x1-conv bottleneck per source; None for a single 1x1 convolution.
        per_channel_gate: One gate per output channel of each source instead of one per source.
        gate_init: Initial gate logit (0 gives gates of 0.5).
        temperature: Softmax temperature of the symmetric keypoint cross-entropy (and the flow term).
        flow_weight: Weight of the soft-argmax flow loss added to it; 0 leaves it out.
        lr: AdamW learning rate of the projections.
        weight_decay: AdamW weight decay of the projections.
        gate_lr: Learning rate of the gate logits (no weight decay, which would pull every gate to 0.5);
            None uses ``lr``. Adam moves a logit by about the learning rate per step, so a short run needs a
            larger one for a gate to travel far.
        pck_alphas: The PCK@alpha levels of validation and test (None: the protocol's).
        init_ckpt: Start from the weights of a head checkpoint (its config must match); None starts from
            a random initialisation. ``--ckpt_path`` resumes a whole training run instead.
        alphas: Renamed ``pck_alphas`` (works for a while, with a one-line notice).
    """

    def __init__(
        self,
        pipeline: FusedCorrespondence,
        sources: Sequence[str] = ("sd", "dino"),
        out_dim: int = 256,
        hidden_dim: int | None = None,
        per_channel_gate: bool = False,
        gate_init: float = 0.0,
        temperature: float = 0.05,
        flow_weight: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        gate_lr: float | None = None,
        pck_alphas: Sequence[float] | None = None,
        init_ckpt: str | None = None,
        alphas: Sequence[float] | None = None,
    ) -> None:
        self.sources = check_sources(sources)
        pipeline.select_sources(self.sources)  # only the head's sources run; a missing featurizer is named
        super().__init__(pipeline=pipeline, pck_alphas=pck_alphas, alphas=alphas)
        self.save_hyperparameters(ignore=["pipeline"])
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.head_kwargs = {
            "out_dim": int(out_dim), "hidden_dim": hidden_dim, "per_channel_gate": bool(per_channel_gate),
            "gate_init": float(gate_init),
        }
        self.temperature, self.flow_weight = float(temperature), float(flow_weight)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.gate_lr = self.lr if gate_lr is None else float(gate_lr)
        self.init_ckpt = init_ckpt
        # the checkpoint holds the head only: the frozen featurizers' weights are not expected back
        self.strict_loading = False

    @property
    def head(self) -> GatedProjectionHead:
        """The trained head (built by :meth:`setup`)."""
        if self.pipeline.head is None:
            raise RuntimeError("the projection head is built in setup(): attach a trainer and datamodule first")
        return self.pipeline.head

    # --- setup -------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Place the disk cache (:func:`.zero_shot.place_feature_caches`, before the head reads its first image's
        features); build the head (fit) and the PCK metric of the stage's split (val for fit/validate, test for
        test)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage in ("fit", "validate"):
            place_feature_caches(self)  # (test: ZeroShotCorrespondence.setup places it)
            self._build_head(datamodule, stage)
            self._setup_val_metric(datamodule)
        else:
            if self.pipeline.head is None:
                raise ValueError(
                    "testing needs a trained head: run fit first, or evaluate a checkpoint with "
                    "evaluate.py test --model.pipeline.projection_ckpt PATH"
                )
            super().setup(stage)

    def _setup_val_metric(self, datamodule: Any) -> None:
        self.protocol = getattr(datamodule, "protocol", None)
        if self.protocol is None or self.protocol.metric != "keypoint_pck":
            raise ValueError("training the projection head needs a keypoint datamodule with a `protocol` (SPair)")
        categories = list(getattr(datamodule, "val_categories", None) or [])
        if not categories:
            raise ValueError(f"{type(datamodule).__name__} must expose `val_categories` after setup('fit')")
        self.metric = self.protocol.make_metric(categories, self.pck_alphas or None, groups=False)

    def _build_head(self, datamodule: Any, stage: str) -> None:
        if self.pipeline.head is not None:
            return
        dataset = getattr(datamodule, "train_dataset" if stage == "fit" else "val_dataset", None)
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"{type(datamodule).__name__} has no {stage} data to read the feature channels from")
        head = GatedProjectionHead(self.source_channels(dataset[0]), **self.head_kwargs)
        if self.init_ckpt is not None:
            stored = GatedProjectionHead.from_checkpoint(self.init_ckpt)
            check_head_config(stored.config, head.config, self.init_ckpt)
            head.load_state_dict(stored.state_dict())
        self.pipeline.head = head.to(self.pipeline.device)

    def source_channels(self, sample: dict[str, Any]) -> dict[str, int]:
        """Channels of every source, read from the features of ``sample``'s source image (on the trainer's
        device; the features stay in the cache for the first step)."""
        device = self.trainer.strategy.root_device if self._trainer is not None else self.pipeline.device
        self.pipeline.to(device)
        features = self.pipeline.extract([sample["src_image"]], [sample["category"]])
        maps = source_maps(features, self.sources, self.pipeline.grid)
        return {name: int(maps[name].shape[1]) for name in self.sources}

    # --- training ----------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> ProjectionHeadTraining:
        """Switch the head's mode; the featurizers stay in eval mode (frozen, deterministic features)."""
        super().train(mode)
        for featurizer in (self.pipeline.sd, self.pipeline.dino):
            if featurizer is not None:
                featurizer.eval()
        return self

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the head's parameters only: the projections, and the gate logits with ``gate_lr``."""
        return torch.optim.AdamW(
            [
                {"params": list(self.head.projections.parameters())},
                {"params": list(self.head.gate_logits.parameters()), "lr": self.gate_lr, "weight_decay": 0.0},
            ],
            lr=self.lr,
            weight_decay=self.weight_decay,
        )

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        """Mean loss of a batch of pairs; logs it and the gates."""
        loss = self.batch_loss(batch)
        self.log("train/loss", loss, batch_size=max(len(batch), 1), prog_bar=True)
        for name, gate in self.head.gates().items():
            self.log(f"gate/{name}", gate, batch_size=max(len(batch), 1))
        return loss

    def batch_loss(self, batch: Sequence[dict[str, Any]]) -> torch.Tensor:
        """Mean :func:`pair_loss` over a batch; each distinct image is extracted once (from the cache when
        seen before) and described by the head once."""
        features = self.pipeline.batch_features(batch)
        keys = list(features)
        stacked = self.pipeline.describe_images([features[k] for k in keys])
        descriptors = dict(zip(keys, stacked))
        losses = [
            pair_loss(descriptors, features, s, self.pipeline.annotation_size, self.temperature, self.flow_weight)
            for s in batch
        ]
        if not losses:  # an empty batch still joins DDP's gradient all-reduce
            return sum(p.sum() for p in self.head.parameters()) * 0.0
        return torch.stack(losses).mean()

    # --- validation --------------------------------------------------------------------------------------

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        """Predict the batch's keypoints with the head and add them to the PCK metric."""
        self._sparse_step(batch)

    def on_validation_epoch_end(self) -> None:
        """Log validation PCK (synchronised across processes) and reset the metric."""
        assert self.metric is not None and self.protocol is not None
        results = self.metric.compute()
        headline = self.protocol.averages[0]
        for alpha, values in results["pck"].items():
            self.log(f"val/pck@{alpha}", float(values[headline]))
            for average in self.protocol.averages:
                self.log(f"val/pck@{alpha}/{average}", float(values[average]))
        self.metric.reset()

    # --- checkpoints -------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the head only (the frozen featurizers are rebuilt from the config) and store it with its
        config under ``projection_head``, the form ``--model.pipeline.projection_ckpt`` reads."""
        prefix = "pipeline.head."
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        checkpoint[TRAINING_CHECKPOINT_KEY] = self.head.checkpoint_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose head config differs from this run's (named, before any weight loads)."""
        stored = checkpoint.get(TRAINING_CHECKPOINT_KEY)
        if stored is None:
            raise ValueError(f"not a projection-head training checkpoint: no {TRAINING_CHECKPOINT_KEY!r} entry")
        check_head_config(stored["config"], self.head.config, "the checkpoint")


def check_head_config(stored: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raise a ValueError naming every field in which a stored head config differs from the current one."""
    differences = {
        key: (stored.get(key), current.get(key))
        for key in sorted(set(stored) | set(current))
        if key != "gate_init" and stored.get(key) != current.get(key)
    }
    if differences:
        listed = "; ".join(f"{key}: stored {a!r}, configured {b!r}" for key, (a, b) in differences.items())
        raise ValueError(f"the projection head of {where} does not match this configuration ({listed})")

