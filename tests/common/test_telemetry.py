"""Tracing is switched by the standard OpenTelemetry variables, and off means no provider at all."""

from __future__ import annotations

import pytest

from heist_common.telemetry import OFF, export_requested, setup_tracing


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_RESOURCE_ATTRIBUTES": "a=b"}, False),
    ],
)
def test_export_is_requested_only_by_an_otlp_endpoint(environ: dict[str, str], wanted: bool) -> None:
    assert export_requested(environ) is wanted


def test_off_is_no_tracer_and_no_provider() -> None:
    telemetry = setup_tracing("heist-test", {})
    assert telemetry is OFF and telemetry.tracer is None and not telemetry.enabled
    telemetry.shutdown()  # a no-op


def test_on_names_the_service_whatever_otel_service_name_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "everyone-the-same")  # make serve hands one environment to all
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=dev")
    telemetry = setup_tracing("heist-calculator", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    try:
        assert telemetry.enabled and telemetry.provider is not None
        attributes = telemetry.provider.resource.attributes
        assert attributes["service.name"] == "heist-calculator"
        assert attributes["deployment.environment"] == "dev"
    finally:
        telemetry.shutdown()
