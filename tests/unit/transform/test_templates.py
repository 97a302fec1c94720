"""Template values: quoted text is text, unquoted text an expression, and the old forms are refused."""

import pytest

from engine.errors import ConfigError
from engine.transform.templates import Const, Expr, compile_template
from engine.yamlconf import Quoted


@pytest.mark.parametrize("text", ["AMB", "booked", "Ward ABC-3", "see note (2)", "A | B", "12",
                                  "http://terminology.hl7.org/CodeSystem/v2-0203"])
def test_quoted_text_is_text_even_when_it_looks_a_little_like_hl7(text):
    node = compile_template(Quoted(text), "f.yaml", 3, set(), "code")
    assert isinstance(node, Const) and node.value == text


def test_unquoted_text_is_an_expression():
    assert isinstance(compile_template("SCH-1.1", "f.yaml", 3, set(), "code"), Expr)


@pytest.mark.parametrize("text, fragment, hint", [
    ("'booked'", "text is quoted twice", "write 'booked'"),
    ('"booked"', "text is quoted twice", 'write "booked"'),
    ("SCH-1.1", "reads as an expression", "drop the quotes: SCH-1.1; to keep the text, write {$const: SCH-1.1}"),
    ("map(PV1-2, 'x')", "reads as an expression", "drop the quotes"),
    ("$.1", "reads as an expression", "drop the quotes"),
])
def test_the_old_and_the_ambiguous_quoted_forms_are_refused_with_the_way_to_write_them(text, fragment, hint):
    with pytest.raises(ConfigError) as info:
        compile_template(Quoted(text), "f.yaml", 3, set(), "code")
    message = str(info.value)
    assert message.startswith("f.yaml:3: code: ") and fragment in message and hint in message, message


def test_the_old_dollar_minus_form_names_the_segment_at_hand():
    with pytest.raises(ConfigError) as info:
        compile_template({"$each": "AIG[*]", "start": "instant($-8)"}, "f.yaml", 3, set(), "participant")
    assert "write AIG-8: a field of the current segment is named with the segment's name (the AIG at hand)" \
        in str(info.value)
