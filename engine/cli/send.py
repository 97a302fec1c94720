"""``hl7bridge send``: an MLLP client that prints each ACK."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import BatchError, FramingError
from .base import CONTEXT, EXIT_CONNECTION, EXIT_NOT_ACCEPTED, Failure, cli, json_option


@cli.command(context_settings=CONTEXT)
@click.argument("address", metavar="HOST:PORT")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--keep-line-endings", is_flag=True,
              help="Send each message's bytes exactly as in the file (default: segments end with CR).")
@click.option("--whole-file", is_flag=True,
              help="Send each file as one frame, unsplit and unchecked (to test how the engine rejects it).")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for each ACK.")
@click.option("--conditional-wait", default=2.0, show_default=True,
              help="Seconds to wait for an ACK that MSH-15 ER or SU may not send.")
@click.option("--tls", is_flag=True, help="Connect with TLS.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="CA certificate(s) to verify the server.")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="Client certificate, for mutual TLS.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Client private key, for mutual TLS.")
@click.option("--insecure", is_flag=True, help="With --tls, do not verify the server's certificate.")
@click.option("--quiet", "-q", is_flag=True, help="Print one line per message, not the whole ACK.")
@json_option
def send(address, files, keep_line_endings, whole_file, timeout, conditional_wait, tls, ca, cert, key, insecure, quiet, as_json):
    """Send HL7 messages over MLLP and print each ACK.

    A file may hold one message, many, or FHS/BHS batches (sent one message per frame). The exit
    code is 0 when every message was accepted (AA/CA), 1 when any was not, 3 when the engine
    cannot be reached.

    Example: hl7bridge send 127.0.0.1:2575 examples/siu_s12.hl7 examples/dft_p03.hl7
    """
    from ..mllp.batch import split_messages
    from ..mllp.client import MLLPClient, TlsClientOptions, parse_address
    from ..mllp.sending import send_all

    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise Failure(str(exc)) from None
    messages = []
    for path in files:
        if whole_file:
            messages.append((str(path), path.read_bytes()))
            continue
        try:
            for found in split_messages(path.read_bytes(), keep_line_endings=keep_line_endings):
                messages.append((f"{path}:{found.line}", found.data))
        except BatchError as exc:
            raise Failure(f"{path}: {exc}") from None
    tls_options = None
    if tls or ca or cert:
        tls_options = TlsClientOptions(ca=ca, certificate=cert, key=key, verify=not insecure)
    try:
        client = MLLPClient(host, port, timeout=timeout, tls=tls_options)
    except OSError as exc:
        raise Failure(f"cannot connect to {host}:{port}: {exc.strerror or exc}", EXIT_CONNECTION) from None
    results = []
    with client:
        try:
            for result in send_all(client, messages, conditional_wait):
                results.append(result)
                if not as_json:
                    click.echo(result.describe(full=not quiet))
        except (OSError, FramingError) as exc:
            raise Failure(f"connection to {host}:{port} failed: {exc}", EXIT_CONNECTION) from None
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    if not all(r.accepted for r in results):
        sys.exit(EXIT_NOT_ACCEPTED)
