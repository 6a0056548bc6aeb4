"""Where the decoded pretraining images live while training, and how each micro-batch reaches the device.

``device``: the whole uint8 dataset sits on the training device (CIFAR-10: 150 MB) and a batch is one
``index_select`` there — no host work, no copies per step. ``host``: for datasets that do not fit, the images stay
in host memory; a background thread gathers the next micro-batch into pinned memory and starts its copy on a side
CUDA stream while the current step computes, so the step finds its batch already on the device.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import torch

from .batches import EpochBatches
from .crops import CropPlan
from .images import EncodedImages, ImageRows
from .streamed import DecodingFeed

Placement = Literal["device", "host"]

# The dataset may take this share of the free device memory and still leave room for activations.
DEVICE_SHARE = 4


def choose_placement(requested: str, nbytes: int, device: torch.device) -> Placement:
    """The recipe's ``training.data_placement`` resolved for this device: ``auto`` keeps the dataset on a GPU when it
    takes at most a quarter of the free memory; on a CPU the host memory is the device memory."""
    if requested in ("device", "host"):
        return requested  # type: ignore[return-value]
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if nbytes * DEVICE_SHARE <= free else "host"


class DeviceImages:
    """All images on the device; a micro-batch is gathered where it is used."""

    placement: Placement = "device"

    def __init__(self, images: torch.Tensor, batches: EpochBatches, device: torch.device) -> None:
        self.images = images.to(device)
        self.batches = batches
        self.device = device
        self._permutation: tuple[int, torch.Tensor] = (-1, torch.empty(0, dtype=torch.long))

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [B, C, H, W] and their dataset indices [B] of micro-batch ``micro`` of optimizer step ``step``,
        both on the device."""
        epoch, start, stop = self.batches.span(step, micro)
        if self._permutation[0] != epoch:
            # One copy per epoch; a copy per step from pageable memory would make the host wait for the GPU.
            self._permutation = (epoch, self.batches.permutation(epoch).to(self.device))
        indices = self._permutation[1][start:stop]
        return self.images.index_select(0, indices), indices

    def close(self) -> None:
        pass


class HostImages:
    """Images in host memory; micro-batch k+1 is gathered and copied to the device while step k computes.

    Requests normally come in training order ((step, 0), (step, 1), …, (step + 1, 0)); any other request (the first
    one, a resume) is served synchronously and the prefetching restarts from there.
    """

    placement: Placement = "host"

    def __init__(self, images: torch.Tensor, batches: EpochBatches, device: torch.device) -> None:
        self.images = images.contiguous()
        self.batches = batches
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="robustcl-prefetch")
        self.pending: tuple[tuple[int, int], Future] | None = None

    def _next(self, step: int, micro: int) -> tuple[int, int]:
        return (step, micro + 1) if micro + 1 < self.batches.grad_accum else (step + 1, 0)

    def _load(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        indices = self.batches.indices(step, micro)
        if not self.cuda:
            return self.images.index_select(0, indices), indices, None
        host = torch.empty((len(indices), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=True)
        torch.index_select(self.images, 0, indices, out=host)
        with torch.cuda.stream(self.copy_stream):
            images = host.to(self.device, non_blocking=True)
            indices = indices.pin_memory().to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        return images, indices, ready

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`DeviceImages.batch`; starts loading the following micro-batch before returning."""
        key = (step, micro)
        if self.pending is not None and self.pending[0] == key:
            images, indices, ready = self.pending[1].result()
        else:
            if self.pending is not None:
                self.pending[1].result()  # let a stale prefetch finish before starting another
            images, indices, ready = self._load(step, micro)
        if ready is not None:
            # The compute stream waits for the copy (no host sync); the tensors belong to it from here on.
            torch.cuda.current_stream(self.device).wait_event(ready)
            images.record_stream(torch.cuda.current_stream(self.device))
            indices.record_stream(torch.cuda.current_stream(self.device))
        following = self._next(step, micro)
        self.pending = (following, self.worker.submit(self._load, *following))
        return images, indices

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)
        self.pending = None


ImageFeed = DeviceImages | HostImages | DecodingFeed


def image_feed(
    images: ImageRows,
    batches: EpochBatches,
    device: torch.device,
    requested: str,
    workers: int,
    total_steps: int,
    crops: CropPlan | None = None,
) -> ImageFeed:
    """How ``images`` reach ``device``: encoded ones through decoding workers (``workers`` processes; ``crops``: the
    views they crop from the original images), decoded ones from the device or the host (``requested``: the recipe's
    ``training.data_placement``)."""
    if isinstance(images, EncodedImages):
        return DecodingFeed(images, batches, device, workers, total_steps, crops)
    tensor = images.tensor
    if choose_placement(requested, tensor.numel() * tensor.element_size(), device) == "device":
        return DeviceImages(tensor, batches, device)
    return HostImages(tensor, batches, device)
