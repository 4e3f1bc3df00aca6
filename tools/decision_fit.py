"""Fitting a model's call-or-answer rule (models/decision.py) to labelled turns, and
measuring it: a logistic regression over the model's own evidence, its ROC, and an
operating point.

    fit(Features, labels) -> Fit (weights, the ridge it chose, held-out scores) -> DecisionRule

The features are the evidence decision.py reads: the log-odds of opening a call, and
the turn-end logits at the rule's stride, centred. Each is standardised for the fit
and the weights folded back, so the stored rule applies to the raw evidence. The fit
is Newton's method on the L2-penalised log-likelihood (the bias unpenalised); the
penalty is chosen by cross-validation, and every turn's score used for the ROC, the
AUROC and the operating point is its score from the fold that did not train on it, so
what `outpost models calibrate` reports is what the rule does on turns it has not seen.

The operating point: the highest threshold at which at least `min_recall` of the turns
that needed a call get one (a wrong "answer" costs an agent more than a wrong call: it
gets a made-up fact instead of running its tool), unless `balanced` picks the threshold
of the best balanced accuracy.

What this module must not do: run a model, or read the log (tools/calibrate.py does).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from outpost.manifests.schema import DecisionRule

PENALTIES = (1.0, 3.0, 10.0, 30.0, 100.0)  # the L2 strengths cross-validation chooses from
FOLDS = 5
MIN_EACH = 5  # turns of each kind a fit needs at least


@dataclass(frozen=True)
class Features:
    """The evidence of n turns: open log-odds (n,), turn-end probe readings (n, K) or None."""

    open_logodds: np.ndarray
    probe: np.ndarray | None
    stride: int = 1

    def matrix(self) -> np.ndarray:
        cols = [self.open_logodds[:, None]]
        if self.probe is not None:
            cols.append(self.probe)
        return np.concatenate(cols, axis=1).astype(np.float64)

    def take(self, index: np.ndarray) -> Features:
        return Features(self.open_logodds[index], None if self.probe is None else self.probe[index], self.stride)


@dataclass(frozen=True)
class Fit:
    bias: float
    weights: np.ndarray  # one per feature column: the open log-odds, then the probe
    penalty: float
    heldout: np.ndarray  # each turn's score from the fold that did not train on it
    auroc: float  # of `heldout`

    def score(self, features: Features) -> np.ndarray:
        return self.bias + features.matrix() @ self.weights

    def rule(self, threshold: float, stride: int, fitted_on: str, calls: int) -> DecisionRule:
        w = [round(float(x), 6) for x in self.weights]
        return DecisionRule(bias=round(self.bias, 6), open_weight=w[0], probe_stride=stride, probe_weights=w[1:],
                            threshold=round(threshold, 4), fitted_on=fitted_on, examples=len(self.heldout),
                            calls=calls, auroc=round(self.auroc, 4))


class TooFewTurns(ValueError):
    def __init__(self, calls: int, answers: int) -> None:
        super().__init__(f"{calls} turns that needed a call and {answers} that did not: a fit needs "
                         f"at least {MIN_EACH} of each")
        self.calls, self.answers = calls, answers


def _newton(x: np.ndarray, y: np.ndarray, penalty: float, steps: int = 50) -> tuple[float, np.ndarray]:
    """L2-penalised logistic regression on standardised columns: (bias, weights)."""
    n, d = x.shape
    a = np.concatenate([np.ones((n, 1)), x], axis=1)
    beta = np.zeros(d + 1)
    ridge = np.full(d + 1, penalty)
    ridge[0] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ beta, -30, 30)))
        grad = a.T @ (p - y) + ridge * beta
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(ridge) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.max(np.abs(step)) < 1e-7:
            break
    return float(beta[0]), beta[1:]


def _fit_raw(features: Features, y: np.ndarray, penalty: float) -> tuple[float, np.ndarray]:
    """Fit on standardised columns; the weights folded back onto the raw evidence."""
    x = features.matrix()
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std < 1e-9] = 1.0
    bias, w = _newton((x - mean) / std, y, penalty)
    w_raw = w / std
    return bias - float(w_raw @ mean), w_raw


def folds(keys: list[str], k: int = FOLDS) -> np.ndarray:
    """A fold per turn by a hash of its key: the same turn always lands in the same fold."""
    return np.array([int(hashlib.sha256(key.encode()).hexdigest(), 16) % k for key in keys])


def fit(features: Features, labels: np.ndarray, keys: list[str]) -> Fit:
    """The rule's weights on every turn; the penalty and the held-out scores by CV."""
    y = labels.astype(np.float64)
    calls, answers = int(labels.sum()), int((~labels.astype(bool)).sum())
    if calls < MIN_EACH or answers < MIN_EACH:
        raise TooFewTurns(calls, answers)
    fold = folds(keys)
    best: tuple[float, float, np.ndarray] | None = None  # (auroc, penalty, heldout)
    for penalty in PENALTIES:
        heldout = np.zeros(len(y))
        for f in range(FOLDS):
            test = fold == f
            train = ~test
            if not test.any():
                continue
            if y[train].min() == y[train].max():  # a fold whose training side has one kind
                heldout[test] = 0.0
                continue
            bias, w = _fit_raw(features.take(np.flatnonzero(train)), y[train], penalty)
            heldout[test] = bias + features.take(np.flatnonzero(test)).matrix() @ w
        score = auroc(heldout, labels)
        if best is None or score > best[0] + 1e-9:
            best = (score, penalty, heldout)
    assert best is not None
    bias, w = _fit_raw(features, y, best[1])
    return Fit(bias=bias, weights=w, penalty=best[1], heldout=best[2], auroc=best[0])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The probability that a turn needing a call scores above one that does not (ties half)."""
    labels = labels.astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    # Average ranks over ties.
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@dataclass(frozen=True)
class Point:
    threshold: float
    recall: float  # of the turns that needed a call, the share that would call
    specificity: float  # of those that did not, the share that would answer

    @property
    def balanced(self) -> float:
        return (self.recall + self.specificity) / 2


def roc(scores: np.ndarray, labels: np.ndarray) -> list[Point]:
    """Every distinct threshold's point, from the highest (nothing calls) down."""
    labels = labels.astype(bool)
    n_pos, n_neg = max(1, int(labels.sum())), max(1, int((~labels).sum()))
    points = [Point(float("inf"), 0.0, 1.0)]
    for t in sorted(set(scores.tolist()), reverse=True):
        calls = scores >= t
        points.append(Point(t, float((calls & labels).sum() / n_pos), float((~calls & ~labels).sum() / n_neg)))
    return points


def operating_point(scores: np.ndarray, labels: np.ndarray, min_recall: float | None = 0.9) -> Point:
    """The highest threshold that calls on at least `min_recall` of the turns needing a
    call; with `min_recall` None, the threshold of the best balanced accuracy. A
    threshold between two scores is put halfway, so a turn scored like its neighbours
    is not decided by rounding."""
    points = roc(scores, labels)[1:]
    if min_recall is None:
        chosen = max(points, key=lambda p: (p.balanced, p.threshold))
    else:
        chosen = next((p for p in points if p.recall >= min_recall), points[-1])
    below = scores[scores < chosen.threshold]
    threshold = (chosen.threshold + float(below.max())) / 2 if below.size else chosen.threshold
    return Point(threshold, chosen.recall, chosen.specificity)
