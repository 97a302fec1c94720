"""What expressions do to be fast must not change what they give: paths compiled for their shape
(``$.2``, ``AIP-3.1``, ``PID-3[2].1``...) read exactly what the general walk reads; the caches (group
lookups per message, a value's components, code map answers, date/time conversions) never leak from
one message, value, group structure or time zone into another; warnings and errors come out the
same every time.

The reference here is the path walk as it was before paths were compiled for their shape: select
the segments, then the repetitions, components and sub-components, keep the non-empty values,
decode the first.
"""

from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.hl7.er7 import Message, component, parse, unescape
from engine.hl7.paths import parse_path
from engine.transform import mappings
from engine.transform.expr import (Context, DataError, absolute_first, absolute_raw, compile_condition, compile_expression,
                                   relative_first, relative_raw, uri_quote)
from engine.transform.mappings import CodeMap

GROUPS = {"RGS": frozenset({"AIS", "AIP", "NTE"}), "AIS": frozenset({"NTE"}), "AIP": frozenset({"NTE"})}


def reference_select(message, path, current, groups):
    p = path
    if current is not None and current.name == p.segment and p.segment_index is None and not p.every_segment:
        return [current]
    segments = [seg for seg in message.segments if seg.name == p.segment]
    if groups and current is not None and p.segment_index is None and segments:
        heads = []
        for head in message.segments:
            members = groups.get(head.name)
            if members is None:
                continue
            end = head.position + 1
            while end < len(message.segments) and message.segments[end].name in members:
                end += 1
            heads.append((head.position, end, members))
        for head, end, members in reversed(heads):
            if head <= current.position < end and p.segment in members:
                segments = [seg for seg in segments if head < seg.position < end]
                break
    if p.segment_index is not None:
        return segments[p.segment_index - 1 : p.segment_index] if p.segment_index > 0 else []
    if segments and not p.every_segment:
        return segments[:1]
    return segments


def reference_raw(message, path, current=None, groups=None):
    """Every non-empty raw value the path reads, as the general walk reads them."""
    seps = message.seps
    out = []
    for seg in reference_select(message, path, current, groups):
        if path.field is None:
            out.append(seg.line)
            continue
        raw = seg.fields[path.field] if path.field < len(seg.fields) else ""
        if raw == "":
            continue
        reps = [raw] if seg.name == "MSH" and path.field <= 2 else raw.split(seps.repetition)
        if not path.every_repetition:
            index = (path.repetition or 1) - 1
            reps = reps[index : index + 1]
        for rep in reps:
            value = rep
            if path.component is not None:
                value = component(rep, path.component, seps.component)
                if path.subcomponent is not None:
                    value = component(value, path.subcomponent, seps.subcomponent)
            out.append(value)
    return [v for v in out if v != ""]


def reference_relative(message, value, parts):
    raw = value or ""
    if parts:
        raw = component(raw, parts[0], message.seps.component)
        if len(parts) > 1:
            raw = component(raw, parts[1], message.seps.subcomponent)
    return [raw] if raw != "" else []


MESSAGE = parse(
    "MSH|^~\\&|SCHED|NORTH\\T\\CLINIC|HB|FIN|20261201093000||SIU^S12^SIU_S12|NC1|P|2.5.1\r"
    "SCH|PL1^SCHED|FL1^EPIC||||||60|s\r"
    "NTE|1||first note~second \\T\\ note\r"
    "PID|1||100^^^NORTH&1.2.3&ISO^MR~E7^^^EPIC^PI~~X9||DOE\\S\\X^JANE||\r"
    "RGS|1\r"
    "AIS|1||CT^Head CT|20261201093000\r"
    "NTE|1||AIS note\r"
    "AIP|1||D1^DOC^ANNA|ATT||20261201100000\r"
    "NTE|1||AIP one note\r"
    "RGS|2\r"
    "AIS|1||MR^MRI|20261202080000\r"
    "AIP|1||D2^DOC^BEN|ASST\r"
    "AIP|2||D3^DOC^CAL\r"
)

