"""The data contract: Avro schemas (``*.avsc``) with a data class on every field, and the code
that loads, checks, encodes, validates, projects and synthesises records against them.

Start with ``registry`` (schemas, fingerprints, field paths and classes), ``codec`` (the wire
format), ``validation`` (edge checks) and ``views`` (per-recipient projections).
"""
