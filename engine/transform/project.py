"""A configuration directory as a whole: routes, mappings and destinations, loaded and cross-checked.

    DIR/hl7bridge.yaml      engine settings (engine.config)
    DIR/routes/*.yaml       routes (engine.transform.routes)
    DIR/mappings/...        mappings (engine.transform.mappings)
    DIR/destinations/*.yaml destinations (engine.delivery.destinations)

One rule, for ``serve`` and every analyst command: the config directory is ``--config DIR``, or
the current directory without it. Routes, mappings and destinations are read from it when it has
``routes/`` or ``mappings/``; a directory with neither (say, one that holds only an
``hl7bridge.yaml``) uses the ones shipped beside the package (the repository's own), never those
of whatever directory the command happens to run in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..delivery.destinations import load_destinations
from ..hl7.er7 import Message
from ..errors import ConfigError
from ..hl7.header import Header, read_header
from ..reconcile import settings as reconcile_settings
from .expr import Context
from .mappings import MappingSet
from .routes import Route, RouteTable, load_routes

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the repository (or installation) root


def has_routes(directory: str | Path) -> bool:
    """Whether a directory holds routes or mappings of its own."""
    return (Path(directory) / "mappings").is_dir() or (Path(directory) / "routes").is_dir()


def erp_destinations(settings: reconcile_settings.ReconcileSettings, destinations: dict) -> list[str]:
    if settings.erp_destinations is not None:
        return list(settings.erp_destinations)
    return sorted(name for name, d in destinations.items() if d.payload == "finance-events")


def _reconcile(given, directory: Path, destinations: dict) -> reconcile_settings.ReconcileSettings:
    """The ``reconcile:`` settings beside the given directory, their ERP destinations checked."""
    settings = reconcile_settings.load(given if given is not None else directory)
    for name in settings.erp_destinations or ():
        if name not in destinations:
            raise ConfigError(f"reconcile.erp_destinations names {name!r}, which no file in destinations/ defines",
                              Path(given or directory) / reconcile_settings.CONFIG_FILE, None,
                              f"known destinations: {', '.join(sorted(destinations)) or 'none'}")
    return settings


def reconcile_context(given: str | Path | None = None) -> tuple[reconcile_settings.ReconcileSettings, list[str]]:
    """The ``reconcile:`` settings and the ERP destinations of a config directory, without loading
    its routes and mappings (``hl7bridge reconcile`` needs no more; a tenth of the time)."""
    directory = config_dir(given)
    destinations = load_destinations(directory / "destinations", directory)
    settings = _reconcile(given, directory, destinations)
    return settings, erp_destinations(settings, destinations)


def config_dir(given: str | Path | None) -> Path:
    """The directory routes, mappings and destinations are read from (see the module docstring):
    ``given`` (the current directory when None) if it has routes/ or mappings/, else the shipped ones."""
    directory = Path(given) if given is not None else Path.cwd()
    return directory if has_routes(directory) else PACKAGE_ROOT


@dataclass
class Project:
    directory: Path
    mappings: MappingSet
    routes: RouteTable
    destinations: dict = field(default_factory=dict)
    reconcile: reconcile_settings.ReconcileSettings = field(default_factory=reconcile_settings.ReconcileSettings)
    # The directory it was loaded from as given (its hl7bridge.yaml holds the reconcile: settings),
    # which may hold no routes of its own; a helper process loads it again from here.
    given: Path | None = None

    @classmethod
    def load(cls, directory: str | Path | None = None) -> "Project":
        """Load routes, mappings and destinations; raises ``ConfigError`` (file, line, hint) on the first problem."""
        given = directory
        directory = config_dir(directory)
        if not (directory / "mappings").is_dir():
            raise ConfigError(f"{directory} has no mappings/ directory")
        mappings = MappingSet(directory / "mappings")
        routes = load_routes(directory / "routes", mappings)
        destinations = load_destinations(directory / "destinations", directory)
        for route in routes:
            for name in route.destinations:
                if name not in destinations:
                    raise ConfigError(
                        f"route {route.name!r} sends to {name!r}, which no file in destinations/ defines",
                        route.path, route.destinations_line,
                        f"known destinations: {', '.join(sorted(destinations)) or 'none'}",
                    )
        reconcile = _reconcile(given, directory, destinations)
        return cls(directory, mappings, routes, destinations, reconcile, Path(given) if given is not None else None)

    def erp_destinations(self) -> list[str]:
        """The destinations postings go to (``reconcile.erp_destinations``, else every destination
        that receives finance events: the erp-http and erp-tryton ones, and files of them)."""
        return erp_destinations(self.reconcile, self.destinations)

    def destinations_of(self, route: Route) -> list:
        return [self.destinations[name] for name in route.destinations]

    def route_for(self, message: Message, header: Header | None = None) -> Route | None:
        header = header or read_header(message)
        return self.routes.match(header, Context(message, tables=self.mappings.tables))
