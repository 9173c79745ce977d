"""The shard reader's tar parser against Python's ``tarfile``: same accept/reject decisions, names and bytes.

Archives are written by ``tarfile`` itself (USTAR, GNU and PAX formats; long and non-ASCII names,
``../`` and absolute names, directories, symlinks, hard links, FIFOs, empty files, global headers),
then cut at every offset or corrupted byte by byte, with and without a repaired header checksum.
The oracle is ``tarfile`` made strict in the one way the reader documents: the archive must end with
its end-of-archive block exactly where ``tarfile`` stopped (``tarfile`` stops quietly at a bad header
after the first member). The reader's other documented refusals (malformed pax records, which
Python 3.11's ``tarfile`` reads into garbage; sparse members; global pax headers that set a path or a size)
are the only allowed difference, and only as a refusal.
"""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from fahr.boundary import InputError
from fahr.data.shard_reader import _META_NAME, _iter_tar_members, read_shard

BLOCK = 512
STRICTER = ("malformed pax record", "a global pax header sets", "unsupported sparse member")  # documented refusals
NAMES = ["000001.jpg", "000001.json", "a/b/c/000002.jpg", "../escape.jpg", "/abs/path.json", "ünïcode-名前.jpg",
         "x" * 99 + ".j", "deep/" * 30 + "long.jpg", "n" * 120 + ".json", "__index__", "_private.jpg",
         "sp ace.jpg", "dot.in.name.tar.jpg", "trailing.jpg"]


def reader_members(data: bytes) -> list[tuple[str, bytes]] | str:
    """The reader's regular members, or its refusal message (any other exception fails the test)."""
    try:
        return [(name, bytes(payload)) for name, payload in _iter_tar_members(io.BufferedReader(io.BytesIO(data)))]
    except InputError as exn:
        return str(exn)


