"""The floors the strip benchmark measures against: the least work that puts the output's
bytes on disk, each a child's whole work started by launcher.launch in a fresh process.

Both copy in the kernel (`copy_file_range`, no bytes through Python) and fsync every file they
write, as strip does. Only the standard library: a floor must not pay for imports the
command it judges would not.
"""

from __future__ import annotations

import os


def raw_copy(src: str, sizes: dict[str, int], dst: str) -> None:
    """For each output file (name: byte count), that many bytes of the input file of the same
    name, copied into `dst`."""
    os.makedirs(dst)
    for name, size in sorted(sizes.items()):
        source = os.path.join(src, name)
        b = os.open(os.path.join(dst, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        have = os.path.getsize(source) if os.path.isfile(source) else 0
        if have:
            # An output a few KB larger than its input (page-aligned records) wraps around.
            a, done = os.open(source, os.O_RDONLY), 0
            while done < size:
                done += os.copy_file_range(a, b, min(size - done, have - done % have, 1 << 30),
                                           done % have)
            os.close(a)
        else:  # no input file of that name (never a shard): the byte count is what matters
            os.write(b, bytes(size))
        os.fsync(b)
        os.close(b)


def raw_concat(src: str, sizes: dict[str, int], dst: str) -> None:
    """The litgpt export's floor: each output file's byte count copied from the input shards in
    order (zeros past their end)."""
    shards = sorted(n for n in os.listdir(src) if n.endswith((".bin", ".safetensors")))
    os.makedirs(dst)
    for name, size in sorted(sizes.items()):
        b = os.open(os.path.join(dst, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        done = 0
        for shard in shards:
            a = os.open(os.path.join(src, shard), os.O_RDONLY)
            left = min(os.fstat(a).st_size, size - done)
            while left > 0:
                n = os.copy_file_range(a, b, min(left, 1 << 30))
                done, left = done + n, left - n
            os.close(a)
        if done < size:
            os.write(b, bytes(size - done))
        os.fsync(b)
        os.close(b)
