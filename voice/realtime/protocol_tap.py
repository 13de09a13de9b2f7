"""A tap on both sides of the realtime protocol, for conformance tests (tests/sdk_conformance.py).

`gateway_sent` sees every event the gateway sends to an upstream (JSON text or UTF-8 bytes, as sent);
`engine_emitted` sees every event the local engine emits (the dict, before it is serialised). Both are
None in production: each call site costs one module-global None check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

gateway_sent: Callable[[str | bytes], None] | None = None
engine_emitted: Callable[[dict[str, Any]], None] | None = None
