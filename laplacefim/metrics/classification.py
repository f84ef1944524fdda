"""Classification metrics: accuracy, NLL, Brier score, calibration errors, reliability.

Inputs are probabilities ``(B, C)`` (rows on the simplex) or, for binary problems,
``(B,)`` holding P(y = 1), which is read as the two columns ``[1 − p, p]`` everywhere
except in the Brier score. Labels are class indices ``(B,)``. Every metric is a function
and an accumulator (``update`` / ``compute`` / ``state`` / ``merge``) whose state is a few
float64 sums, so chunks and ranks combine by adding states.

Binning: ``n_bins`` equal-width bins over ``[0, 1]`` with edges ``edges[j] = j / n_bins``
(correctly rounded to float64); bin ``j`` is ``(edges[j], edges[j + 1]]`` and the first
bin is closed, ``[0, edges[1]]``. A confidence equal to an edge falls into the lower bin
(compared in float64, after converting float32 inputs). With
``adaptive=True`` bins hold equal numbers of samples instead (see ``ece``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from laplacefim.metrics._base import (
    PROB_FLOOR,
    ArrayLike,
    Norm,
    SumState,
    as_classes,
    class_labels,
    mean_of,
    parse_norm,
    positive_int,
    probabilities,
    zeros,
)
from laplacefim.metrics.binning import (
    N_SUB_BINS,
    ReliabilityDiagram,
    bin_edges,
    bin_sums,
    binned_error,
    exact_adaptive,
    group_sub_bins,
    to_diagram,
)


def _inputs(metric: SumState | None, probs: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    """Checked ``(B, C)`` probabilities and int64 labels ``(B,)``; fixes ``metric``'s layout."""
    checked = probabilities(probs)
    p = as_classes(checked)
    y = class_labels(labels, p.shape[1], p.shape[0], p.device)
    if metric is not None:
        metric._check_layout(tuple(checked.shape[1:]))
    return p, y


def _rows(p: Tensor, y: Tensor, *, classwise: bool, target: int | None) -> tuple[Tensor, Tensor]:
    """Confidences and hits ``(K, B)``: top label (K = 1), one class, or every class (K = C)."""
    if classwise:
        classes = torch.arange(p.shape[1], device=p.device)
        return p.T, (y[None, :] == classes[:, None]).to(p.dtype)
    if target is not None:
        if target >= p.shape[1]:
            raise ValueError(f"class_index={target} is out of range for {p.shape[1]} classes.")
        return p[:, target][None], (y == target).to(p.dtype)[None]
    conf, pred = p.max(dim=1)  # ties go to the lowest class index
    return conf[None], (pred == y).to(p.dtype)[None]


