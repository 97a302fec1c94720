"""A configuration directory as a whole: routes, mappings and destinations, loaded and cross-checked.

    DIR/hl7bridge.yaml      engine settings (engine.config)
    DIR/routes/*.yaml       routes (engine.transform.routes)
    DIR/mappings/...        mappings (engine.transform.mappings)
    DIR/destinations/*.yaml destinations (engine.delivery.destinations)

Without ``--config`` (or with one that holds only ``hl7bridge.yaml``) the engine uses the directory
it runs in when that has ``mappings/``, else the routes and mappings shipped beside the package
(the repository's own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..delivery.destinations import load_destinations
from ..hl7.er7 import Message
from ..errors import ConfigError
from ..hl7.header import Header, read_header
from .expr import Context
from .mappings import MappingSet
from .routes import Route, RouteTable, load_routes

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the repository (or installation) root


def config_dir(given: str | Path | None) -> Path:
    """The directory routes and mappings are read from (see the module docstring).

    A given directory with neither ``routes/`` nor ``mappings/`` (only engine settings) uses the
    defaults, like every other setting it leaves out.
    """
    if given is not None and ((Path(given) / "mappings").is_dir() or (Path(given) / "routes").is_dir()):
        return Path(given)
    here = Path.cwd()
    if (here / "mappings").is_dir():
        return here
    return PACKAGE_ROOT


@dataclass
class Project:
    directory: Path
    mappings: MappingSet
    routes: RouteTable
    destinations: dict = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | Path | None = None) -> "Project":
        """Load routes, mappings and destinations; raises ``ConfigError`` (file, line, hint) on the first problem."""
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
        return cls(directory, mappings, routes, destinations)

    def destinations_of(self, route: Route) -> list:
        return [self.destinations[name] for name in route.destinations]

    def route_for(self, message: Message, header: Header | None = None) -> Route | None:
        header = header or read_header(message)
        return self.routes.match(header, Context(message, tables=self.mappings.tables))
