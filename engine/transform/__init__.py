"""Conversion: routes, the mapping language, and the one pipeline every conversion goes through.

Owns routes (``routes``), the mapping language (``expr``: paths, functions, conditions;
``templates``: YAML that looks like FHIR; ``mappings``: a mapping directory compiled and
cross-checked), a configuration directory as a whole (``project``), the pipeline (``pipeline``:
parse, route, structure check, map, validate, the deliveries to create), the converter process
(``converter``), ``hl7bridge test`` (``regression``) and replays (``replay``).

May import: ``engine.delivery`` (destinations, and ``outbox.queue`` to create deliveries),
``engine.store``, ``engine.hl7`` and the foundation. Plain Python: no sockets, no reactor.
"""
