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
    # What was assumed to read MSH-9 (a trigger taken from the structure, case or spaces fixed).
    warnings: tuple = ()
    # Why MSH-9 gives no trigger event, in words, when it does not ('' when it does).
    trigger_missing: str = ""

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


# Message structures (MSH-9.3, HL7 table 0354) that serve one trigger event only, so a sender that
# leaves MSH-9.2 empty still says which event it is (DFT^^DFT_P03 is a P03).
ONE_EVENT_STRUCTURES = {"DFT_P03": "P03", "DFT_P11": "P11"}
# Structures shared by several events: the trigger cannot be told from them.
SHARED_STRUCTURES = {
    "SIU_S12": "S12 to S24, S26 and S27",
    "ADT_A01": "A01, A04, A08 and A13",
    "ADT_A05": "A05, A14, A28 and A31",
    "BAR_P01": "P01 and P05",
}


def read_message_type(raw: str, seps: Separators) -> tuple[str, str, str, list[str], str]:
    """MSH-9 as (type, trigger, structure, warnings, why the trigger is missing).

    Tolerates what senders do: spaces around the components and lower case (fixed, with a
    warning), and the structure without the trigger (``DFT^^DFT_P03``: the trigger is taken from a
    structure that serves one event, with a warning; otherwise the reason says why it cannot be).
    """
    parts = [unescape(part, seps) for part in raw.split(seps.component)[:3]]
    parts += [""] * (3 - len(parts))
    cleaned = [part.strip().upper() for part in parts]
    warnings = []
    if [p.strip() for p in parts] != parts:
        warnings.append("MSH-9 has spaces around its components: removed")
    if [p.strip() for p in parts] != cleaned:
        warnings.append(f"MSH-9 {seps.component.join(p.strip() for p in parts).rstrip(seps.component)!r} read in "
                        f"upper case as {seps.component.join(cleaned).rstrip(seps.component)}")
    message_type, trigger, structure = cleaned
    missing = ""
    if message_type and not trigger:
        if structure in ONE_EVENT_STRUCTURES and structure.startswith(message_type + "_"):
            trigger = ONE_EVENT_STRUCTURES[structure]
            warnings.append(f"MSH-9 has no trigger event (MSH-9.2); {trigger} taken from the message structure "
                            f"{structure} (MSH-9.3), which serves only {trigger}")
        elif structure in SHARED_STRUCTURES:
            missing = (f"MSH-9 has no trigger event (MSH-9.2), and the message structure {structure} in MSH-9.3 "
                       f"serves {SHARED_STRUCTURES[structure]}, so it cannot tell which: send the trigger in MSH-9.2")
        elif structure:
            missing = (f"MSH-9 has no trigger event (MSH-9.2), and the message structure {structure} in MSH-9.3 "
                       "does not say which one: send the trigger in MSH-9.2")
        elif "_" in message_type:
            missing = (f"MSH-9 has the message structure {message_type} where the message type belongs: send "
                       f"{message_type.replace('_', seps.component, 1)} (type, then trigger event)")
        else:
            missing = "MSH-9 has no trigger event (MSH-9.2)"
    return message_type, trigger, structure, warnings, missing


def read_header(message: Message) -> Header:
    """Read the MSH of a parsed message into a ``Header`` (once: the message keeps it)."""
    if message._header is not None:
        return message._header
    message._header = header = _read_header(message)
    return header


def _read_header(message: Message) -> Header:
    msh = message.segments[0]
    seps = message.seps

    def first_component(number: int) -> str:
        reps = msh.repetitions(number)
        return unescape(reps[0].split(seps.component)[0], seps).strip() if reps else ""

    message_type, trigger, structure, warnings, missing = read_message_type(msh.field(9), seps)
    return Header(
        seps=seps,
        sending_application_raw=msh.field(3),
        sending_facility_raw=msh.field(4),
        receiving_application_raw=msh.field(5),
        receiving_facility_raw=msh.field(6),
        message_type=message_type,
        trigger_event=trigger,
        message_structure=structure,
        # MSH-10 is kept as sent (a real feed sends ' 38762'), but matched trimmed for duplicates.
        control_id=unescape(msh.field(10), seps),
        processing_id=first_component(11),
        version=first_component(12),
        accept_ack_type=first_component(15).upper(),
        application_ack_type=first_component(16).upper(),
        charset_raw=msh.field(18),
        warnings=tuple(warnings),
        trigger_missing=missing,
    )