class Accuracy(SumState):
    """Streaming top-1 accuracy (ties go to the lowest class index; binary: p > ½ is 1).

    Example:
        >>> acc = Accuracy()
        >>> acc.update(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]))
        >>> acc.compute()
        0.5
    """

    def __init__(self) -> None:
        super().__init__(zeros((), ()))

    def update(self, probs: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch: ``probs`` ``(B, C)`` or ``(B,)``, ``labels`` ``(B,)``."""
        p, y = _inputs(self, probs, labels)
        hits = (p.argmax(1) == y).to(p.dtype).sum()
        self._add([hits, hits.new_tensor(float(y.numel()))])

    def compute(self) -> float:
        """The fraction of correct top-1 predictions so far."""
        return mean_of(self._sums(), "Accuracy")


class NLL(SumState):
    """Streaming mean negative log-likelihood ``−log p_y`` (natural log, ``p_y`` floored at
    ``PROB_FLOOR`` = 1e-12)."""

    def __init__(self) -> None:
        super().__init__(zeros((), ()))

    def update(self, probs: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch: ``probs`` ``(B, C)`` or ``(B,)``, ``labels`` ``(B,)``."""
        p, y = _inputs(self, probs, labels)
        p_true = p.gather(1, y[:, None]).clamp_min(PROB_FLOOR)
        self._add([-p_true.log().sum(), p.new_tensor(float(y.numel()))])

    def compute(self) -> float:
        """The mean NLL in nats so far."""
        return mean_of(self._sums(), "NLL")


class Brier(SumState):
    """Streaming Brier score.

    Multi-class ``(B, C)`` probabilities (any ``C >= 2``): ``Σ_c (p_c − 1[y = c])²`` per
    sample, averaged, in ``[0, 2]``. Binary ``(B,)`` probabilities: ``(p − y)²`` averaged, in
    ``[0, 1]`` — half the two-column sum.
    """

    def __init__(self) -> None:
        super().__init__(zeros((), ()))

    def update(self, probs: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch: ``probs`` ``(B, C)`` or ``(B,)``, ``labels`` ``(B,)``."""
        p, y = _inputs(self, probs, labels)
        half = self._layout == ()  # binary (B,) input: the single-probability form
        onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
        total = (p - onehot).square().sum() / (2 if half else 1)
        self._add([total, p.new_tensor(float(y.numel()))])

    def compute(self) -> float:
        """The mean Brier score so far."""
        return mean_of(self._sums(), "Brier")


class ECE(SumState):
    """Streaming (expected) calibration error over confidence bins.

    Args:
        n_bins: Number of bins.
        norm: ``"l1"`` (ECE: ``Σ_j (n_j / N) |acc_j − conf_j|``), ``"l2"`` (root of
            ``Σ_j (n_j / N) (acc_j − conf_j)²``) or ``"max"`` (MCE: the largest gap over
            non-empty bins).
        classwise: If True, the mean over classes ``c`` of the calibration error of ``p_c``
            against ``1[y = c]`` (every sample counts in every class); else top-label.
        adaptive: If True, equal-mass bins formed at ``compute`` from a fine equal-width
            histogram of ``n_sub_bins`` sub-bins: an approximation of ``ece(...,
            adaptive=True)`` in which each bin edge may be off by the samples of one sub-bin.
        n_sub_bins: Sub-bins of that histogram (only with ``adaptive``).
        n_classes: Allocate a classwise state up front (else at the first update).

    Raises:
        ValueError: On a bad option; the message lists the valid values.

    Example:
        >>> metric = ECE(n_bins=10)
        >>> for probs, labels in batches:  # doctest: +SKIP
        ...     metric.update(probs, labels)
        >>> metric.compute()  # doctest: +SKIP
    """

    def __init__(
        self,
        n_bins: int = 15,
        *,
        norm: str | Norm = "l1",
        classwise: bool = False,
        adaptive: bool = False,
        n_sub_bins: int = N_SUB_BINS,
        n_classes: int | None = None,
    ) -> None:
        self.n_bins = positive_int(n_bins, "n_bins")
        self.norm = parse_norm(norm)
        self.classwise, self.adaptive = bool(classwise), bool(adaptive)
        self.n_sub_bins = positive_int(
            n_sub_bins, "n_sub_bins", minimum=self.n_bins if adaptive else 1
        )
        self.n_classes = None if n_classes is None else positive_int(n_classes, "n_classes", 2)
        rows = self.n_classes if classwise else 1
        width = self.n_sub_bins if adaptive else self.n_bins
        super().__init__(None if rows is None else zeros(*[(rows, width)] * 3))

    def _config(self) -> tuple[object, ...]:
        return (self.n_bins, self.norm, self.classwise, self.adaptive, self.n_sub_bins)

    def update(self, probs: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch: ``probs`` ``(B, C)`` or ``(B,)``, ``labels`` ``(B,)``.

        Raises:
            ValueError: On invalid inputs, or ``C`` other than ``n_classes`` (classwise).
        """
        p, y = _inputs(self, probs, labels)
        if self.classwise and self._tensors is not None and self._tensors[0].shape[0] != p.shape[1]:
            raise ValueError(
                f"ECE(classwise=True) holds {self._tensors[0].shape[0]} classes; got probs "
                f"with {p.shape[1]}."
            )
        conf, hit = _rows(p, y, classwise=self.classwise, target=None)
        self._add(bin_sums(conf, hit, self.n_sub_bins if self.adaptive else self.n_bins))

    def compute(self) -> float:
        """The calibration error so far, in ``[0, 1]``."""
        binned = self._sums()
        if self.adaptive:
            binned = group_sub_bins(binned, self.n_bins)[0]
        return binned_error(binned, self.norm)


class Reliability(SumState):
    """Streaming reliability diagram (top-label, or one class's ``p_c`` vs ``1[y = c]``).

    Args:
        n_bins: Number of bins.
        adaptive: Equal-mass bins from a fine histogram, as in ``ECE``.
        class_index: If given, bin ``p_c`` for this class against ``1[y = c]`` (e.g. 1 for
            the positive class of binary ``(B,)`` probabilities, which is what
            ``sklearn.calibration.calibration_curve`` bins); else top-label.
        n_sub_bins: Sub-bins of the fine histogram (only with ``adaptive``).
    """

    def __init__(
        self,
        n_bins: int = 15,
        *,
        adaptive: bool = False,
        class_index: int | None = None,
        n_sub_bins: int = N_SUB_BINS,
    ) -> None:
        self.n_bins = positive_int(n_bins, "n_bins")
        self.adaptive = bool(adaptive)
        self.class_index = (
            None if class_index is None else positive_int(class_index, "class_index", 0)
        )
        self.n_sub_bins = positive_int(
            n_sub_bins, "n_sub_bins", minimum=self.n_bins if adaptive else 1
        )
        super().__init__(zeros(*[(1, self.n_sub_bins if adaptive else self.n_bins)] * 3))

    def _config(self) -> tuple[object, ...]:
        return (self.n_bins, self.adaptive, self.class_index, self.n_sub_bins)

    def update(self, probs: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch: ``probs`` ``(B, C)`` or ``(B,)``, ``labels`` ``(B,)``."""
        p, y = _inputs(self, probs, labels)
        conf, hit = _rows(p, y, classwise=False, target=self.class_index)
        self._add(bin_sums(conf, hit, self.n_sub_bins if self.adaptive else self.n_bins))

    def compute(self) -> ReliabilityDiagram:
        """The diagram so far."""
        binned = self._sums()
        if self.adaptive:
            binned, edges = group_sub_bins(binned, self.n_bins)
        else:
            edges = bin_edges(self.n_bins, binned[0].device)[None]
        return to_diagram(binned, edges)


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy.

    Args:
        probs: Probabilities ``(B, C)``, or ``(B,)`` = P(y = 1).
        labels: Class indices ``(B,)``.

    Returns:
        The fraction of samples whose most probable class (lowest index on ties) is the label.

    Raises:
        TypeError: If an input is not a tensor or numpy array.
        ValueError: On bad shapes, probabilities off the simplex or labels out of range.
    """
    metric = Accuracy()
    metric.update(probs, labels)
    return metric.compute()


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood ``−(1/B) Σ log p_{y}`` in nats (``p_y`` ≥ 1e-12).

    Args and Raises as in ``accuracy``.

    Example:
        >>> nll(torch.tensor([[0.5, 0.5]]), torch.tensor([1]))  # log 2
        0.6931471805599453
    """
    metric = NLL()
    metric.update(probs, labels)
    return metric.compute()


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Brier score: multi-class sum over classes, or the binary single-probability form.

    For ``(B, C)`` probabilities: ``(1/B) Σ_b Σ_c (p_bc − 1[y_b = c])²`` (in ``[0, 2]``).
    For binary ``(B,)`` probabilities ``p = P(y = 1)``: ``(1/B) Σ_b (p_b − y_b)²`` (in
    ``[0, 1]``; as ``sklearn.metrics.brier_score_loss``). Note a ``(B, 2)`` input gives
    twice the value of its ``(B,)`` positive column.

    Args and Raises as in ``accuracy``.
    """
    metric = Brier()
    metric.update(probs, labels)
    return metric.compute()


def ece(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = 15,
    *,
    norm: str | Norm = "l1",
    classwise: bool = False,
    adaptive: bool = False,
) -> float:
    """Calibration error of binned confidences.

    Top-label by default: confidence ``max_c p_c`` against the hit ``1[argmax = y]``; with
    ``classwise`` the mean over classes of the error of ``p_c`` against ``1[y = c]``. Bins
    are ``(lo, hi]`` with the first closed ``[0, hi]``, equal-width over ``[0, 1]``, or with
    ``adaptive`` equal-mass: samples sorted by confidence (ties by hit) and the one of rank
    ``r`` placed in bin ``⌊(r − ½) n_bins / B⌋`` (bin sizes differ by at most one; this is
    exact — the streaming ``ECE(adaptive=True)`` approximates it).

    Args:
        probs: Probabilities ``(B, C)``, or ``(B,)`` = P(y = 1) (read as ``[1 − p, p]``).
        labels: Class indices ``(B,)``.
        n_bins: Number of bins.
        norm: ``"l1"`` (ECE), ``"l2"`` (root-mean-square) or ``"max"`` (MCE); see ``ECE``.
        classwise: Classwise instead of top-label.
        adaptive: Equal-mass instead of equal-width bins.

    Returns:
        The calibration error in ``[0, 1]``.

    Raises:
        TypeError: If an input is not a tensor or numpy array.
        ValueError: On bad inputs or options (the message lists valid values).

    Example:
        >>> probs = torch.tensor([[0.75, 0.25], [0.55, 0.45]], dtype=torch.float64)
        >>> ece(probs, torch.tensor([0, 1]), n_bins=5)  # (|1 − 0.75| + |0 − 0.55|) / 2
        0.4
    """
    metric = ECE(n_bins, norm=norm, classwise=classwise)
    if not adaptive:
        metric.update(probs, labels)
        return metric.compute()
    p, y = _inputs(None, probs, labels)
    conf, hit = _rows(p, y, classwise=classwise, target=None)
    return binned_error(exact_adaptive(conf, hit, metric.n_bins)[0], metric.norm)


def mce(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = 15,
    *,
    classwise: bool = False,
    adaptive: bool = False,
) -> float:
    """Maximum calibration error: ``ece(..., norm="max")``, the largest gap over non-empty bins."""
    return ece(probs, labels, n_bins, norm=Norm.MAX, classwise=classwise, adaptive=adaptive)


def reliability(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = 15,
    *,
    adaptive: bool = False,
    class_index: int | None = None,
) -> ReliabilityDiagram:
    """Reliability diagram: per-bin mean confidence, accuracy and count.

    Args:
        probs: Probabilities ``(B, C)``, or ``(B,)`` = P(y = 1).
        labels: Class indices ``(B,)``.
        n_bins: Number of bins (binning as in ``ece``).
        adaptive: Exact equal-mass bins, as in ``ece``.
        class_index: Bin ``p_c`` of this class against ``1[y = c]`` instead of top-label.

    Returns:
        The diagram; empty bins have NaN confidence and accuracy.

    Raises:
        TypeError: If an input is not a tensor or numpy array.
        ValueError: On bad inputs or options.
    """
    metric = Reliability(n_bins, class_index=class_index)
    if not adaptive:
        metric.update(probs, labels)
        return metric.compute()
    p, y = _inputs(None, probs, labels)
    conf, hit = _rows(p, y, classwise=False, target=metric.class_index)
    return to_diagram(*exact_adaptive(conf, hit, metric.n_bins))
