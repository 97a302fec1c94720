"""The message header (MSH) as the engine needs it: identity, type, control ID and ACK modes."""

from __future__ import annotations

from dataclasses import dataclass

from .er7 import DEFAULT_SEPARATORS, Message, Separators, unescape


@dataclass(frozen=True)
class Header:
    """MSH fields. The ``*_raw`` fields keep the escaped ER7 text so an ACK can echo them exactly."""

    seps: Separators = DEFAULT_SEPARATORS
    sending_application_raw: str = ""
    sending_facility_raw: str = ""
    receiving_application_raw: str = ""
    receiving_facility_raw: str = ""
    message_type: str = ""
    trigger_event: str = ""
    message_structure: str = ""
    control_id: str = ""
    processing_id: str = ""
    version: str = ""
    accept_ack_type: str = ""
    application_ack_type: str = ""
    charset_raw: str = ""

    @property
    def sending_application(self) -> str:
        return hd_name(self.sending_application_raw, self.seps)

    @property
    def sending_facility(self) -> str:
        return hd_name(self.sending_facility_raw, self.seps)

    @property
    def receiving_application(self) -> str:
        return hd_name(self.receiving_application_raw, self.seps)

    @property
    def receiving_facility(self) -> str:
        return hd_name(self.receiving_facility_raw, self.seps)

    @property
    def enhanced_mode(self) -> bool:
        """Enhanced acknowledgement mode is asked for by a value in MSH-15 or MSH-16."""
        return bool(self.accept_ack_type or self.application_ack_type)

    @property
    def message_code(self) -> str:
        """``SIU^S12`` style type and trigger, as routes and the journal name them."""
        return f"{self.message_type}^{self.trigger_event}" if self.trigger_event else self.message_type


def hd_name(raw: str, seps: Separators) -> str:
    """The readable name of an HD value: its namespace ID, else its universal ID."""
    parts = raw.split(seps.component)
    name = parts[0] or (parts[1] if len(parts) > 1 else "")
    return unescape(name, seps)


def read_header(message: Message) -> Header:
    """Read the MSH of a parsed message into a ``Header``."""
    msh = message.segments[0]
    seps = message.seps

    def first_component(number: int) -> str:
        reps = msh.repetitions(number)
        return unescape(reps[0].split(seps.component)[0], seps).strip() if reps else ""

    msg_type = msh.field(9).split(seps.component)
    return Header(
        seps=seps,
        sending_application_raw=msh.field(3),
        sending_facility_raw=msh.field(4),
        receiving_application_raw=msh.field(5),
        receiving_facility_raw=msh.field(6),
        message_type=unescape(msg_type[0], seps).strip(),
        trigger_event=unescape(msg_type[1], seps).strip() if len(msg_type) > 1 else "",
        message_structure=unescape(msg_type[2], seps).strip() if len(msg_type) > 2 else "",
        # MSH-10 is kept as sent (a real feed sends ' 38762'), but matched trimmed for duplicates.
        control_id=unescape(msh.field(10), seps),
        processing_id=first_component(11),
        version=first_component(12),
        accept_ack_type=first_component(15).upper(),
        application_ack_type=first_component(16).upper(),
        charset_raw=msh.field(18),
    )
