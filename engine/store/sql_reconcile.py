"""The scheduling-to-cash record in SQL, for both backends: appointments, their events, charge
lines, the messages behind each line, and acknowledgements. Mixed into ``engine.store.sql.SqlJournal``.

Tables (schema version 7, created by ``create_tables`` on either backend):

    rc_appointment_events  one row per (message, appointment): what that message said
    rc_appointments        the current state of each appointment (facility + SCH-2, else SCH-1)
    rc_charges             one row per charge line (facility + FT1-2, else message + set ID), its
                           link to an appointment and the rule that made it
    rc_charge_messages     every message that carried a charge line (resends included): its
                           deliveries say where the line got to
    rc_acks                acknowledged exceptions (who, when, the note)

The statements are plain SQL both backends run (``INSERT ... ON CONFLICT``, partial indexes), with
``?`` parameters, through the backend's ``_all``, ``_rows`` and ``_run``; the one difference is in
the DDL: the two tables clustered by key are WITHOUT ROWID on SQLite.
"""

from __future__ import annotations

from .base import Candidates

APPOINTMENT_COLUMNS = ("status", "filler_status", "start_at", "start_day", "patient_id", "visit_id", "location",
                       "provider", "placer_id", "filler_id", "cancelled_at", "same_day_cancel", "first_message_id",
                       "last_message_id", "updated_at")
EVENT_COLUMNS = ("trigger", "event", "status", "filler_status", "start_at", "start_day", "patient_id", "visit_id",
                 "location", "provider", "placer_id", "filler_id", "occurred_at")
CHARGE_COLUMNS = ("transaction_id", "set_id", "type_code", "kind", "code", "service_at", "service_day", "made_at",
                  "amount", "currency", "patient_id", "visit_id")
LINK_COLUMNS = ("appointment_id", "link_rule", "appointment_start", "lag_s")
CHARGE_SELECT = ("c.facility, c.charge_key, c.transaction_id, c.kind, c.type_code, c.code, c.service_at, "
                 "c.service_day, c.made_at, c.amount, c.currency, c.patient_id, c.visit_id, c.appointment_id, "
                 "c.link_rule, c.appointment_start, c.lag_s, c.received_at, c.first_message_id")


def create_tables(run, sqlite: bool):
    """Create the tables and indexes with ``run(sql)`` (the backend's statement runner)."""
    clustered = " WITHOUT ROWID" if sqlite else ""
    run(
        "CREATE TABLE rc_appointment_events (message_id INTEGER NOT NULL, facility TEXT NOT NULL, "
        "appointment_id TEXT NOT NULL, " + ", ".join(f'"{c}" TEXT' for c in EVENT_COLUMNS) + ", "
        "PRIMARY KEY (facility, appointment_id, message_id))" + clustered)
    run("CREATE INDEX idx_rc_events_message ON rc_appointment_events (message_id)")
    run(
        "CREATE TABLE rc_appointments (facility TEXT NOT NULL, appointment_id TEXT NOT NULL, status TEXT NOT NULL, "
        "filler_status TEXT, start_at TEXT, start_day TEXT, patient_id TEXT, visit_id TEXT, location TEXT, "
        "provider TEXT, placer_id TEXT, filler_id TEXT, cancelled_at TEXT, same_day_cancel INTEGER NOT NULL DEFAULT 0, "
        "first_message_id INTEGER, last_message_id INTEGER, updated_at TEXT, charged INTEGER NOT NULL DEFAULT 0, "
        "PRIMARY KEY (facility, appointment_id))")
    run("CREATE INDEX idx_rc_appointments_start ON rc_appointments (start_at, facility, status, same_day_cancel)")
    # The missed-charge candidates: few at any time, so this index stays small.
    run("CREATE INDEX idx_rc_appointments_uncharged ON rc_appointments (start_at) "
        "WHERE charged = 0 AND status IN ('booked', 'arrived', 'fulfilled')")
    run("CREATE INDEX idx_rc_appointments_visit ON rc_appointments (facility, visit_id) WHERE visit_id != ''")
    run("CREATE INDEX idx_rc_appointments_patient ON rc_appointments (facility, patient_id, start_day)")
    run(
        "CREATE TABLE rc_charges (facility TEXT NOT NULL, charge_key TEXT NOT NULL, transaction_id TEXT, set_id TEXT, "
        "type_code TEXT, kind TEXT NOT NULL, code TEXT, service_at TEXT, service_day TEXT, made_at TEXT NOT NULL, "
        "amount REAL, currency TEXT, patient_id TEXT, visit_id TEXT, appointment_id TEXT, link_rule TEXT, "
        "appointment_start TEXT, lag_s REAL, received_at TEXT NOT NULL, first_message_id INTEGER NOT NULL, "
        "PRIMARY KEY (facility, charge_key))")
    # A window's lines answered from the index alone (the KPIs, the late and unlinked scans).
    run("CREATE INDEX idx_rc_charges_made ON rc_charges (made_at, facility, kind, appointment_id, lag_s, "
        "first_message_id)")
    run("CREATE INDEX idx_rc_charges_appointment ON rc_charges (facility, appointment_id) "
                 "WHERE appointment_id IS NOT NULL")
    run("CREATE INDEX idx_rc_charges_unlinked_visit ON rc_charges (facility, visit_id) WHERE appointment_id IS NULL")
    run("CREATE INDEX idx_rc_charges_unlinked_patient ON rc_charges (facility, patient_id) "
                 "WHERE appointment_id IS NULL")
    run(
        "CREATE TABLE rc_charge_messages (facility TEXT NOT NULL, charge_key TEXT NOT NULL, message_id INTEGER NOT NULL, "
        "PRIMARY KEY (facility, charge_key, message_id))" + clustered)
    run("CREATE TABLE rc_acks (exception_id TEXT PRIMARY KEY, who TEXT NOT NULL, note TEXT NOT NULL, "
                 "at TEXT NOT NULL)")


