"""The analyst's tools: ``check``, ``convert`` and ``test`` (routes and mappings, dry runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import BatchError, ConfigError
from .base import CONTEXT, EXIT_NOT_ACCEPTED, Failure, cli, config_option, json_option, load_project


@cli.command(context_settings=CONTEXT)
@click.argument("config_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@json_option
def check(config_dir, as_json):
    """Load every route and mapping and report the first problem with its file, line and a hint.

    Also prints the mapping version (a hash of the mapping files) that Bundles converted with them
    name in their Provenance. Exit code 0 when everything loads, 1 when something does not (for CI).

    Example: hl7bridge check .
    """
    project = load_project(config_dir)
    summary = project.mappings.summary()
    routes = [{"name": r.name, "file": Path(r.path).name, "order": r.order, "match": list(r.messages) or ["any"],
               "mapping": r.mapping, "destinations": list(r.destinations)} for r in project.routes]
    if as_json:
        click.echo(json.dumps({"directory": str(project.directory), "mapping_version": project.mappings.version,
                               "routes": routes, "mappings": summary}, indent=2))
        return
    click.echo(f"ok: {project.directory}")
    click.echo(f"mapping version: {project.mappings.version} (a hash of the mapping files; every Bundle's "
               "Provenance names it)")
    click.echo(f"routes ({len(routes)}), tried in this order:")
    for r in routes:
        click.echo(f"  {r['order']:>4}  {r['name']:24} {' '.join(r['match']):24} -> {r['mapping']:6} -> "
                   f"{', '.join(r['destinations']) or '(none)'}   [{r['file']}]")
    for kind, names in summary.items():
        click.echo(f"{kind} mappings ({len(names)}): {', '.join(names)}")


@cli.command(context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--route", "route_name", help="Use this route instead of the one the message matches.")
@config_option()
def convert(files, route_name, config_dir):
    """Dry run: print the FHIR Bundle each message converts to, or why it cannot. Sends nothing.

    Files may hold one message or many (also FHS/BHS batches). Each message is read and checked as
    the engine's listener would (a message it would reject is reported with the reason it would
    give), then routed and mapped. Bundles go to standard output as JSON (one per message, a list
    when there are several). Standard error gets, for each message, FILE:LINE (the line its MSH is
    on) and its control ID, then why it cannot be converted (each problem with the FHIR element,
    the mapping file and line, and the HL7 field), and any warning: what was assumed to read it.
    A file that is not HL7 v2 ER7 is reported and the next one is read. Exit code 1 when any
    message could not be converted.

    Example: hl7bridge convert examples/siu_s12.hl7 --route clinic-scheduling
    """
    from ..hl7.ack import ACCEPT
    from ..hl7.assess import assess
    from ..mllp.batch import split_messages
    from ..transform import pipeline

    project = load_project(config_dir)
    bundles, failed = [], False
    for path in files:
        try:
            found = split_messages(path.read_bytes())
        except BatchError as exc:
            where = f"{path}:{exc.line}" if exc.line else f"{path}"
            click.echo(f"{where}: not converted: {str(exc).split(': ', 1)[-1] if exc.line else exc}", err=True)
            failed = True
            continue
        for item in found:
            assessment = assess(item.data)
            header = assessment.header
            control_id = f" {header.control_id.strip()}" if header is not None and header.control_id.strip() else ""
            where = f"{path}:{item.line}{control_id}"
            for warning in assessment.warnings:
                click.echo(f"{where}: warning: {warning}", err=True)
            if assessment.outcome != ACCEPT:
                error = assessment.error
                location = f" ({error.location})" if error.location and error.location not in error.text else ""
                click.echo(f"{where}: not accepted: {error.text}{location}", err=True)
                failed = True
                continue
            try:
                converted = pipeline.convert(project, assessment.message, header=header, route_name=route_name)
            except ConfigError as exc:
                raise Failure(str(exc)) from None
            for warning in converted.warnings:
                click.echo(f"{where}: warning: {warning}", err=True)
            if converted.ok:
                bundles.append(converted.bundle)
                continue
            failed = True
            route = f" (route {converted.route.name})" if converted.route else ""
            click.echo(f"{where}{route}: cannot convert", err=True)
            for problem in converted.problems:
                click.echo(f"  {problem}", err=True)
    if bundles:
        click.echo(json.dumps(bundles[0] if len(bundles) == 1 else bundles, indent=2, ensure_ascii=False))
    if failed:
        sys.exit(EXIT_NOT_ACCEPTED)


@cli.command("test", context_settings=CONTEXT)
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option()
@click.option("--update", is_flag=True, help="Write each NAME.fhir.json from the current conversion (review the diff in git).")
def regression_test(directory, config_dir, update):
    """Convert every NAME.hl7 in DIRECTORY and compare it with NAME.fhir.json beside it.

    Shows a unified diff for each difference. Exit code 0 when all pass, 1 otherwise.

    Example: hl7bridge test examples
    """
    from ..transform.regression import run_directory

    project = load_project(config_dir)
    results = run_directory(project, directory, update)
    if not results:
        raise Failure(f"no cases in {directory}: a case is NAME.hl7 with NAME.fhir.json beside it "
                      "(hl7bridge test --update writes them)", EXIT_NOT_ACCEPTED)
    for result in results:
        click.echo(f"{'PASS' if result.passed else 'FAIL'}  {result.name}" + (" (written)" if update else ""))
        if not result.passed:
            click.echo("\n".join(f"      {line}" for line in result.detail.splitlines()))
    failed = sum(not r.passed for r in results)
    click.echo(f"{len(results) - failed} passed, {failed} failed")
    if failed:
        sys.exit(EXIT_NOT_ACCEPTED)
