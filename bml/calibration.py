"""Temperature scaling: confidences that mean what they say.

The softmax of minus summed squared distances is far too sharp: wrong answers come out at 0.99.
Each vote (`bml.scoring.votes_for`) gets one temperature T, fitted on the val split's episodes by
minimising the negative log-likelihood of softmax(logits / T) over all their queries at once. T
changes no prediction (the argmax is the same), only the confidence. The record (`calibrate`) is
stored in the checkpoint under `bml.checkpoint.CALIBRATION_KEY`: at the end of training in
`last.pth`/`best.pth`, by `eval_bml.py --calibrate --save_calibration PATH` for any checkpoint.
`FewShotClassifier` and `python -m bml.predict` apply the chosen vote's temperature.

Measured by the expected calibration error (ECE, `ECE_BINS` equal-width confidence bins): the
mean, weighted by the bins' query counts, of |accuracy - mean confidence| in each bin.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from bml.checkpoint import (CheckpointError, model_from_state, read_checkpoint, save_checkpoint, temperature_problem,
                            with_calibration)
from bml.datasets import EpisodeRule
from bml.evaluation import EmbeddingOptions, EvaluationError, evaluate_episodes
from bml.utils.messages import warn

ECE_BINS = 15
LOG_TEMPERATURE_RANGE = 12.0
"""The search covers T in logit_scale * exp(+-this): far beyond any fitted value seen."""
SEARCH_STEPS = 50
"""Golden-section steps: the bracket shrinks by 0.618 each, to 3e-11 of its width."""
REJECTION_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
"""Calibrated confidences at which the rejection curve (`rejection_curve`) is reported."""


def temperature_nll(logits: torch.Tensor, labels: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of softmax(logits / T) for each of the (K,) `temperatures`: (K,).

    `logits` (N, C), `labels` (N,); computed in float64.
    """
    scaled = logits.double().unsqueeze(0) / temperatures.double().view(-1, 1, 1)
    log_probabilities = scaled.log_softmax(-1)
    picked = log_probabilities.gather(-1, labels.view(1, -1, 1).expand(len(temperatures), -1, 1))
    return -picked.squeeze(-1).mean(-1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimising the NLL of softmax(logits / T) on (N, C) logits with (N,) true labels.

    The NLL is convex in 1/T, hence unimodal in log T: a golden-section search on log T, every step
    one vectorised pass over all the logits. The bracket is centred on the logits' scale (their mean
    per-query standard deviation), so that it holds for distances of any size.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or len(labels) == 0:
        raise ValueError(f"expected (N, C) logits and (N,) labels, N > 0; got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    logits = logits.double()
    scale = logits.std(-1).mean().clamp_min(1e-12).log().item()
    low, high = scale - LOG_TEMPERATURE_RANGE, scale + LOG_TEMPERATURE_RANGE
    ratio = (math.sqrt(5) - 1) / 2

    def nll(log_temperature: float) -> float:
        return temperature_nll(logits, labels, torch.tensor([math.exp(log_temperature)])).item()

    inner_low, inner_high = high - ratio * (high - low), low + ratio * (high - low)
    nll_low, nll_high = nll(inner_low), nll(inner_high)
    for _ in range(SEARCH_STEPS):
        if nll_low <= nll_high:
            high, inner_high, nll_high = inner_high, inner_low, nll_low
            inner_low = high - ratio * (high - low)
            nll_low = nll(inner_low)
        else:
            low, inner_low, nll_low = inner_low, inner_high, nll_high
            inner_high = low + ratio * (high - low)
            nll_high = nll(inner_high)
    return math.exp((low + high) / 2)


class ReliabilityBins:
    """Query counts, summed confidences and summed correct predictions in `bins` equal-width confidence
    bins (i/bins, (i+1)/bins]: the expected calibration error, accumulated chunk by chunk."""

    def __init__(self, bins: int = ECE_BINS) -> None:
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.confidences = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> None:
        """Add queries: (..., C) logits, labels broadcastable to (...), at temperature T."""
        confidence, prediction = (logits.double() / temperature).softmax(-1).max(-1)
        correct = (prediction == labels).double().flatten().cpu()
        confidence = confidence.flatten().cpu()
        index = (confidence * self.bins).ceil().long().clamp(1, self.bins) - 1
        self.counts.index_add_(0, index, torch.ones_like(confidence))
        self.confidences.index_add_(0, index, confidence)
        self.correct.index_add_(0, index, correct)

    @property
    def ece(self) -> float:
        """sum over bins of count / total * |accuracy - mean confidence| (0 for no queries)."""
        total = self.counts.sum()
        return float((self.correct - self.confidences).abs().sum() / total) if total else 0.0


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                               bins: int = ECE_BINS) -> float:
    """ECE of softmax(logits / T): (..., C) logits, labels broadcastable to (...)."""
    reliability = ReliabilityBins(bins)
    reliability.add(logits, labels, temperature)
    return reliability.ece


