"""The running engine's /metrics, /healthz and /readyz over HTTP."""

import urllib.error
import urllib.request

import pytest

from conftest import EXAMPLES, EngineProcess
from engine.mllp.client import MLLPClient


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