PATHS = [
    "MSH-1", "MSH-2", "MSH-2[2]", "MSH-4", "MSH-4.1", "MSH-9.2", "MSH-12", "SCH-1", "SCH-1.2", "SCH-1.2.1", "SCH-4",
    "SCH-99", "PID-3", "PID-3.4", "PID-3.4.2", "PID-3.4.3", "PID-3.4.9", "PID-3[2]", "PID-3[2].4", "PID-3[3]",
    "PID-3[4].1", "PID-3[9]", "PID-3[*]", "PID-3[*].1", "PID-5", "PID-5.1", "PID-5.2", "PID-6", "NTE-3", "NTE-3[2]",
    "NTE[*]-3", "NTE[2]-3", "NTE[*]-3[*]", "NTE[3]-3", "NTE[9]-3", "AIS-3", "AIS-3.2", "AIS-4", "AIS[2]-3.1",
    "AIP-3", "AIP-3.3", "AIP[*]-3.1", "AIP[3]-3.1", "AIP-6", "RGS-1", "ZZZ-1", "ZZZ[*]-1", "NTE", "NTE[*]", "AIP[2]",
]


def contexts(message):
    """The message as seen from nowhere and from each of its segments, with and without groups."""
    yield None, None
    for seg in message.segments:
        yield seg, None
        yield seg, GROUPS


def test_shaped_paths_read_what_the_general_walk_reads():
    for text in PATHS:
        path = parse_path(text)
        raw_of, first_of, undecoded_of = absolute_raw(text), absolute_first(text), absolute_first(text, decode=False)
        for segment, groups in contexts(MESSAGE):
            ctx = Context(MESSAGE, segment, groups=groups)
            expected = reference_raw(MESSAGE, path, segment, groups)
            where = f"{text} from {segment} with groups={bool(groups)}"
            assert raw_of(ctx) == expected, where
            assert undecoded_of(ctx) == (expected[0] if expected else None), where
            assert first_of(ctx) == (unescape(expected[0], MESSAGE.seps) if expected else None), where
            assert compile_expression(text)(ctx) == first_of(ctx), where


def test_escapes_are_decoded_only_where_there_are_some():
    ctx = Context(MESSAGE)
    assert compile_expression("MSH-4")(ctx) == "NORTH&CLINIC"
    assert compile_expression("PID-5.1")(ctx) == "DOE^X"
    assert absolute_first("PID-5.1", decode=False)(ctx) == "DOE\\S\\X"
    assert compile_expression("PID-5.2")(ctx) == "JANE"
    # A sender without an escape character (MSH-2 '^~&'): nothing is decoded.
    plain = parse("MSH|^~&|A|B\\T\\C|||20261201||SIU^S12|1|P|2.5\rPID|1||7\\X41\\^^^N\r")
    assert plain.seps.escape == ""
    assert compile_expression("MSH-4")(Context(plain)) == "B\\T\\C"
    assert compile_expression("PID-3.1")(Context(plain)) == "7\\X41\\"
    assert compile_expression("$.1")(Context(plain, value="7\\X41\\^x")) == "7\\X41\\"
    # An escape that decodes to nothing gives '' (a value was there), not None.
    assert compile_expression("$.2")(Context(MESSAGE, value="a^\\H\\")) == ""


values = st.text(alphabet="ab^&\\~|ST", max_size=12)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.one_of(st.none(), values), parts=st.sampled_from([(), (1,), (2,), (3,), (1, 1), (1, 2), (2, 3), (4, 1)]))
def test_relative_paths_read_the_components_the_general_walk_reads(value, parts):
    text = "$" + "".join(f".{p}" for p in parts)
    ctx = Context(MESSAGE, value=value)
    expected = reference_relative(MESSAGE, value, parts)
    assert relative_raw(text)(ctx) == expected
    assert relative_first(text, decode=False)(ctx) == (expected[0] if expected else None)
    assert relative_first(text)(ctx) == (unescape(expected[0], MESSAGE.seps) if expected else None)


