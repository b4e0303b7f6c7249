"""The delivery pipeline: identifiers -> staging -> rollover (encode) -> sink publish -> ledger -> counts."""