def _marks(items) -> str:
    return ", ".join("?" for _ in items)


_CHARGE_INSERTED = ("facility", "charge_key") + CHARGE_COLUMNS + LINK_COLUMNS + ("received_at", "first_message_id")
INSERT_CHARGE_SQL = (f"INSERT INTO rc_charges ({', '.join(_CHARGE_INSERTED)}) VALUES ({_marks(_CHARGE_INSERTED)}) "
                     "ON CONFLICT (facility, charge_key) DO NOTHING")


class ReconcileQueries:
    """The reconcile methods of ``engine.store.base.Journal``, over the backend's ``_all``, ``_rows``
    and ``_run``."""

    def record_appointment_event(self, message_id: int, event: dict):
        columns = ("message_id", "facility", "appointment_id") + EVENT_COLUMNS
        self._run(
            f"INSERT INTO rc_appointment_events ({', '.join(repr_col(c) for c in columns)}) VALUES ({_marks(columns)}) "
            f"ON CONFLICT (facility, appointment_id, message_id) DO UPDATE SET "
            + ", ".join(f"{repr_col(c)} = excluded.{repr_col(c)}" for c in EVENT_COLUMNS),
            message_id, event["facility"], event["appointment_id"], *(event.get(c) for c in EVENT_COLUMNS))

    def appointment_events(self, facility: str, appointment_id: str) -> list[dict]:
        return self._rows(
            "SELECT message_id, facility, appointment_id, " + ", ".join(repr_col(c) for c in EVENT_COLUMNS) +
            " FROM rc_appointment_events WHERE facility = ? AND appointment_id = ? ORDER BY message_id",
            facility, appointment_id)

    def put_appointment(self, facility: str, appointment_id: str, state: dict):
        columns = ("facility", "appointment_id") + APPOINTMENT_COLUMNS
        self._run(
            f"INSERT INTO rc_appointments ({', '.join(columns)}) VALUES ({_marks(columns)}) "
            "ON CONFLICT (facility, appointment_id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in APPOINTMENT_COLUMNS),
            facility, appointment_id, *(state.get(c) for c in APPOINTMENT_COLUMNS))

    def record_charge_line(self, message_id: int, received_at: str, line: dict):
        self._run(INSERT_CHARGE_SQL, line["facility"], line["charge_key"],
                  *(line.get(c) for c in CHARGE_COLUMNS + LINK_COLUMNS), received_at, message_id)
        self._run(
            "INSERT INTO rc_charge_messages (facility, charge_key, message_id) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            line["facility"], line["charge_key"], message_id)

    def link_candidates(self, facility: str, visit_id: str, patient_id: str) -> list[dict]:
        columns = "appointment_id, status, start_at, start_day, patient_id, visit_id"
        rows = []
        if visit_id:
            rows += self._rows(f"SELECT {columns} FROM rc_appointments WHERE facility = ? AND visit_id = ? "
                               "AND visit_id != ''", facility, visit_id)
        if patient_id:
            rows += self._rows(f"SELECT {columns} FROM rc_appointments WHERE facility = ? AND patient_id = ?",
                               facility, patient_id)
        unique = {row["appointment_id"]: row for row in rows}
        return list(unique.values())

    def charges_to_relink(self, facility: str, appointment_id: str, visit_id: str, patient_id: str,
                          linked: bool = True) -> list[dict]:
        rows = []
        if linked:
            rows += self._rows(f"SELECT {CHARGE_SELECT} FROM rc_charges c WHERE c.facility = ? AND c.appointment_id = ?",
                               facility, appointment_id)
        if visit_id or patient_id:
            # One statement, two partial indexes (SQLite's multi-index OR; PostgreSQL's bitmap OR).
            rows += self._rows(
                f"SELECT {CHARGE_SELECT} FROM rc_charges c WHERE c.appointment_id IS NULL "
                "AND ((c.facility = ? AND c.visit_id = ?) OR (c.facility = ? AND c.patient_id = ?))",
                facility, visit_id or None, facility, patient_id or None)
        return list({row["charge_key"]: row for row in rows}.values())

    def set_charge_link(self, facility, charge_key, appointment_id, rule, appointment_start, lag_s):
        self._run(
            "UPDATE rc_charges SET appointment_id = ?, link_rule = ?, appointment_start = ?, lag_s = ? "
            "WHERE facility = ? AND charge_key = ?", appointment_id, rule, appointment_start, lag_s, facility, charge_key)

    def refresh_charged(self, facility: str, appointment_id: str, linked: bool = False):
        if linked:  # a charge or credit was just linked to it: no need to look
            self._run("UPDATE rc_appointments SET charged = 1 WHERE facility = ? AND appointment_id = ? AND charged = 0",
                      facility, appointment_id)
            return
        self._run(
            "UPDATE rc_appointments SET charged = CASE WHEN EXISTS (SELECT 1 FROM rc_charges c WHERE c.facility = ? "
            "AND c.appointment_id = ? AND c.kind IN ('charge', 'credit')) THEN 1 ELSE 0 END "
            "WHERE facility = ? AND appointment_id = ?", facility, appointment_id, facility, appointment_id)

    def clear_reconcile(self):
        for table in ("rc_appointment_events", "rc_appointments", "rc_charges", "rc_charge_messages"):
            self._run(f"DELETE FROM {table}")

    def reconcile_sources(self, after_id: int, limit: int) -> list[tuple]:
        return self._all(
            "SELECT id, raw, charset, route, received_at FROM messages WHERE id > ? "
            "AND status IN ('mapped', 'mapping_error') ORDER BY id LIMIT ?", after_id, limit)

    def _message_ids(self, table: str, key: str, keys: list[tuple]) -> dict:
        """{(facility, key): [message IDs]} for the given keys, from ``table``."""
        found: dict[tuple, list] = {}
        for start in range(0, len(keys), 400):
            chunk = keys[start:start + 400]
            where = " OR ".join(f"(facility = ? AND {key} = ?)" for _ in chunk)
            params = [value for pair in chunk for value in pair]
            for facility, value, message_id in self._all(
                    f"SELECT facility, {key}, message_id FROM {table} WHERE {where} ORDER BY message_id", *params):
                found.setdefault((facility, value), []).append(message_id)
        return found

    def reconcile_candidates(self, since, as_of, cutoff, late_after, facility, erp_destinations):
        only = " AND {t}.facility = ?" if facility else ""
        extra = [facility] if facility else []
        missed = self._rows(
            "SELECT a.facility, a.appointment_id, a.status, a.start_at, a.start_day, a.patient_id, a.visit_id, "
            "a.location, a.provider FROM rc_appointments a WHERE a.start_at >= ? AND a.start_at < ? "
            "AND a.charged = 0 AND a.status IN ('booked', 'arrived', 'fulfilled')" + only.format(t="a") +
            " ORDER BY a.start_at", since, cutoff, *extra)
        window = "c.made_at >= ? AND c.made_at < ?" + only.format(t="c")
        late = self._rows(f"SELECT {CHARGE_SELECT} FROM rc_charges c WHERE {window} AND c.appointment_id IS NOT NULL "
                          "AND c.lag_s > ? ORDER BY c.made_at", since, as_of, *extra, late_after)
        unlinked = self._rows(f"SELECT {CHARGE_SELECT} FROM rc_charges c WHERE {window} AND c.appointment_id IS NULL "
                              "ORDER BY c.made_at", since, as_of, *extra)
        # One pass over the window's lines (the covering index, one lookup of the first message's
        # ERP delivery each) gives the KPIs their lags and finds the lines not posted; those are
        # then checked against all their messages (a resend may have been posted) and read whole.
        lines, unposted = [], []
        if erp_destinations:
            erp = _marks(erp_destinations)
            posted = (f"(SELECT min(d.delivered_at) FROM deliveries d WHERE d.message_id = c.first_message_id "
                      f"AND d.destination IN ({erp}) AND d.delivered_at <= ?)")
            params = [*erp_destinations, as_of]
        else:
            posted, params = "NULL", []
        lines = self._all(f"SELECT c.facility, c.kind, c.lag_s, c.made_at, {posted}, c.charge_key FROM rc_charges c "
                          f"WHERE {window}", *params, since, as_of, *extra)
        waiting = [(line[0], line[5]) for line in lines if line[4] is None] if erp_destinations else []
        for start in range(0, len(waiting), 400):
            chunk = waiting[start:start + 400]
            keys = " OR ".join("(c.facility = ? AND c.charge_key = ?)" for _ in chunk)
            unposted += self._rows(
                f"SELECT {CHARGE_SELECT}, (SELECT m.status FROM messages m WHERE m.id = c.first_message_id) "
                f"AS message_status FROM rc_charges c WHERE ({keys}) AND NOT EXISTS (SELECT 1 FROM rc_charge_messages cm "
                "JOIN deliveries d ON d.message_id = cm.message_id WHERE cm.facility = c.facility "
                f"AND cm.charge_key = c.charge_key AND d.destination IN ({erp}) AND d.delivered_at <= ?)",
                *(value for pair in chunk for value in pair), *erp_destinations, as_of)
        unposted.sort(key=lambda row: (row["made_at"], row["facility"], row["charge_key"]))
        appointment_ids = self._message_ids(
            "rc_appointment_events", "appointment_id",
            sorted({(r["facility"], r["appointment_id"]) for r in missed + late}))
        charge_ids = self._message_ids("rc_charge_messages", "charge_key",
                                       sorted({(r["facility"], r["charge_key"]) for r in late + unlinked + unposted}))
        for row in missed:
            row["message_ids"] = appointment_ids.get((row["facility"], row["appointment_id"]), [])
        for row in late:
            row["appointment_message_ids"] = appointment_ids.get((row["facility"], row["appointment_id"]), [])
        for row in late + unlinked + unposted:
            row["message_ids"] = charge_ids.get((row["facility"], row["charge_key"]), [])
        for row in unposted:
            row["deliveries"] = self._charge_deliveries(row["facility"], row["charge_key"])
        return Candidates(missed, late, unlinked, unposted, [line[:5] for line in lines])

    def _charge_deliveries(self, facility: str, charge_key: str) -> list[dict]:
        return self._rows(
            "SELECT d.message_id, d.destination, d.state, d.attempts, d.delivered_at, d.last_error FROM rc_charge_messages cm "
            "JOIN deliveries d ON d.message_id = cm.message_id WHERE cm.facility = ? AND cm.charge_key = ? "
            "ORDER BY d.message_id, d.id", facility, charge_key)

    def reconcile_kpi_rows(self, since, as_of, facility, cutoffs, default_cutoff):
        only = " AND facility = ?" if facility else ""
        due = "CASE facility " + " ".join("WHEN ? THEN ?" for _ in cutoffs) + " ELSE ? END" if cutoffs else "?"
        due_params = [value for pair in sorted(cutoffs.items()) for value in pair] + [default_cutoff]
        return self._all(
            f"SELECT facility, status, count(*), sum(same_day_cancel), sum(CASE WHEN start_at < {due} THEN 1 ELSE 0 END) "
            f"FROM rc_appointments WHERE start_at >= ? AND start_at < ?{only} GROUP BY facility, status",
            *due_params, since, as_of, *([facility] if facility else []))

    def appointment_record(self, facility: str, appointment_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM rc_appointments WHERE facility = ? AND appointment_id = ?", facility, appointment_id)
        if not rows:
            return None
        record = rows[0]
        record["history"] = sorted(self.appointment_events(facility, appointment_id),
                                   key=lambda e: (e["occurred_at"] or "", e["message_id"]))
        record["charges"] = [self.charge_record(facility, row["charge_key"]) for row in self._rows(
            "SELECT charge_key FROM rc_charges WHERE facility = ? AND appointment_id = ? ORDER BY made_at",
            facility, appointment_id)]
        return record

    def charge_record(self, facility: str, charge_key: str) -> dict | None:
        rows = self._rows(f"SELECT {CHARGE_SELECT} FROM rc_charges c WHERE c.facility = ? AND c.charge_key = ?",
                          facility, charge_key)
        if not rows:
            return None
        record = rows[0]
        record["message_ids"] = [r[0] for r in self._all(
            "SELECT message_id FROM rc_charge_messages WHERE facility = ? AND charge_key = ? ORDER BY message_id",
            facility, charge_key)]
        record["deliveries"] = self._charge_deliveries(facility, charge_key)
        return record

    def acknowledge(self, exception_id: str, who: str, note: str, at: str):
        self._run(
            "INSERT INTO rc_acks (exception_id, who, note, at) VALUES (?, ?, ?, ?) ON CONFLICT (exception_id) "
            "DO UPDATE SET who = excluded.who, note = excluded.note, at = excluded.at", exception_id, who, note, at)

    def acknowledgements(self) -> dict:
        return {r["exception_id"]: {"who": r["who"], "note": r["note"], "at": r["at"]}
                for r in self._rows("SELECT exception_id, who, note, at FROM rc_acks")}


def repr_col(name: str) -> str:
    """A column name as SQL writes it (``trigger`` is a keyword)."""
    return f'"{name}"'
