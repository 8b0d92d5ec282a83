"""CRC-32 of a file, computed over several byte ranges at once and combined.

The checkpoint manifest holds each file's CRC-32 (zlib's). One thread reads and checksums
~1.5 GB/s here, so for a 1 GB optimizer file the checksum is a large part of a synchronous save
and of the check before a resume. The CRC of a concatenation follows from the CRCs of its parts:

    crc(A + B) = crc(A) * x^(8 len(B))  XOR  crc(B)      (multiplication modulo the CRC polynomial)

so each thread checksums one range of the file (zlib.crc32 releases the GIL) and the results are
folded left to right. The value is exactly zlib.crc32 of the whole file.

Polynomials over GF(2) are held as in zlib's reflected CRC-32: bit 31 is the coefficient of x^0,
bit 0 that of x^31, and P = 0xEDB88320 is the polynomial without its x^32 term.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

POLY = 0xEDB88320
ONE = 1 << 31  # the polynomial 1 (x^0)
READ_BLOCK = 16 << 20
MIN_RANGE = 64 << 20  # smaller files are not worth a thread per range
MAX_THREADS = 8


def _multiply(a: int, b: int) -> int:
    """a * b modulo P."""
    product = 0
    for bit in range(31, -1, -1):  # the terms x^0, x^1, ... of a
        if a >> bit & 1:
            product ^= b
        # b * x: a shift towards bit 0; a carry out of bit 0 is x^32, which is P modulo P.
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
    return product


def _x_to_8n(n: int) -> int:
    """x^(8n) modulo P: appending n bytes multiplies a CRC by it. By repeated squaring."""
    result, power = ONE, ONE >> 8  # x^0 and x^8
    while n:
        if n & 1:
            result = _multiply(result, power)
        power = _multiply(power, power)
        n >>= 1
    return result


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """zlib.crc32(A + B) from zlib.crc32(A), zlib.crc32(B) and len(B)."""
    return _multiply(_x_to_8n(length_b), crc_a) ^ crc_b


def _range_crc32(path: Path, start: int, end: int) -> int:
    crc = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while start < end:
            block = os.pread(fd, min(READ_BLOCK, end - start), start)
            if not block:  # the file shrank meanwhile: the CRC comes out wrong, and says so
                break
            crc = zlib.crc32(block, crc)
            start += len(block)
    finally:
        os.close(fd)
    return crc


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: what taskset, cgroups' cpusets and
    SLURM grant, not every core of the machine), at least 1. Here because data prep uses it too
    (gpt/wordcache.py), and this module imports nothing heavy: no torch in data prep."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def file_crc32(path: str | os.PathLike, threads: int | None = None) -> int:
    """zlib.crc32 of the file's bytes, over up to `threads` ranges at once (default: the usable
    CPUs, at most 8, and no range under 64 MB)."""
    path = Path(path)
    size = path.stat().st_size
    threads = threads or min(usable_cpus(), MAX_THREADS)
    n = max(1, min(threads, size // MIN_RANGE))
    bounds = [size * i // n for i in range(n + 1)]
    if n == 1:
        return _range_crc32(path, 0, size)
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="crc32") as pool:
        crcs = list(pool.map(_range_crc32, [path] * n, bounds[:-1], bounds[1:]))
    crc = crcs[0]
    for i in range(1, n):
        crc = crc32_combine(crc, crcs[i], bounds[i + 1] - bounds[i])
    return crc
