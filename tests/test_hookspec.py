"""The harness's own hooks: a conftest can add to the run JSON and register metrics."""
import json

pytest_plugins = ["pytester"]


def test_hooks_extend_run_json_and_registry(pytester, tiny_model_dir):
    pytester.makeconftest('''
from harness.metrics.registry import MetricSpec

def pytest_harness_register_metrics(registry):
    registry.register(MetricSpec(name="my_score", protocol="mine", higher_is_better=True, aggregation="mean",
                                 unit="fraction", label="mine", description="a plugin metric"))

def pytest_harness_update_run_json(config, run):
    run.setdefault("extra", {})["from_hook"] = len(run["records"])
''')
    pytester.makepyfile(test_x='''
import pytest
pytestmark = pytest.mark.suite("custom")

def test_one(harness, record):
    from harness.metrics.registry import REGISTRY
    assert REGISTRY.get("my_score").higher_is_better is True
    record.add({"my_score": 0.5}, protocol="mine")
''')
    result = pytester.runpytest("--model", str(tiny_model_dir), "--device", "cpu", "--report-dir", str(pytester.path / "out"),
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    run = json.loads((pytester.path / "out" / "latest.json").read_text())
    assert run["extra"]["from_hook"] == 1
    assert run["records"][0]["metrics"]["my_score"] == 0.5
