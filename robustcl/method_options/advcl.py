"""``method.*`` of AdvCL (robustcl/methods/advcl.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..recipe import MethodOptions, Section


class AdvCLSection(Section):
    """AdvCL (Fan et al., NeurIPS 2021): four-view contrastive loss + pseudo-label heads on a second attack."""

    pseudo_labels: str | None = Field(
        None,
        description="labels file written by robustcl cluster, or the authors' pickle (.pkl: pseudo_train_K arrays, "
        "LijieFan/AdvCL data/imagenet_clPretrain_pseudo_labels.pkl; read as numpy arrays only; its rows are taken "
        "as the dataset's rows in order, only their count checked: the authors' file needs CIFAR-10 in torchvision's "
        "order, which uoft-cs/cifar10 is not); default: computed at the start of pretrain from cluster_encoder into "
        "RUN_DIR/pseudo_labels.safetensors",
    )
    cluster_encoder: str | None = Field(
        None, description="encoder whose features are clustered when pseudo_labels is not given (run, export, Hub id)"
    )
    clusters: list[int] = Field([2, 10, 50, 100, 500], description="K of each pseudo-label head (one k-means per K)")
    ce_weight: float = Field(0.2, ge=0, description="weight of the mean pseudo-label cross-entropy")
    high_frequency_radius: float = Field(8, gt=0, description="FFT radius below which the high-frequency view is 0")
    temperature_scale: float = Field(
        0.5 / 0.07,
        gt=0,
        description="loss multiplier; authors' code: temperature/base_temperature = 0.5/0.07 (quirk), clean: 1.0",
    )
    projector_dim: int = Field(128, gt=0, description="projection output width (512 → 512 → BN → ReLU → 128)")


class AdvCLOptions(MethodOptions):
    name: Literal["advcl"] = "advcl"
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature")
    advcl: AdvCLSection = Field(default_factory=AdvCLSection)

    @model_validator(mode="after")
    def _distinct_clusters(self) -> AdvCLOptions:
        clusters = self.advcl.clusters
        if not clusters or min(clusters) < 2 or len(set(clusters)) != len(clusters):
            raise ValueError(f"method.advcl.clusters must be distinct numbers of clusters ≥ 2, got {clusters}")
        return self
