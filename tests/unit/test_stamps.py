"""Stable IDs: written out for speed, they must stay exactly the UUIDv5 they always were (every
resource ID already sent downstream is one)."""

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.stamps import ID_NAMESPACE, stable_id


def test_a_known_id_never_changes():
    assert stable_id("Patient", "urn:oid:1.2.3", "100") == str(uuid.uuid5(ID_NAMESPACE, "Patient|urn:oid:1.2.3|100"))
    assert stable_id("Provenance", "") == "1ff726f2-6fdb-54d4-a3b5-2b93f5608c27"


@settings(max_examples=300)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",))), max_size=4))
def test_stable_id_is_uuid5_of_the_parts(parts):
    made = stable_id(*parts)
    assert made == str(uuid.uuid5(ID_NAMESPACE, "|".join(parts)))
    assert uuid.UUID(made).version == 5


def test_remembered_ids_are_the_same_ids_and_the_memory_is_bounded(monkeypatch):
    from engine import stamps

    monkeypatch.setattr(stamps, "_MADE_KEPT", 3)
    names = [("Practitioner", "urn:oid:1.2", str(n)) for n in range(10)]
    for _ in range(2):
        for parts in names:
            assert stable_id(*parts) == str(uuid.uuid5(ID_NAMESPACE, "|".join(parts)))
    assert len(stamps._MADE) <= 3
