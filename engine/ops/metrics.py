"""Metrics in the Prometheus text format, from the engine's counters and the outbox. Plain Python.

Served at ``/metrics`` by ``engine.ops.webapi``. Names and labels (docs/operations.md lists them):

    hl7bridge_frames_total{listener}                     frames received
    hl7bridge_messages_total{status}                     accepted, rejected, duplicate, unrouted, mapping_error
    hl7bridge_ack_latency_seconds                        histogram: frame received -> ACK written
    hl7bridge_journal_failures_total                     batches the journal could not store
    hl7bridge_connections_refused_total                  over max_connections or not in allow_peers
    hl7bridge_bytes_discarded_total                      bytes outside MLLP frames
    hl7bridge_tls_handshake_failures_total{listener,reason}  TLS connections refused, and why
    hl7bridge_differing_duplicates_total{policy}         control IDs reused with different content
    hl7bridge_deliveries_total{destination,outcome}      delivered, retrying, dead (per attempt result)
    hl7bridge_outbox_depth{destination,state}            pending, in_flight, retrying, dead now
    hl7bridge_outbox_oldest_age_seconds{destination}     age of the oldest undelivered delivery
    hl7bridge_outbox_unconverted{destination}            messages a converter has still to map for it
    hl7bridge_outbox_held{destination}                   pending deliveries that wait for those (per-key order)
    hl7bridge_file_torn_records_total{destination}       torn records set aside (file destinations)
    hl7bridge_file_already_written_total{destination}    retried deliveries found already in the file
    hl7bridge_reconcile_exceptions{kind,facility}        open scheduling-to-cash exceptions (last 30 days)
    hl7bridge_reconcile_charge_lag_seconds{facility}     histogram: service date -> charge made (last 30 days)
"""

from __future__ import annotations

import bisect
from datetime import datetime

ACK_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
HOUR, DAY = 3600.0, 86400.0
LAG_BUCKETS = (HOUR, 4 * HOUR, 12 * HOUR, DAY, 2 * DAY, 3 * DAY, 5 * DAY, 7 * DAY, 14 * DAY, 30 * DAY)


class Histogram:
    """A cumulative histogram with fixed buckets, as Prometheus expects."""

    def __init__(self, buckets=ACK_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float):
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, **labels) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f"{name}_bucket{_labels(**labels, le=bound)} {running}")
        out.append(f'{name}_bucket{_labels(**labels, le="+Inf")} {self.count}')
        out.append(f"{name}_sum{_labels(**labels)} {self.total:.6f}")
        out.append(f"{name}_count{_labels(**labels)} {self.count}")
        return out


def _labels(**labels) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


