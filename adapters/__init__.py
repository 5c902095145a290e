"""Partner adapters: each partner kind's native format <-> canonical referrals and statuses.

The Python API partner systems embed (the CLI's ``send``/``receive`` are thin over it)::

    from referral_broker import adapters
    result = adapters.load_file("schools", "export.csv")            # validate the whole file
    for parsed in adapters.iter_file("dwp", "batch.csv"):            # large files, flat memory
        ...
    adapters.render_file("health", views, "outbox/")                 # canonical/views -> native
    adapters.load_statuses("schools", "statuses.csv"); adapters.render_statuses(...)

One module per partner kind (``schools``, ``health``, ``dwp``, ``police``, ``charities``), each a
table of fields over the shared shape in ``base``; ``field_map`` converts values by those tables,
``native_files`` reads and writes files safely (CSV by row, JSON by record with ijson),
``file_verbs`` holds the verbs above (and refuses a file that repeats a referral). A kind may
read a second format, chosen by the file's content, and render it with ``fmt=``: health FHIR
XML (``fhir_files``; UK Core codes in ``uk_core``), schools the DfE Common Transfer File
(``ctf``). ``referral-broker validate --as KIND --file F`` is the dry run over these verbs.
Formats and their mapping to canonical paths: ``FORMATS.md``.
"""

from __future__ import annotations

from . import charities, dwp, health, police, schools
from .base import ParsedRecord, PartnerAdapter, Rendered, adapter_kinds, get_adapter
from .file_verbs import (
    FileStream,
    LoadResult,
    example_file,
    iter_file,
    load_file,
    load_statuses,
    render_file,
    render_statuses,
)

__all__ = [
    "FileStream",
    "LoadResult",
    "ParsedRecord",
    "PartnerAdapter",
    "Rendered",
    "adapter_kinds",
    "charities",
    "dwp",
    "example_file",
    "get_adapter",
    "health",
    "iter_file",
    "load_file",
    "load_statuses",
    "police",
    "render_file",
    "render_statuses",
    "schools",
]
