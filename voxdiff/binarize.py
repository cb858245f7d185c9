"""Turning occupancy probabilities into voxels, and scoring reconstructions. Torch only (a leaf module).

Surface voxels of point clouds are sparse (under 1% of a 64³ grid), so "probability > 0.5" is not a neutral choice:
a decoder trained with plain BCE rarely crosses 0.5 and one trained with a positive weight crosses it too often. Two
sparsity-aware alternatives live here and are shared by the AE trainer and the sampler:

- a calibrated threshold, chosen on held-out training shapes to maximise mean per-shape IoU (`ThresholdCalibrator`);
- per-shape top-k, keeping exactly k voxels, with k the expected occupancy of the shape's category.

One rule everywhere (sampling, SDS, training previews, tuning, eval.py's --threshold, renders): a voxel is occupied
when its probability is strictly greater than the threshold.

Metric conventions (per shape, then averaged): IoU = |P∩T| / |P∪T| (1 when both are empty); precision = |P∩T| / |P|
(0 when nothing is predicted); recall = |P∩T| / |T| (1 when the target is empty).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["binarize", "Binarization", "recon_metrics", "ThresholdCalibrator"]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, N): one row per shape (accepts (B,1,R,R,R) or (B,R,R,R))."""
    return x.reshape(x.shape[0], -1)


def binarize(
    probs: torch.Tensor,
    threshold: float | None = None,
    topk: int | Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean occupancy of the same shape as `probs` (B, ...), one shape per leading index.

    topk: keep exactly k most probable voxels per shape (an int for all shapes, or one k per shape); when given
    (and > 0) it takes precedence over `threshold`. Otherwise voxels with prob > threshold (default 0.5) are kept.
    """
    if topk is not None and not (isinstance(topk, int) and topk <= 0):
        flat = _flat(probs)
        b, n = flat.shape
        k = torch.as_tensor(topk, dtype=torch.long, device=flat.device).reshape(-1)
        if k.numel() not in (1, b):
            raise ValueError(f"topk needs one k or one per shape ({b}); got {k.numel()}")
        k = k.expand(b).clamp(0, n)
        if b == 0:
            return torch.zeros_like(probs, dtype=torch.bool)
        kmax = int(k.max())
        out = torch.zeros_like(flat, dtype=torch.bool)
        if kmax > 0:
            # 1. indices of the kmax largest per row; 2. keep the first k_i of them in row i (exactly k_i voxels).
            idx = torch.topk(flat.float(), kmax, dim=1).indices
            keep = torch.arange(kmax, device=flat.device).unsqueeze(0) < k.unsqueeze(1)
            out.scatter_(1, idx, keep)
        return out.reshape(probs.shape)
    t = 0.5 if threshold is None else float(threshold)
    return probs > t


@dataclass(frozen=True)
class Binarization:
    """How probabilities become voxels: p > `threshold`, or with `topk` exactly k voxels per shape, k per class id
    (at the resolution of the probabilities it is applied to). Built once per run (see LatentVoxelPipeline)."""

    threshold: float = 0.5
    topk: dict[int, int] | None = None

    def __call__(self, probs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.topk is None:
            return binarize(probs, threshold=self.threshold)
        if labels is None:
            raise ValueError("top-k binarisation needs the class label of every shape")
        return binarize(probs, topk=torch.tensor([self.topk[int(c)] for c in labels]))

    def describe(self) -> str:
        return f"p > {self.threshold:g}" if self.topk is None else f"top-k {self.topk}"


def recon_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-shape IoU, precision, recall (float tensors of length B) of boolean `pred` against `target` (> 0.5)."""
    p = _flat(pred).bool()
    t = _flat(target) > 0.5
    inter = (p & t).sum(1).double()
    n_p = p.sum(1).double()
    n_t = t.sum(1).double()
    union = n_p + n_t - inter
    one = torch.ones_like(inter)
    return {
        "iou": torch.where(union > 0, inter / union.clamp_min(1), one),
        "precision": torch.where(n_p > 0, inter / n_p.clamp_min(1), torch.zeros_like(inter)),
        "recall": torch.where(n_t > 0, inter / n_t.clamp_min(1), one),
        "empty": (n_p == 0).double(),
    }


class ThresholdCalibrator:
    """Pick the probability threshold that maximises mean per-shape IoU over the shapes it has seen.

    Exact on a grid of `num_bins - 1` thresholds t_j = j / num_bins, at O(voxels) cost per shape:
    1. bin every voxel's probability (bin b = number of thresholds < p, so p > t_j  <=>  b >= j);
    2. per shape, count occupied / empty target voxels in each bin;
    3. a reverse cumulative sum gives TP_j (occupied with b >= j) and FP_j (empty with b >= j) for every j at once;
    4. IoU_j = TP_j / (|T| + FP_j) per shape; average over shapes and take the arg-max.
    """

    def __init__(self, num_bins: int = 200) -> None:
        self.num_bins = num_bins
        self.thresholds = torch.arange(1, num_bins, dtype=torch.float64) / num_bins
        self._tp: list[torch.Tensor] = []
        self._fp: list[torch.Tensor] = []
        self._nt: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of shapes: probabilities and 0/1 targets of the same shape (B, ...)."""
        p = _flat(probs).float()
        t = _flat(target) > 0.5
        b, nb = p.shape[0], self.num_bins
        # step 1: bin index in [0, nb-1]
        bins = torch.bucketize(p, self.thresholds.to(p.device, torch.float32), right=False)
        # step 2: per-shape histograms via one bincount over (shape, bin, occupied) ids
        rows = torch.arange(b, device=p.device).unsqueeze(1)
        ids = (rows * nb + bins) * 2 + t.long()
        hist = torch.bincount(ids.reshape(-1), minlength=b * nb * 2).reshape(b, nb, 2).double().cpu()
        # step 3: reverse cumulative sums over bins; column j counts voxels with bin >= j
        cum = hist.flip(1).cumsum(1).flip(1)
        self._tp.append(cum[:, 1:, 1])
        self._fp.append(cum[:, 1:, 0])
        self._nt.append(hist[:, :, 1].sum(1))

    def ious(self) -> torch.Tensor:
        """Mean per-shape IoU at every threshold in `self.thresholds` (step 4)."""
        if not self._tp:
            raise ValueError("ThresholdCalibrator has seen no shapes")
        tp, fp, nt = torch.cat(self._tp), torch.cat(self._fp), torch.cat(self._nt).unsqueeze(1)
        union = nt + fp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.ones_like(tp))
        return iou.mean(0)

    def best(self) -> tuple[float, float]:
        """(threshold, mean IoU at it); ties go to the threshold nearest 0.5."""
        iou = self.ious()
        top = iou.max()
        cands = torch.nonzero(iou >= top - 1e-12).reshape(-1)
        j = int(cands[torch.argmin((self.thresholds[cands] - 0.5).abs())])
        return float(self.thresholds[j]), float(iou[j])