def render(counters, per_listener: dict, ack_latency: Histogram, delivery_counts: dict,
           outbox_open: list[tuple[str, str, int, str | None]], now: datetime,
           sender_counts: dict | None = None, listeners: list | None = None,
           configuration: dict | None = None, reconcile: dict | None = None,
           outbox_holds: list[tuple[str, int, str | None, int]] = ()) -> str:
    """The whole /metrics page.

    ``delivery_counts`` maps (destination, outcome) to a count; ``outbox_open`` is rows of
    (destination, state, count, oldest created_at) for the states that are not delivered;
    ``listeners`` and ``configuration`` are what ``engine.ops.status.Status`` says of them;
    ``reconcile`` is ``engine.reconcile.queue.gauges``; ``outbox_holds`` is rows of
    ``Journal.outbox_holds()``.
    """
    lines = []

    def metric(name, kind, help_text, samples):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)

    metric("hl7bridge_frames_total", "counter", "MLLP frames received.",
           [f"hl7bridge_frames_total{_labels(listener=name)} {n}" for name, n in sorted(per_listener.items())])
    statuses = {"accepted": counters.accepted, "rejected": counters.rejected, "duplicate": counters.duplicates,
                "unrouted": counters.unrouted, "mapping_error": counters.mapping_errors}
    metric("hl7bridge_messages_total", "counter", "Messages by outcome at ingest.",
           [f"hl7bridge_messages_total{_labels(status=s)} {n}" for s, n in statuses.items()])
    metric("hl7bridge_ack_latency_seconds", "histogram", "From a frame's last byte to its ACK.",
           ack_latency.lines("hl7bridge_ack_latency_seconds"))
    metric("hl7bridge_journal_failures_total", "counter", "Messages answered AE because the journal failed.",
           [f"hl7bridge_journal_failures_total {counters.journal_failures}"])
    metric("hl7bridge_connections_refused_total", "counter", "Connections refused by a listener's limits.",
           [f"hl7bridge_connections_refused_total {counters.refused_connections}"])
    metric("hl7bridge_tls_handshake_failures_total", "counter", "TLS connections refused, by listener and reason.",
           [f"hl7bridge_tls_handshake_failures_total{_labels(listener=name, reason=code)} {n}"
            for (name, code), n in sorted(getattr(counters, "tls_failures", {}).items())])
    metric("hl7bridge_differing_duplicates_total", "counter",
           "Messages that reused a control ID with different content, by the route's policy.",
           [f"hl7bridge_differing_duplicates_total{_labels(policy=p)} {n}"
            for p, n in sorted(getattr(counters, "differing_duplicates", {}).items())])
    metric("hl7bridge_bytes_discarded_total", "counter", "Bytes received outside MLLP frames.",
           [f"hl7bridge_bytes_discarded_total {counters.discarded_bytes}"])
    metric("hl7bridge_deliveries_total", "counter", "Delivery attempts by what they came to.",
           [f"hl7bridge_deliveries_total{_labels(destination=d, outcome=o)} {n}"
            for (d, o), n in sorted(delivery_counts.items())])
    depth, oldest = [], {}
    for destination, state, count, created in outbox_open:
        depth.append(f"hl7bridge_outbox_depth{_labels(destination=destination, state=state)} {count}")
        if created and (destination not in oldest or created < oldest[destination]):
            oldest[destination] = created
    metric("hl7bridge_outbox_depth", "gauge", "Deliveries not yet delivered, by state.", depth)
    ages = []
    for destination, created in sorted(oldest.items()):
        age = (now - datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds()
        ages.append(f"hl7bridge_outbox_oldest_age_seconds{_labels(destination=destination)} {max(0.0, age):.3f}")
    metric("hl7bridge_outbox_oldest_age_seconds", "gauge", "Age of the oldest undelivered delivery.", ages)
    metric("hl7bridge_outbox_unconverted", "gauge", "Messages waiting for a converter that will be delivered here.",
           [f"hl7bridge_outbox_unconverted{_labels(destination=d)} {n}" for d, n, _, _ in outbox_holds])
    metric("hl7bridge_outbox_held", "gauge",
           "Pending deliveries held back until an earlier message with their key is converted.",
           [f"hl7bridge_outbox_held{_labels(destination=d)} {n}" for d, _, _, n in outbox_holds])
    sender_counts = sender_counts or {}
    for counter, name, help_text in (
        ("torn_records_set_aside", "hl7bridge_file_torn_records_total",
         "Torn records (a crash during a write) cut off a file destination's file and set aside."),
        ("already_written", "hl7bridge_file_already_written_total",
         "Retried or resumed deliveries whose records were already in the file (not written twice)."),
    ):
        metric(name, "counter", help_text,
               [f"{name}{_labels(destination=d)} {n}" for (d, c), n in sorted(sender_counts.items()) if c == counter])
    if listeners is not None:
        metric("hl7bridge_open_connections", "gauge", "MLLP connections open now, by listener.",
               [f"hl7bridge_open_connections{_labels(listener=item['name'])} {len(item['open'])}" for item in listeners])
    if configuration is not None:
        reloads = configuration.get("reloads") or {}
        metric("hl7bridge_config_reloads_total", "counter", "Reloads of routes, mappings and destinations, by outcome.",
               [f"hl7bridge_config_reloads_total{_labels(outcome=o)} {reloads.get(o, 0)}" for o in ("ok", "refused")])
        last = configuration.get("last_reload")
        metric("hl7bridge_config_last_reload_successful", "gauge",
               "1 when the last reload took (or none was asked for), 0 when it was refused.",
               [f"hl7bridge_config_last_reload_successful {0 if last and not last['ok'] else 1}"])
    if reconcile is not None:
        metric("hl7bridge_reconcile_exceptions", "gauge",
               "Open scheduling-to-cash exceptions of the last 30 days, by kind and sending facility.",
               [f"hl7bridge_reconcile_exceptions{_labels(kind=k, facility=f)} {n}"
                for (k, f), n in sorted(reconcile["exceptions"].items())])
        samples = []
        for facility, values in sorted(reconcile["lag"].items()):
            histogram = Histogram(LAG_BUCKETS)
            for value in values:
                histogram.observe(value)
            samples += histogram.lines("hl7bridge_reconcile_charge_lag_seconds", facility=facility)
        metric("hl7bridge_reconcile_charge_lag_seconds", "histogram",
               "From the service date to the charge being made, charges of the last 30 days, by facility.", samples)
    return "\n".join(lines) + "\n"