field_text = st.text(alphabet="xy^&~\\ET", max_size=10)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(pid3=field_text, pid5=field_text, nte=st.lists(field_text, max_size=3), ais=st.lists(field_text, max_size=3),
       path=st.sampled_from(["PID-3", "PID-3.1", "PID-3.2.1", "PID-3[2]", "PID-3[2].2", "PID-3[*].1", "PID-5.1",
                             "NTE-3", "NTE[2]-3", "NTE[*]-3", "NTE-3[2]", "AIS-3.1", "AIS[2]-3", "AIS[*]-3.2"]))
def test_any_field_content_reads_as_the_general_walk_reads_it(pid3, pid5, nte, ais, path):
    lines = ["MSH|^~\\&|A|B|||20261201||SIU^S12|1|P|2.5", f"PID|1||{pid3}||{pid5}", "RGS|1"]
    for text in ais:
        lines += [f"AIS|1||{text}", *(f"NTE|1||{note}" for note in nte)]
    message = parse("\r".join(lines))
    parsed = parse_path(path)
    for segment, groups in contexts(message):
        ctx = Context(message, segment, groups=groups)
        expected = reference_raw(message, parsed, segment, groups)
        assert absolute_raw(path)(ctx) == expected
        assert compile_expression(path)(ctx) == (unescape(expected[0], message.seps) if expected else None)


def test_group_lookups_are_cached_per_message_and_per_group_structure():
    # The same compiled path over two messages: each reads its own segments.
    read = compile_expression("AIS-3.1")
    other = parse(MESSAGE.text.replace("CT^Head CT", "XR^X-ray").replace("MR^MRI", "US^Ultrasound"))
    for message, first, second in ((MESSAGE, "CT", "MR"), (other, "XR", "US"), (MESSAGE, "CT", "MR")):
        aips = message.all("AIP")
        assert read(Context(message, aips[0], groups=GROUPS)) == first
        assert read(Context(message, aips[1], groups=GROUPS)) == second
        assert read(Context(message, aips[2], groups=GROUPS)) == second
    # The same message read with another group structure (or none) is scoped by that one.
    aip = MESSAGE.all("AIP")[1]
    assert read(Context(MESSAGE, aip, groups={"RGS": frozenset({"AIP"})})) == "CT"  # AIS is no member: the first AIS
    assert read(Context(MESSAGE, aip, groups=GROUPS)) == "MR"
    assert read(Context(MESSAGE, aip)) == "CT"
    # Notes: each segment's own.
    notes = compile_expression("join(' / ', NTE[*]-3)")
    assert notes(Context(MESSAGE, MESSAGE.all("AIS")[0], groups=GROUPS)) == "AIS note"
    assert notes(Context(MESSAGE, MESSAGE.all("AIP")[0], groups=GROUPS)) == "AIP one note"
    assert notes(Context(MESSAGE, MESSAGE.all("AIP")[1], groups=GROUPS)) is None
    assert notes(Context(MESSAGE)) == "first note / AIS note / AIP one note"  # [*] NTEs, their first repetition


def test_conditions_read_every_value_of_a_path():
    assert compile_condition("PID-3[*].1 in [E7]")(Context(MESSAGE))
    assert compile_condition("PID-3[3] missing")(Context(MESSAGE))
    assert compile_condition("MSH-4 == 'NORTH&CLINIC'")(Context(MESSAGE))
    assert compile_condition("$.2 == 'S'")(Context(MESSAGE, value="x^S"))
    for text, holds in (("NTE[*]-3 exists", True), ("ZZZ[*]-1 exists", False), ("ZZZ[*]-1 missing", True),
                        ("NTE exists", True), ("ZZZ missing", True), ("PID-3[2].4 exists", True),
                        ("PID-3[3].1 exists", False), ("$.2 exists", False), ("$.1 missing", False)):
        assert compile_condition(text)(Context(MESSAGE, value="x")) is holds, text


def test_a_message_built_from_another_ones_segments_starts_without_its_caches():
    MESSAGE.scope("AIS", MESSAGE.all("AIP")[1], GROUPS)
    message = Message(MESSAGE.text, MESSAGE.seps, list(MESSAGE.segments[:5]))  # no resource groups
    assert compile_expression("AIS-3.1")(Context(message, message.segments[3], groups=GROUPS)) is None
    assert compile_expression("AIS-3.1")(Context(MESSAGE, MESSAGE.all("AIP")[1], groups=GROUPS)) == "MR"


