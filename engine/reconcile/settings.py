"""The ``reconcile:`` section of ``hl7bridge.yaml``: windows and linking rules, per facility.

    reconcile:
      charge_window: 3d          # an appointment this long past with no charge is a missed charge;
                                 # a charge made this long after its appointment is late
      posting_window: 1d         # a charge not delivered to the ERP this long after it arrived
      link: [visit, patient_date]  # the rules that link a charge to its appointment, tried in order
      date_window: 0d            # patient_date: how far a charge's service date may be from the day
      erp_destinations: [erp-finance]  # the ERP destinations (default: every erp-http / erp-tryton one)
      report:                    # the daily report (CSV and JSON)
        directory: var/reports
        at: "06:00"              # UTC
        since: 30d
      facilities:                # per sending facility (MSH-4), any of the five keys above
        EASTCLINIC: {charge_window: 5d, link: [visit]}

docs/configuration.md documents every key. Plain Python over ``engine.yamlconf``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..yamlconf import Section, seconds

LINK_RULES = ("visit", "patient_date")
RULE_KEYS = {"charge_window", "posting_window", "link", "date_window"}
KEYS = {
    "reconcile": RULE_KEYS | {"erp_destinations", "report", "facilities"},
    "report": {"directory", "at", "since"},
}
DAY = 86400.0
_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class Rules:
    """The windows and linking rules of one facility."""

    charge_window: float = 3 * DAY  # seconds
    posting_window: float = 1 * DAY
    link: tuple = LINK_RULES
    date_window: int = 0  # days


@dataclass(frozen=True)
class ReportSettings:
    directory: Path
    at: str = "06:00"  # UTC, HH:MM
    since: float = 30 * DAY


@dataclass(frozen=True)
class ReconcileSettings:
    default: Rules = Rules()
    facilities: dict = field(default_factory=dict)  # facility -> Rules
    erp_destinations: tuple | None = None  # None: every erp-http and erp-tryton destination
    report: ReportSettings | None = None

    def rules(self, facility: str) -> Rules:
        return self.facilities.get(facility, self.default)

    @property
    def shortest_charge_window(self) -> float:
        return min([self.default.charge_window] + [r.charge_window for r in self.facilities.values()])


def _rules(section: Section, base: Rules) -> Rules:
    values = {}
    for key in ("charge_window", "posting_window", "date_window"):
        if section.data.get(key) is not None:
            try:
                values[key] = seconds(section.data[key], key)
            except ValueError as exc:
                raise section.error(key, str(exc)) from None
            if values[key] < 0:
                raise section.error(key, "must not be negative")
    if "date_window" in values:
        if values["date_window"] % DAY:
            raise section.error("date_window", "is whole days", "e.g. 0d (the same day) or 1d")
        values["date_window"] = int(values["date_window"] // DAY)
    if section.data.get("link") is not None:
        link = section.strings("link", [])
        for rule in link:
            if rule not in LINK_RULES:
                raise section.error("link", f"{rule!r} is not a linking rule", f"use {', '.join(LINK_RULES)}")
        values["link"] = tuple(link)
    return replace(base, **values)


def parse(data, path, line: int = 0, base_dir: Path | None = None) -> ReconcileSettings:
    """The ``reconcile:`` mapping of ``path`` (None: the defaults); ConfigError with file and line."""
    top = Section(data, path, "reconcile", KEYS["reconcile"], line)
    default = _rules(top, Rules())
    facilities = {}
    per = top.get("facilities", dict, {})
    for name in per:
        facilities[str(name)] = _rules(
            Section(per[name], path, f"reconcile.facilities.{name}", RULE_KEYS,
                    getattr(per, "line_of", lambda k: top.line("facilities"))(name)), default)
    erp = top.get("erp_destinations", list, None)
    report = None
    if top.data.get("report") is not None:
        section = Section(top.data["report"], path, "reconcile.report", KEYS["report"], top.line("report"))
        directory = section.get("directory", str, None)
        if not directory:
            raise section.error("directory", "is required", "e.g. var/reports")
        at = str(section.get("at", str, "06:00"))
        if not _CLOCK.match(at):
            raise section.error("at", f"{at!r} is not a time of day", 'write "06:00" (UTC, quoted)')
        try:
            since = seconds(section.data.get("since", "30d"), "since")
        except ValueError as exc:
            raise section.error("since", str(exc)) from None
        folder = Path(directory)
        if not folder.is_absolute() and base_dir is not None:
            folder = base_dir / folder
        report = ReportSettings(folder, at, since)
    return ReconcileSettings(default, facilities, tuple(top.strings("erp_destinations", [])) if erp is not None else None,
                             report)


CONFIG_FILE = "hl7bridge.yaml"


def load(config_dir: str | Path | None) -> ReconcileSettings:
    """The ``reconcile:`` section of ``config_dir/hl7bridge.yaml`` (the defaults without one)."""
    from ..yamlconf import load_yaml

    if config_dir is None or not (Path(config_dir) / CONFIG_FILE).exists():
        return ReconcileSettings()
    path = Path(config_dir) / CONFIG_FILE
    data = load_yaml(path)
    if not isinstance(data, dict) or data.get("reconcile") is None:
        return ReconcileSettings()
    return parse(data["reconcile"], path, data.line_of("reconcile") if hasattr(data, "line_of") else 0, Path(config_dir))
