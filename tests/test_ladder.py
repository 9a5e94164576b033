"""The recovery ladder's order, bookkeeping and stopping rules, with a fake backend (no model, no runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from converters.gate import GateResult
from converters.ladder import (
    INITIAL,
    MAX_FLOAT_NODES,
    Attempt,
    LayerError,
    QuantSettings,
    attempts_table,
    first_rungs,
    float_layer_rungs,
    max_float_nodes,
    run_ladder,
)
from edge_agent.errors import ConversionError

THRESHOLD = 0.99


def judge(quality: dict[str, Any]) -> GateResult:
    value = quality["value"]
    return GateResult(value >= THRESHOLD, "top1_agreement", value, THRESHOLD, f"agreement {value}")


class FakeBackend:
    """Scores settings with ``score(settings)``; records what it was asked to quantize."""

    def __init__(self, score: Any, ranking: list[LayerError] | None = None, node_count: int = 20,
                 methods: tuple[str, ...] = ("minmax", "entropy", "percentile"),
                 broken: set[str] | None = None, ranking_error: str | None = None) -> None:
        self.score, self.ranking, self.node_count, self.methods = score, ranking or [], node_count, methods
        self.broken, self.ranking_error = broken or set(), ranking_error
        self.quantized: list[QuantSettings] = []
        self.scores: dict[Path, float] = {}
        self.ranked: list[QuantSettings] = []

    def quantize(self, settings: QuantSettings, dst: Path) -> list[str]:
        self.quantized.append(settings)
        if settings.method in self.broken:
            raise ConversionError(f"the quantizer crashed on {settings.method}")
        self.scores[dst] = self.score(settings)
        return [f"quantized {settings.describe()}"]

    def evaluate(self, model: Path) -> dict[str, Any]:
        return {"value": self.scores[model]}

    def layer_errors(self, model: Path, settings: QuantSettings) -> list[LayerError]:
        self.ranked.append(settings)
        if self.ranking_error:
            raise ConversionError(self.ranking_error)
        return self.ranking


def _first(settings: QuantSettings, value: float) -> Attempt:
    return Attempt(INITIAL, settings, judge({"value": value}), 0.1, Path("initial.model"), {"value": value})


START = QuantSettings(per_channel=True, method="minmax")
RANKING = [LayerError("act2", 1.5, ("relu2", "fc3", "fc2")), LayerError("act1", 30.0, ("relu1", "fc2", "fc1")),
           LayerError("x", 40.0, ("fc1",)), LayerError("logits", 41.0, ("fc4",))]


def test_rung_order_flips_granularity_then_tries_the_other_methods() -> None:
    rungs = first_rungs(START, ("minmax", "entropy", "percentile"))
    assert [(name, s.per_channel, s.method, skip) for name, s, skip in rungs] == [
        ("per_tensor", False, "minmax", None),
        ("method_entropy", True, "entropy", None),
        ("method_percentile", True, "percentile", None),
    ]
    rungs = first_rungs(QuantSettings(per_channel=False, method="entropy"), ("minmax",))
    assert [(name, skip is None) for name, _, skip in rungs] == [
        ("per_channel", True), ("method_minmax", True), ("method_percentile", False)]
    assert "not available" in (rungs[2][2] or "")


def test_float_layer_rungs_double_k_and_skip_layers_already_float() -> None:
    rungs, stop = float_layer_rungs(START, RANKING, limit=16)
    assert stop is None
    assert [(name, s.float_layers) for name, s in rungs] == [
        ("float_layers_1", ("relu2", "fc3", "fc2")),
        ("float_layers_2", ("relu2", "fc3", "fc2", "relu1", "fc1")),
        ("float_layers_4", ("relu2", "fc3", "fc2", "relu1", "fc1", "fc4")),
    ]
    # the user keeps fc1 in float: layer x adds nothing, and fc1 is not repeated in float_layers
    user = QuantSettings(per_channel=True, method="minmax", exclude_nodes=("fc1",))
    rungs, _ = float_layer_rungs(user, RANKING, limit=16)
    assert [s.float_layers for _, s in rungs][-1] == ("relu2", "fc3", "fc2", "relu1", "fc4")
    assert rungs[-1][1].float_nodes == ("fc1", "relu2", "fc3", "fc2", "relu1", "fc4")


def test_float_layer_rungs_stop_at_the_node_limit() -> None:
    rungs, stop = float_layer_rungs(START, RANKING, limit=4)
    assert [name for name, _ in rungs] == ["float_layers_1"]
    assert stop is not None and "needs 5 float nodes, more than the ladder's limit of 4" in stop
    rungs, stop = float_layer_rungs(START, [], limit=4)
    assert rungs == [] and "no layer" in (stop or "")


def test_max_float_nodes() -> None:
    assert [max_float_nodes(n) for n in (1, 2, 7, 8, 100)] == [1, 1, 3, 4, MAX_FLOAT_NODES]


def test_first_passing_rung_wins_and_later_rungs_never_run(tmp_path: Path) -> None:
    backend = FakeBackend(lambda s: 1.0 if s.method == "entropy" else 0.5)
    result = run_ladder(backend, _first(START, 0.5), judge, tmp_path)
    assert result.passed is not None and result.passed.rung == "method_entropy"
    assert [a.rung for a in result.attempts] == [INITIAL, "per_tensor", "method_entropy"]
    assert [s.method for s in backend.quantized] == ["minmax", "entropy"]
    assert backend.ranked == []  # no per-layer ranking was needed
    assert result.passed.notes == ["quantized per-channel, entropy"]
    assert all(a.seconds >= 0 for a in result.attempts)


def test_float_layers_start_from_the_best_rung_so_far(tmp_path: Path) -> None:
    def score(s: QuantSettings) -> float:
        if s.float_layers:
            return 1.0 if "fc2" in s.float_layers and not s.per_channel else 0.7
        return 0.8 if not s.per_channel else 0.6

    backend = FakeBackend(score, RANKING)
    result = run_ladder(backend, _first(START, 0.6), judge, tmp_path)
    assert result.passed is not None and result.passed.rung == "float_layers_1"
    assert result.passed.settings == QuantSettings(per_channel=False, method="minmax",
                                                   float_layers=("relu2", "fc3", "fc2"))
    assert backend.ranked == [QuantSettings(per_channel=False, method="minmax")]  # the per_tensor rung (0.8)
    assert result.worst_layers == RANKING


def test_nothing_passes_every_rung_is_recorded(tmp_path: Path) -> None:
    backend = FakeBackend(lambda s: 0.5, RANKING, node_count=8)
    result = run_ladder(backend, _first(START, 0.5), judge, tmp_path)
    assert result.passed is None
    assert [a.rung for a in result.attempts] == [INITIAL, "per_tensor", "method_entropy", "method_percentile",
                                                 "float_layers_1", "float_layers"]
    stop = result.attempts[-1]
    assert stop.gate is None and stop.error is not None and stop.error.startswith("stopped:")
    assert "limit of 4" in stop.error
    table = attempts_table(result.attempts, result.worst_layers)
    lines = table.splitlines()
    assert lines[0].split() == ["rung", "settings", "metric", "value", "threshold", "passed", "seconds"]
    assert any(line.split()[0] == "float_layers_1" and " no " in line for line in lines)
    assert "worst layers" in table and "act2: 1.5 dB (nodes: relu2, fc3, fc2)" in table
    assert "float_layers: stopped:" in table


def test_a_rung_the_quantizer_cannot_build_is_recorded_and_the_ladder_goes_on(tmp_path: Path) -> None:
    backend = FakeBackend(lambda s: 1.0 if s.method == "percentile" else 0.5, broken={"entropy"})
    result = run_ladder(backend, _first(START, 0.5), judge, tmp_path)
    assert result.passed is not None and result.passed.rung == "method_percentile"
    failed = result.attempts[2]
    assert (failed.rung, failed.gate, failed.model) == ("method_entropy", None, None)
    assert failed.error == "the quantizer crashed on entropy"
    assert failed.to_dict()["passed"] is False and failed.to_dict()["value"] is None


def test_unavailable_methods_and_ranking_errors_are_recorded(tmp_path: Path) -> None:
    backend = FakeBackend(lambda s: 0.5, methods=("minmax",), ranking_error="needs the Keras source")
    result = run_ladder(backend, _first(START, 0.5), judge, tmp_path)
    assert result.passed is None
    assert [(a.rung, (a.error or "")[:8]) for a in result.attempts] == [
        (INITIAL, ""), ("per_tensor", ""), ("method_entropy", "skipped:"), ("method_percentile", "skipped:"),
        ("float_layers", "skipped:")]
    assert result.attempts[-1].error == "skipped: needs the Keras source"
    assert [s.method for s in backend.quantized] == ["minmax"]  # skipped rungs never quantize


def test_attempt_to_dict_is_the_report_row() -> None:
    a = _first(QuantSettings(per_channel=False, method="entropy", exclude_op_types=("Softmax",)), 0.5)
    assert a.to_dict() == {
        "rung": INITIAL, "describe": "per-tensor, entropy",
        "settings": {"per_channel": False, "method": "entropy", "exclude_nodes": [],
                     "exclude_op_types": ["Softmax"], "float_layers": []},
        "metric": "top1_agreement", "value": 0.5, "threshold": THRESHOLD, "passed": False, "seconds": 0.1,
        "error": None}


@pytest.mark.parametrize("value", [float("inf"), 0.25])
def test_table_formats_numbers(value: float) -> None:
    text = attempts_table([_first(START, value)], [LayerError("t", float("-inf"), ())])
    assert ("inf" if value == float("inf") else "0.25") in text and "t: -inf dB" in text