def test_a_values_components_are_split_again_when_the_value_changes():
    read_family, read_given = compile_expression("$.1"), compile_expression("$.2")
    ctx = Context(MESSAGE, value="DOE^JANE")
    assert (read_family(ctx), read_given(ctx)) == ("DOE", "JANE")
    ctx.value = "ROE^RICHARD"  # the split of DOE^JANE is not used for another value
    assert (read_family(ctx), read_given(ctx)) == ("ROE", "RICHARD")
    assert read_given(ctx.at(value="SMITH")) is None
    assert compile_expression("$.1.2")(ctx.at(value="A&B^C")) == "B"


@settings(max_examples=300)
@given(st.text(max_size=20), st.sampled_from(["", "|:/"]))
def test_uri_quote_is_urllib_quote(text, safe):
    assert uri_quote(text, safe) == quote(text, safe=safe)
    assert uri_quote(text, safe) == quote(text, safe=safe)  # as remembered


def test_quoting_is_remembered_per_text_and_safe_characters(monkeypatch):
    from engine.transform import expr

    monkeypatch.setattr(expr, "_QUOTED_KEPT", 2)
    for _ in range(2):
        assert uri_quote("a b/c") == "a%20b%2Fc"
        assert uri_quote("a b/c", "|:/") == "a%20b/c"
        assert uri_quote("NORTH") == "NORTH"
    assert len(expr._QUOTED) <= 2


def test_code_maps_remember_answers_as_looked_up_and_forget_when_full(monkeypatch):
    table = CodeMap("status", {"Booked": "accepted", "BOOKED": "upper", "X": "x"}, "needs-action")
    for _ in range(2):  # the second time from what it remembers
        assert [table.lookup(code) for code in ("Booked", "booked", "BOOKED", "x", "Y", "")] == \
            ["accepted", "upper", "upper", "x", "needs-action", "needs-action"]
    monkeypatch.setattr(mappings, "_LOOKUPS_KEPT", 3)
    table = CodeMap("status", {"A": "a"}, None)
    assert [table.lookup(code) for code in ("a", "b", "c", "d", "a", "A")] == ["a", None, None, None, "a", "a"]
    assert len(table._found) <= 3


def test_date_times_worked_out_once_give_the_same_result_warnings_and_errors_every_time():
    from datetime import timedelta, timezone

    message = parse("MSH|^~\\&|A|B|||20261201||SIU^S12|1|P|2.5\rAIS|1||X|261201093000~20261301|20261201093000Z\r")
    for _ in range(2):
        notes = []
        ctx = Context(message, notes=notes)
        assert compile_expression("dateTime(AIS-4)")(ctx) == "2026-12-01T09:30:00Z"
        assert notes == ["AIS-4 '261201093000' has a two-digit year: read as 2026"]
        # The same text read through another argument names that one.
        assert compile_expression("dateTime(AIS-4 | AIS-5)")(Context(message, notes=(other := []))) == \
            "2026-12-01T09:30:00Z"
        assert other == ["AIS-4 | AIS-5 '261201093000' has a two-digit year: read as 2026"]
        # UTC is written Z for the UTC time zone only, not for another (equal) zone at +00:00.
        fixed = Context(message, tz=timezone(timedelta(0), "GMT"))
        assert compile_expression("dateTime(AIS-5)")(fixed) == "2026-12-01T09:30:00+00:00"
        assert compile_expression("dateTime(AIS-5)")(Context(message)) == "2026-12-01T09:30:00Z"
        for text in ("dateTime(AIS-4[2])", "instant(AIS-4[2])"):
            try:
                compile_expression(text)(Context(message))
            except DataError as exc:
                assert str(exc) == "AIS-4[2] '20261301' is not a date/time: month 13 is not 01 to 12"
            else:
                raise AssertionError(f"{text} read a month 13")
        try:
            compile_expression("instant(MSH-7)")(Context(message))
        except DataError as exc:
            assert str(exc) == "MSH-7 '20261201' has no time of day; an instant needs one"
        else:
            raise AssertionError("an instant without a time of day")