class LogitCollector:
    """A `bml.evaluation.LogitsSink` keeping every vote's query logits: vote -> ((N, way) logits, (N,) labels)."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __call__(self, name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.chunks.setdefault(name, []).append(
            (logits.flatten(0, -2).cpu(), labels.expand(logits.shape[:-1]).flatten().cpu()))

    def logits(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.cat(part) for part in zip(*self.chunks[name]))


class CalibrationMeter:
    """A `bml.evaluation.LogitsSink` measuring every vote's ECE without (T = 1) and with its temperature."""

    def __init__(self, temperatures: dict[str, float] | None = None) -> None:
        self.temperatures = temperatures or {}
        self.uncalibrated: dict[str, ReliabilityBins] = {}
        self.calibrated: dict[str, ReliabilityBins] = {}

    def __call__(self, name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.uncalibrated.setdefault(name, ReliabilityBins()).add(logits, labels)
        if name in self.temperatures:
            self.calibrated.setdefault(name, ReliabilityBins()).add(logits, labels, self.temperatures[name])

    def summary(self) -> dict[str, dict[str, float]]:
        """vote -> {'uncalibrated': ECE, 'calibrated': ECE (when it has a temperature)}."""
        return {name: {"uncalibrated": bins.ece,
                       **({"calibrated": self.calibrated[name].ece} if name in self.calibrated else {})}
                for name, bins in self.uncalibrated.items()}


def rejection_curve(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                    thresholds: Sequence[float] = REJECTION_THRESHOLDS) -> list[dict[str, float]]:
    """What a confidence threshold does: per threshold, the fraction of queries kept (calibrated confidence
    >= threshold; the others would be labelled unknown) and the accuracy (%) on those kept."""
    confidence, prediction = (logits.double() / temperature).softmax(-1).max(-1)
    correct = prediction == labels
    kept = confidence.unsqueeze(0) >= torch.tensor(thresholds, dtype=torch.float64).unsqueeze(1)
    counts = kept.sum(1)
    accuracies = 100.0 * (kept & correct).sum(1) / counts.clamp_min(1)
    return [{"threshold": threshold, "kept": count / len(labels), "kept_accuracy": accuracy if count else None}
            for threshold, count, accuracy in zip(thresholds, counts.tolist(), accuracies.tolist())]


def calibrate(model: torch.nn.Module, val_set: torch.utils.data.Dataset, way: int, shot: int, query: int,
              episodes: int, seed: int = 0, device: str | torch.device = "cpu", amp: str = "off",
              num_workers: int = 0, progress: bool = False, rule: EpisodeRule = EpisodeRule()) -> dict:
    """Fit every vote's temperature on `episodes` episodes of `val_set` (its test transform applied), drawn under
    `rule`.

    The record stored in checkpoints: 'temperatures' {vote: T}; 'fitted_on' (split, way, shot, query,
    episodes, seed, and the rule's label when not the free rule); 'val_nll' {vote: {'uncalibrated',
    'calibrated'}}; 'val_rejection' {vote: `rejection_curve`}.
    """
    collector = LogitCollector()
    evaluate_episodes(model, val_set, way, shot, query, episodes, seeds=[seed],
                      options=EmbeddingOptions(device=device, amp=amp, num_workers=num_workers, progress=progress),
                      logits_sink=collector, rule=rule)
    record: dict = {"temperatures": {}, "val_nll": {}, "val_rejection": {},
                    "fitted_on": {"split": getattr(val_set, "split", "val"), "way": way, "shot": shot,
                                  "query": query, "episodes": episodes, "seed": seed,
                                  **({"rule": rule.label} if rule.label else {})}}
    for name in collector.chunks:
        logits, labels = collector.logits(name)
        temperature = fit_temperature(logits, labels)
        problem = temperature_problem(temperature)
        if problem:   # logits with no spread, or all alike: no temperature means anything
            warn(f"the temperature fitted for vote {name} on val, {problem}, is not kept: that vote stays uncalibrated")
            continue
        before, after = temperature_nll(logits, labels, torch.tensor([1.0, temperature])).tolist()
        record["temperatures"][name] = temperature
        record["val_nll"][name] = {"uncalibrated": before, "calibrated": after}
        record["val_rejection"][name] = rejection_curve(logits, labels, temperature)
    return record


def calibrate_checkpoints(paths: Sequence[Path], val_set: torch.utils.data.Dataset, way: int, shot: int,
                          query: int, episodes: int, device: str | torch.device = "cpu", amp: str = "off",
                          num_workers: int = 0, progress: bool = False, rule: EpisodeRule = EpisodeRule()) -> str:
    """Calibrate each existing checkpoint of a finished run in place (one fit per distinct epoch, on episodes drawn
    under `rule`) and return a line to print. A failure returns a line saying so: the trained weights stand,
    uncalibrated."""
    fitted: dict[int, dict] = {}
    lines = []
    try:
        for path in (Path(path) for path in paths if Path(path).is_file()):
            state = read_checkpoint(path)
            epoch = int(state.get("epoch", -1))
            if epoch not in fitted:
                fitted[epoch] = calibrate(model_from_state(state, device, source=str(path)), val_set, way, shot,
                                          query, episodes, device=device, amp=amp, num_workers=num_workers,
                                          progress=progress, rule=rule)
            save_checkpoint(path, with_calibration(state, fitted[epoch]))
            temperatures = ", ".join(f"{name} {value:.3g}" for name, value in fitted[epoch]["temperatures"].items())
            lines.append(f"Calibrated {path} on val: temperatures {temperatures}")
    except (CheckpointError, EvaluationError, OSError) as error:
        return (f"could not calibrate the checkpoints ({error}); calibrate later with: eval_bml.py --ckp_path "
                f"{paths[0]} --calibrate --save_calibration PATH")
    return "\n".join(lines)
