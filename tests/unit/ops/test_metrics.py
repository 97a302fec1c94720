"""Metrics in the Prometheus text format: the renderer (the running engine's endpoints: tests/e2e)."""

from datetime import datetime, timezone

from engine.mllp.listener import Counters
from engine.ops.metrics import Histogram, render


def test_render():
    counters = Counters(frames=3, accepted=2, rejected=1, refused_connections=4)
    latency = Histogram()
    for value in (0.0004, 0.003, 0.2):
        latency.observe(value)
    text = render(counters, {"mllp": 3}, latency, {("fhir-main", "delivered"): 5, ("fhir-main", "dead"): 1},
                  [("fhir-main", "retrying", 2, "2026-11-24T06:00:00.000000Z")],
                  datetime(2026, 11, 24, 6, 1, tzinfo=timezone.utc),
                  outbox_holds=[("fhir-main", 3, "2026-11-24T06:00:00.000000Z", 1)])
    lines = text.splitlines()
    assert 'hl7bridge_frames_total{listener="mllp"} 3' in lines
    assert 'hl7bridge_messages_total{status="accepted"} 2' in lines
    assert 'hl7bridge_ack_latency_seconds_bucket{le="0.0005"} 1' in lines
    assert 'hl7bridge_ack_latency_seconds_bucket{le="0.005"} 2' in lines
    assert 'hl7bridge_ack_latency_seconds_bucket{le="+Inf"} 3' in lines
    assert 'hl7bridge_deliveries_total{destination="fhir-main",outcome="dead"} 1' in lines
    assert 'hl7bridge_outbox_depth{destination="fhir-main",state="retrying"} 2' in lines
    assert 'hl7bridge_outbox_oldest_age_seconds{destination="fhir-main"} 60.000' in lines
    assert 'hl7bridge_outbox_unconverted{destination="fhir-main"} 3' in lines
    assert 'hl7bridge_outbox_held{destination="fhir-main"} 1' in lines
    assert "# TYPE hl7bridge_ack_latency_seconds histogram" in lines
