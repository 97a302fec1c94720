"""Metrics (Prometheus text), health and readiness: the renderer, and the running engine's endpoints."""

import urllib.request
from datetime import datetime, timezone

import pytest

from conftest import EXAMPLES, EngineProcess
from engine.mllp.client import MLLPClient
from engine.mllp.listener import Counters
from engine.ops.metrics import Histogram, render


def test_render():
    counters = Counters(frames=3, accepted=2, rejected=1, refused_connections=4)
    latency = Histogram()
    for value in (0.0004, 0.003, 0.2):
        latency.observe(value)
    text = render(counters, {"mllp": 3}, latency, {("fhir-main", "delivered"): 5, ("fhir-main", "dead"): 1},
                  [("fhir-main", "retrying", 2, "2026-11-24T06:00:00.000000Z")],
                  datetime(2026, 11, 24, 6, 1, tzinfo=timezone.utc))
    lines = text.splitlines()
    assert 'hl7bridge_frames_total{listener="mllp"} 3' in lines
    assert 'hl7bridge_messages_total{status="accepted"} 2' in lines
    assert 'hl7bridge_ack_latency_seconds_bucket{le="0.0005"} 1' in lines
    assert 'hl7bridge_ack_latency_seconds_bucket{le="0.005"} 2' in lines
    assert 'hl7bridge_ack_latency_seconds_bucket{le="+Inf"} 3' in lines
    assert 'hl7bridge_deliveries_total{destination="fhir-main",outcome="dead"} 1' in lines
    assert 'hl7bridge_outbox_depth{destination="fhir-main",state="retrying"} 2' in lines
    assert 'hl7bridge_outbox_oldest_age_seconds{destination="fhir-main"} 60.000' in lines
    assert "# TYPE hl7bridge_ack_latency_seconds histogram" in lines


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
def test_the_engine_serves_metrics_health_and_readiness(tmp_path):
    engine = EngineProcess(tmp_path)
    try:
        with MLLPClient("127.0.0.1", engine.port) as client:
            client.send((EXAMPLES / "siu_s12.hl7").read_bytes())
            client.send((EXAMPLES / "bad_msh.hl7").read_bytes())
        assert get(engine.metrics_port, "/healthz") == (200, "ok\n")
        assert get(engine.metrics_port, "/readyz") == (200, "ready\n")
        status, text = get(engine.metrics_port, "/metrics")
        assert status == 200
        assert 'hl7bridge_messages_total{status="accepted"} 1' in text
        assert 'hl7bridge_messages_total{status="rejected"} 1' in text
        assert 'hl7bridge_ack_latency_seconds_count 2' in text
        assert "DOE" not in text and "100234" not in text  # no patient data
    finally:
        engine.stop()
