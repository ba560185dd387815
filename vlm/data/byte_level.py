"""GPT-2's byte-level alphabet: the reversible byte -> printable character map of ``tokenizers``' ``ByteLevel``."""
from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    """``{byte value: character}``: printable Latin-1 bytes map to themselves, the other 68 to ``chr(256 + i)``."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
