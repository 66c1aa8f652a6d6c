"""CRC-32 of a concatenation from the parts' CRCs (zlib's `crc32_combine`, which Python's zlib
does not expose): a new zip record made of whole stored records (litgpt's fused q/k/v) then
has a known CRC and is copied in the kernel, never read through user space."""

from __future__ import annotations

_POLY = 0xEDB88320  # CRC-32's reflected polynomial


def _times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, row) for row in matrix]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc32(A), crc32(B) and len(B): crc1 advanced by len2 zero bytes
    (a GF(2) matrix raised to len2 by squaring), then xor crc2."""
    if len2 <= 0:
        return crc1
    odd = [_POLY] + [1 << n for n in range(31)]   # the operator for one zero bit
    even = _square(odd)                           # two zero bits
    odd = _square(even)                           # four zero bits
    while True:
        even = _square(odd)                       # first pass: one zero byte
        if len2 & 1:
            crc1 = _times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _square(even)
        if len2 & 1:
            crc1 = _times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def combined(parts: list[tuple[int, int]]) -> int:
    """CRC-32 of parts given as (crc, length), in order."""
    crc = 0
    for part_crc, length in parts:
        crc = crc32_combine(crc, part_crc, length)
    return crc