def tarfile_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """``tarfile``'s regular members (webdataset's meta members left out, as the reader does), or None when
    it refuses the archive, a member's data is cut short, or it did not stop at an end-of-archive block."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            members = []
            for info in tf:
                if info.isreg():
                    payload = tf.extractfile(info).read()
                    if len(payload) != info.size:
                        return None
                    if not (info.name[:1] == "_" and _META_NAME.match(info.name)):
                        members.append((info.name, payload))
            end = tf.offset
    except Exception:  # noqa: BLE001 - whatever tarfile raises is a refusal
        return None
    return members if data[end:end + BLOCK] == bytes(BLOCK) else None


def same_decision(data: bytes) -> None:
    ours, theirs = reader_members(data), tarfile_members(data)
    if isinstance(ours, str):
        assert theirs is None or ours.startswith(STRICTER), f"reader refused ({ours}), tarfile read {theirs}"
    else:
        assert theirs is not None, f"reader read {ours}, tarfile refused"
        assert ours == theirs


def random_archive(rng: random.Random, fmt: int) -> bytes:
    buf = io.BytesIO()
    pax = {"comment": "global"} if fmt == tarfile.PAX_FORMAT and rng.random() < 0.3 else None
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **({"pax_headers": pax} if pax else {})) as tf:
        for _ in range(rng.randint(0, 6)):
            kind = rng.choice([tarfile.REGTYPE] * 4 + [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                                       tarfile.FIFOTYPE])
            info = tarfile.TarInfo(rng.choice(NAMES))
            info.type, info.mtime = kind, rng.randint(0, 2**31)
            payload = b""
            if kind == tarfile.REGTYPE:
                payload = rng.randbytes(rng.choice([0, 1, 511, 512, 513, rng.randint(0, 3000)]))
                info.size = len(payload)
            elif kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = rng.choice(NAMES)
            if fmt == tarfile.PAX_FORMAT and rng.random() < 0.3:
                info.pax_headers = {"comment": "member " + rng.choice(NAMES)}
            try:
                tf.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
            except ValueError:  # USTAR cannot hold some long names: tarfile refuses to write them
                continue
    return buf.getvalue()


def header_offsets(data: bytes) -> list[int]:
    """Offsets of every header and extension block (from tarfile's own member offsets)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            offsets = [b for info in tf for b in range(info.offset, info.offset_data, BLOCK)]
    except tarfile.ReadError:  # a global header and no member: tarfile refuses what it wrote
        return [0]
    return offsets + [len(data.rstrip(b"\0")) // BLOCK * BLOCK] if offsets else [0]


def repair_checksum(data: bytearray, start: int) -> None:
    """Write the checksum that makes the block at ``start`` a valid header, as tarfile writes it."""
    block = data[start:start + BLOCK]
    block[148:156] = b" " * 8
    data[start + 148:start + 156] = b"%06o\0 " % sum(block)


FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]


@pytest.mark.parametrize("fmt", FORMATS, ids=["ustar", "gnu", "pax"])
def test_random_archives_read_as_tarfile_reads_them(fmt):
    """(tarfile refuses one thing it writes: a global pax header followed by no member.)"""
    rng = random.Random(fmt)
    read = 0
    for _ in range(150):
        data = random_archive(rng, fmt)
        same_decision(data)
        read += not isinstance(reader_members(data), str)
    assert read >= 140


@pytest.mark.parametrize("fmt", FORMATS, ids=["ustar", "gnu", "pax"])
def test_an_archive_cut_at_every_offset(fmt):
    rng = random.Random(10 + fmt)
    for _ in range(3):
        data = random_archive(rng, fmt)
        for cut in range(len(data) + 1):
            same_decision(data[:cut])


@pytest.mark.parametrize("fmt", FORMATS, ids=["ustar", "gnu", "pax"])
@pytest.mark.parametrize("repair", [False, True], ids=["checksum-as-is", "checksum-repaired"])
def test_corrupted_headers(fmt, repair):
    """Random bytes, and values chosen to hit the number parser (octal edge cases, base-256, signs,
    underscores, spaces, NULs), in random header fields; with the checksum repaired the corruption
    reaches the field checks instead of stopping at the checksum."""
    rng = random.Random(100 * fmt + repair)
    tricky = [b"0", b"7", b"8", b" ", b"\0", b"_", b"+", b"-", b"\x80", b"\xff", b"a", b"\t", b"/", b"5", b"L", b"x", b"g"]
    for _ in range(500):
        data = bytearray(random_archive(rng, fmt))
        start = rng.choice(header_offsets(bytes(data)))
        for _ in range(rng.randint(1, 3)):
            pos = start + rng.choice([rng.randrange(BLOCK), 156, 124, 125, 134, 135, 0, 99, 345, 100, 257])
            if pos < len(data):
                data[pos] = rng.choice(tricky)[0] if rng.random() < 0.7 else rng.randrange(256)
        if repair and start + BLOCK <= len(data):
            repair_checksum(data, start)
        same_decision(bytes(data))


def _header(name: bytes, size: int, kind: bytes, *, prefix: bytes = b"", magic: bytes = b"ustar\x0000") -> bytes:
    block = bytearray(BLOCK)
    block[:len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = b"%011o\0" % size
    block[156:157] = kind
    block[257:265] = magic
    block[345:345 + len(prefix)] = prefix
    repair_checksum(block, 0)
    return bytes(block)


def _pad(payload: bytes) -> bytes:
    return payload + bytes(-len(payload) % BLOCK)


END = bytes(2 * BLOCK)


@pytest.mark.parametrize("case,archive", ids=lambda v: v if isinstance(v, str) else "", argvalues=[
    ("v7 header (no magic)", _header(b"old.jpg", 3, b"0", magic=bytes(8)) + _pad(b"abc") + END),
    ("ustar prefix", _header(b"f.jpg", 2, b"0", prefix=b"dir/sub") + _pad(b"hi") + END),
    ("v7 directory: AREGTYPE with a trailing slash, size ignored", _header(b"d/", 600, b"\0") + END),
    ("directory with a size: tarfile reads no data after it", _header(b"d", 1000, b"5") + _header(b"a.jpg", 1, b"0")
     + _pad(b"z") + END),
    ("unknown type: its data is skipped", _header(b"u.bin", 5, b"Z") + _pad(b"12345") + _header(b"a.jpg", 1, b"0")
     + _pad(b"z") + END),
    ("GNU long name then pax path: the first extension wins",
     _header(b"././@LongLink", 9, b"L") + _pad(b"long.jpg\0") + _header(b"p", 20, b"x") + _pad(b"20 path=paxname.jpg\n")
     + _header(b"short.jpg", 1, b"0") + _pad(b"q") + END),
    ("pax size overrides the header's", _header(b"p", 11, b"x") + _pad(b"11 size=70\n") + _header(b"big.jpg", 3, b"0")
     + _pad(bytes(range(70))) + END),
    ("pax path with trailing slashes", _header(b"p", 17, b"x") + _pad(b"17 path=a.jpg//\n") + _header(b"z", 1, b"0")
     + _pad(b"1") + END),
    ("only one end block", _header(b"a.jpg", 1, b"0") + _pad(b"1") + bytes(BLOCK)),
    ("an extension header before the end", _header(b"a.jpg", 1, b"0") + _pad(b"1") + _header(b"p", 12, b"x")
     + _pad(b"12 mtime=1\n") + END),
    ("a GNU long name before the end", _header(b"././@LongLink", 4, b"L") + _pad(b"n.j\0") + END),
    ("non-ASCII name bytes (not UTF-8)", _header(b"caf\xe9.jpg", 1, b"0") + _pad(b"1") + END),
    ("non-zero bytes after the name's NUL", _header(b"a.jpg\0garbage", 1, b"0") + _pad(b"1") + END),
    ("a base-256 size", _header(b"a.jpg", 0, b"0")[:124] + b"\x80" + bytes(10) + b"\x02" + _header(b"a.jpg", 0, b"0")[136:]
     + _pad(b"12") + END),
])
def test_hand_made_archives(case, archive):
    data = bytearray(archive)
    for start in range(0, len(data), BLOCK):
        if data[start + 257:start + 262] == b"ustar" or start == 0:
            if bytes(data[start:start + BLOCK]) != bytes(BLOCK):
                repair_checksum(data, start)
    same_decision(bytes(data))
    assert tarfile_members(bytes(data)) is not None or case in ("an extension header before the end",
                                                                "a GNU long name before the end")


@pytest.mark.parametrize("archive,message", ids=["pax-length", "pax-newline", "global-path", "sparse", "huge"], argvalues=[
    (_header(b"p", 12, b"x") + _pad(b"99 path=a\n") + _header(b"a.jpg", 1, b"0") + _pad(b"1") + END, "malformed pax record"),
    (_header(b"p", 12, b"x") + _pad(b"12 path=a.j") + _header(b"a.jpg", 1, b"0") + _pad(b"1") + END, "malformed pax record"),
    (_header(b"g", 16, b"g") + _pad(b"16 path=all.jpg\n") + _header(b"a.jpg", 1, b"0") + _pad(b"1") + END,
     "a global pax header sets"),
    (_header(b"s.jpg", 10, b"S") + _pad(b"0123456789") + END, "unsupported sparse member"),
    (_header(b"a.jpg", 0, b"0")[:124] + b"\x80" + b"\xff" * 11 + _header(b"a.jpg", 0, b"0")[136:] + END,
     "is negative or over"),
])
def test_the_readers_documented_refusals(archive, message):
    data = bytearray(archive)
    for start in range(0, len(data), BLOCK):
        if data[start + 257:start + 262] == b"ustar":
            repair_checksum(data, start)
    ours = reader_members(bytes(data))
    assert isinstance(ours, str) and message in ours


def test_compressed_shards_read_through_the_same_parser(tmp_path):
    import bz2
    import gzip
    import lzma

    rng = random.Random(7)
    data = random_archive(rng, tarfile.GNU_FORMAT)
    while not tarfile_members(data):
        data = random_archive(rng, tarfile.GNU_FORMAT)
    plain = tmp_path / "plain.tar"
    plain.write_bytes(data)
    expected = list(read_shard(str(plain)))
    for suffix, compress in (("tar.gz", gzip.compress), ("tar.bz2", bz2.compress), ("tar.xz", lzma.compress)):
        path = tmp_path / f"shard.{suffix}"
        path.write_bytes(compress(data))
        got = list(read_shard(str(path)))
        assert [{k: v for k, v in s.items() if k != "__url__"} for s in got] == \
               [{k: v for k, v in s.items() if k != "__url__"} for s in expected]
        cut = tmp_path / f"cut.{suffix}"
        cut.write_bytes(compress(data)[: len(compress(data)) // 2])
        with pytest.raises(InputError):
            list(read_shard(str(cut)))
