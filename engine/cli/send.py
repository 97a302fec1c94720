"""``hl7bridge send``: an MLLP client that prints each ACK."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import BatchError, FramingError
from ..mllp.sending import AckTimeout
from .base import CONTEXT, EXIT_CONNECTION, EXIT_NOT_ACCEPTED, EXIT_USAGE, Failure, cli, json_option


@cli.command(context_settings=CONTEXT)
@click.argument("address", metavar="HOST:PORT")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--keep-line-endings", is_flag=True,
              help="Send each message's bytes exactly as in the file (default: segments end with CR).")
@click.option("--whole-file", is_flag=True,
              help="Send each file as one frame, unsplit and unchecked (to test how the engine rejects it).")
@click.option("--keep-going", is_flag=True,
              help="Skip a file that cannot be read or split into messages, send the others, and exit 2 at the end "
                   "(default: stop before sending anything).")
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
def send(address, files, keep_line_endings, whole_file, keep_going, timeout, conditional_wait, tls, ca, cert, key,
         insecure, quiet, as_json):
    """Send HL7 messages over MLLP and print each ACK.

    A file may hold one message, many, or FHS/BHS batches (sent one message per frame). Exit
    codes: 0 every message was accepted (AA/CA); 1 a message was not accepted; 2 bad usage or a
    file that cannot be read or split into messages (nothing is sent, unless --keep-going: then
    the other files are sent first); 3 the engine cannot be reached, closed the connection, or
    sent no ACK within --timeout.

    Example: hl7bridge send 127.0.0.1:2575 examples/siu_s12.hl7 examples/dft_p03.hl7
    """
    from ..mllp.batch import split_messages
    from ..mllp.client import MLLPClient, TlsClientOptions, parse_address
    from ..mllp.sending import send_all

    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise Failure(str(exc)) from None
    messages, unreadable = [], []
    for path in files:
        try:
            data = path.read_bytes()
            if whole_file:
                messages.append((str(path), data))
                continue
            found = [(f"{path}:{item.line}", item.data) for item in split_messages(data, keep_line_endings=keep_line_endings)]
        except OSError as exc:
            problem = f"{path}: cannot read it: {exc.strerror or exc}"
        except BatchError as exc:
            problem = f"{path}: {exc}"
        else:
            messages += found
            continue
        if not keep_going:
            raise Failure(problem + " (nothing sent; --keep-going sends the other files)")
        click.echo(f"Error: {problem}; skipped", err=True)
        unreadable.append(str(path))
    tls_options = None
    if tls or ca or cert:
        tls_options = TlsClientOptions(ca=ca, certificate=cert, key=key, verify=not insecure)
    results = []
    if messages:
        try:
            client = MLLPClient(host, port, timeout=timeout, tls=tls_options)
        except OSError as exc:
            raise Failure(f"cannot connect to {host}:{port}: {exc.strerror or exc}", EXIT_CONNECTION) from None
        with client:
            sending = send_all(client, messages, conditional_wait)
            while True:
                try:
                    result = next(sending)
                except StopIteration:
                    break
                except AckTimeout as exc:
                    raise Failure(f"no ACK from {host}:{port} within {timeout:g} s for {exc.source}"
                                  f"{' ' + exc.control_id if exc.control_id else ''}: the connection is open but "
                                  "the listener did not answer (--timeout waits longer)", EXIT_CONNECTION) from None
                except (OSError, FramingError) as exc:
                    raise Failure(f"connection to {host}:{port} failed: {exc}", EXIT_CONNECTION) from None
                results.append(result)
                if not as_json:
                    click.echo(result.describe(full=not quiet))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    if unreadable:
        click.echo(f"Error: {len(unreadable)} of {len(files)} file(s) skipped: {', '.join(unreadable)}", err=True)
        sys.exit(EXIT_USAGE)
    if not all(r.accepted for r in results):
        sys.exit(EXIT_NOT_ACCEPTED)
