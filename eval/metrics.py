"""Streaming per-class IoU and the paper's mIoU, with seen/unseen/harmonic summaries.

For each class c, intersection I_c and union U_c pixel counts are summed over the whole data set;
IoU_c = I_c / U_c, and mIoU is the mean of IoU_c over the classes that occur (U_c > 0). A class
only ever predicted has I_c = 0 < U_c and counts with IoU 0; a class absent from both predictions
and ground truth everywhere is left out of the mean. Pixels whose ground truth is the ignore label
(255) count nowhere. The state is two arrays of `num_classes` counts, whatever the number of
images, so workers' partial results merge by addition.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IGNORE_INDEX = 255  # label-map value of unlabelled pixels (as `factory.schema.IGNORE`)


def _as_mask(x: np.ndarray, what: str) -> np.ndarray:
    """A bool view of a mask given as bool or integer (nonzero = in the mask)."""
    x = np.asarray(x)
    if x.dtype != bool and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{what} must be bool or integer masks, got dtype {x.dtype} "
                         "(threshold probabilities or logits first)")
    return x.astype(bool, copy=False)


class IoUAccumulator:
    """Intersection and union pixel counts per class id 0..num_classes-1, summed over updates.

    Class id 0 is background: it is counted, but left out of `iou` and `miou` unless
    `include_background`. Feed it label maps (`update`), per-class binary masks (`update_masks`),
    or both; combine workers' accumulators with `merge`.
    """

    def __init__(self, num_classes: int, *, include_background: bool = False,
                 ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id (num_classes "
                             f"{num_classes})")
        self.num_classes = num_classes
        self.include_background = include_background
        self.ignore_index = ignore_index
        self.intersection = np.zeros(num_classes, dtype=np.int64)  # (num_classes,) pixels
        self.union = np.zeros(num_classes, dtype=np.int64)         # (num_classes,) pixels

    def _check_ids(self, ids: np.ndarray, what: str) -> None:
        bad = np.unique(ids[(ids < 0) | (ids >= self.num_classes)])
        if bad.size:
            raise ValueError(f"{what} holds class ids {bad.tolist()} outside 0..."
                             f"{self.num_classes - 1} (ignore label {self.ignore_index})")

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Adds one semantic label map pair.

        pred: (H, W) int predicted class ids; the ignore label marks pixels with no prediction.
        gt:   (H, W) int ground-truth class ids; pixels with the ignore label are skipped.
        """
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape or pred.ndim != 2:
            raise ValueError(f"pred and gt must be label maps (H, W) of one shape, got "
                             f"{pred.shape} and {gt.shape}")
        for x, what in ((pred, "pred"), (gt, "gt")):
            if not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"{what} must hold integer class ids, got dtype {x.dtype}")
        valid = gt != self.ignore_index
        p = pred[valid & (pred != self.ignore_index)].astype(np.int64)
        g = gt[valid].astype(np.int64)
        self._check_ids(p, "pred")
        self._check_ids(g, "gt")
        n = self.num_classes
        # union = |pred| + |gt| - |both|, each a histogram over class ids
        hit = pred[valid] == gt[valid]
        both = np.bincount(g[hit], minlength=n)
        self.intersection += both
        self.union += np.bincount(p, minlength=n) + np.bincount(g, minlength=n) - both

    def update_masks(self, pred: np.ndarray, gt: np.ndarray, class_ids: Iterable[int],
                     ignore: np.ndarray | None = None) -> None:
        """Adds one image's per-class binary masks; masks of one image may overlap.

        pred:      (K, H, W) bool (or 0/1 integer) predicted mask per class.
        gt:        (K, H, W) bool (or 0/1 integer) ground-truth mask per class.
        class_ids: (K,) the class id of each mask pair.
        ignore:    (H, W) bool pixels to skip for every class, or None.
        """
        pred, gt = _as_mask(pred, "pred"), _as_mask(gt, "gt")
        ids = np.asarray(list(class_ids), dtype=np.int64).reshape(-1)
        if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[0] != ids.size:
            raise ValueError(f"pred and gt must be (K, H, W) of one shape with K = "
                             f"len(class_ids) = {ids.size}, got {pred.shape} and {gt.shape}")
        self._check_ids(ids, "class_ids")
        if ignore is not None:
            ignore = _as_mask(ignore, "ignore")
            if ignore.shape != pred.shape[1:]:
                raise ValueError(f"ignore must be (H, W) = {pred.shape[1:]}, got {ignore.shape}")
            keep = ~ignore[None]                                   # (1, H, W)
            pred, gt = pred & keep, gt & keep
        inter = (pred & gt).sum(axis=(1, 2))                       # (K,)
        union = (pred | gt).sum(axis=(1, 2))                       # (K,)
        np.add.at(self.intersection, ids, inter)  # add.at: a repeated id adds up, not overwrites
        np.add.at(self.union, ids, union)

    def merge(self, other: IoUAccumulator) -> IoUAccumulator:
        """Adds `other`'s counts to this one (e.g. another worker's); returns self."""
        if (other.num_classes, other.include_background, other.ignore_index) != (
                self.num_classes, self.include_background, self.ignore_index):
            raise ValueError("cannot merge accumulators with different num_classes, "
                             "include_background or ignore_index")
        self.intersection += other.intersection
        self.union += other.union
        return self

    def _counted(self, classes: Iterable[int] | None) -> np.ndarray:
        """The ids averaged over: `classes` (or all but background unless included) that occur."""
        if classes is None:
            ids = np.arange(0 if self.include_background else 1, self.num_classes)
        else:
            ids = np.unique(np.asarray(list(classes), dtype=np.int64))
            self._check_ids(ids, "classes")
        return ids[self.union[ids] > 0]

    def iou(self, classes: Iterable[int] | None = None) -> dict[int, float]:
        """IoU per class id, over the classes that occur (union > 0), of `classes` if given."""
        ids = self._counted(classes)
        return {int(c): float(self.intersection[c] / self.union[c]) for c in ids}

    def miou(self, classes: Iterable[int] | None = None) -> float:
        """Mean IoU over the classes that occur, of `classes` if given; nan when none occur."""
        ious = list(self.iou(classes).values())
        return float(np.mean(ious)) if ious else float("nan")

    def to_dict(self) -> dict:
        """A JSON-ready copy of the state (`from_dict` inverts it)."""
        return {"num_classes": self.num_classes, "include_background": self.include_background,
                "ignore_index": self.ignore_index, "intersection": self.intersection.tolist(),
                "union": self.union.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> IoUAccumulator:
        """The accumulator `to_dict` described."""
        acc = cls(d["num_classes"], include_background=d["include_background"],
                  ignore_index=d["ignore_index"])
        for name in ("intersection", "union"):
            counts = np.asarray(d[name], dtype=np.int64)
            if counts.shape != (acc.num_classes,):
                raise ValueError(f"{name} has shape {counts.shape}, expected "
                                 f"({acc.num_classes},)")
            setattr(acc, name, counts)
        return acc


def harmonic(seen: float, unseen: float) -> float:
    """2SU / (S + U); 0 when S + U = 0; nan when either is nan."""
    if seen + unseen == 0:
        return 0.0
    return 2 * seen * unseen / (seen + unseen)  # nan in, nan out


def seen_unseen(acc: IoUAccumulator, seen_ids: Iterable[int], unseen_ids: Iterable[int]
                ) -> tuple[float, float, float]:
    """(seen mIoU, unseen mIoU, harmonic mean of the two), as fractions.

    Each mIoU averages over the classes of its set that occur in `acc`, and is nan when none
    does; a nan seen or unseen mIoU makes the harmonic mean nan too (not 0: nothing was measured).
    """
    s, u = acc.miou(seen_ids), acc.miou(unseen_ids)
    return s, u, harmonic(s, u)
