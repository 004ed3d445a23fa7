"""Hostile archives: member integrity, names, types, order, counts, sizes and compression bombs."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import tarfile
import threading
from pathlib import Path

import pytest
from bundlekit import (
    END_OF_ARCHIVE,
    NOW,
    Member,
    archive_bytes,
    default_members,
    file_blocks,
    file_entry,
    header,
    member_offsets,
    padded,
    pax_block,
    raw_header,
    read_members,
    resigned,
    write_archive,
    write_valid_bundle,
)

import sdk.bundle
from sdk.bundle import ReadLimits, read_bundle
from sdk.errors import BundleError, IntegrityError, SignatureError, UnsafeArchiveError

MEMBER_NAMES = ["manifest.json", "signatures.json", *sorted(default_members())]


# ---- integrity ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("member", "error"),
    [(name, SignatureError if name.endswith(".json") else IntegrityError) for name in MEMBER_NAMES],
)
def test_byte_flipped_in_member(bundle: Path, refused, member: str, error: type[BundleError]) -> None:
    offset, size = member_offsets(bundle)[member]
    data = bytearray(bundle.read_bytes())
    data[offset + size // 2] ^= 0x01
    bundle.write_bytes(data)
    refused(error, bundle)


@pytest.mark.parametrize("member", sorted(default_members()))
def test_member_missing(bundle: Path, tmp_path: Path, keys, refused, member: str) -> None:
    members = [m for m in read_members(bundle) if m.name != member]
    info = refused(IntegrityError, write_archive(tmp_path / "b.edgebundle", members))
    assert member in str(info.value)


def test_member_not_listed_in_manifest(bundle: Path, tmp_path: Path, refused) -> None:
    members = [*read_members(bundle), Member("extra.bin", b"payload")]
    info = refused(IntegrityError, write_archive(tmp_path / "b.edgebundle", members))
    assert "extra.bin" in str(info.value)


@pytest.mark.parametrize("same_bytes", [True, False])
def test_member_listed_twice_in_archive(bundle: Path, tmp_path: Path, refused, same_bytes: bool) -> None:
    members = read_members(bundle)
    model = next(m for m in members if m.name == "model.onnx")
    members.append(Member("model.onnx", model.data if same_bytes else b"evil" * 750))
    refused(UnsafeArchiveError, write_archive(tmp_path / "b.edgebundle", members))


def test_manifest_size_differs_from_member(bundle: Path, tmp_path: Path, keys, refused) -> None:
    def edit(d: dict) -> None:
        for entry in d["files"]:
            if entry["path"] == "model.onnx":
                entry["size"] += 1

    refused(IntegrityError, write_archive(tmp_path / "b.edgebundle", resigned(bundle, [keys.signer], edit)))


def test_member_replaced_with_other_bytes_of_same_size(bundle: Path, tmp_path: Path, refused) -> None:
    members = read_members(bundle)
    for m in members:
        if m.name == "model.onnx":
            m.data = bytes(len(m.data))
    refused(IntegrityError, write_archive(tmp_path / "b.edgebundle", members))


# ---- unsafe names and member types, at every position ------------------------------------------
HOSTILE = {
    "dotdot": Member("../x", b"escape"),
    "absolute": Member("/abs", b"escape"),
    "inner-dotdot": Member("a/../../x", b"escape"),
    "dot": Member("./model.onnx", b"x"),
    "backslash": Member("..\\x", b"x"),
    "symlink": Member("link", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
    "hardlink": Member("hard", type=tarfile.LNKTYPE, linkname="model.onnx"),
    "chardev": Member("null", type=tarfile.CHRTYPE),
    "blockdev": Member("sda", type=tarfile.BLKTYPE),
    "fifo": Member("fifo", type=tarfile.FIFOTYPE),
    "directory": Member("golden", type=tarfile.DIRTYPE),
    "contiguous": Member("cont", b"x", type=tarfile.CONTTYPE),
    "symlink-as-model": Member("model.onnx", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
    "symlink-as-manifest": Member("manifest.json", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
}


@pytest.mark.parametrize("position", ["first", "second", "third", "last"])
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_member_rejected_at_any_position(bundle: Path, tmp_path: Path, refused, kind: str, position: str):
    members = read_members(bundle)
    index = {"first": 0, "second": 1, "third": 2, "last": len(members)}[position]
    members.insert(index, HOSTILE[kind])
    path = write_archive(tmp_path / "b.edgebundle", members)
    with tarfile.open(path) as tar:
        assert tar.getnames()[index] == HOSTILE[kind].name  # tarfile wrote the name as given
    before = sorted(tmp_path.rglob("*"))
    refused(UnsafeArchiveError, path)
    assert sorted(tmp_path.rglob("*")) == before  # nothing escaped into the test folder


@pytest.mark.parametrize("name", ["manifest.json", "signatures.json"])
def test_reserved_name_repeated_later(bundle: Path, tmp_path: Path, refused, name: str) -> None:
    members = read_members(bundle)
    members.append(Member(name, members[0 if name == "manifest.json" else 1].data))
    refused(IntegrityError, write_archive(tmp_path / "b.edgebundle", members))


# ---- order ----------------------------------------------------------------------------------------
def test_manifest_not_first(bundle: Path, tmp_path: Path, refused) -> None:
    m = read_members(bundle)
    info = refused(UnsafeArchiveError, write_archive(tmp_path / "b.edgebundle", [m[2], m[0], m[1], *m[3:]]))
    assert "manifest.json" in str(info.value)


def test_signatures_not_second(bundle: Path, tmp_path: Path, refused) -> None:
    m = read_members(bundle)
    info = refused(UnsafeArchiveError, write_archive(tmp_path / "b.edgebundle", [m[0], m[2], m[1], *m[3:]]))
    assert "signatures.json" in str(info.value)


def test_signatures_first(bundle: Path, tmp_path: Path, refused) -> None:
    m = read_members(bundle)
    refused(UnsafeArchiveError, write_archive(tmp_path / "b.edgebundle", [m[1], m[0], *m[2:]]))


# ---- caps -----------------------------------------------------------------------------------------
def test_more_members_than_cap(bundle: Path, tmp_path: Path, keys, refused) -> None:
    refused(UnsafeArchiveError, bundle, limits=ReadLimits(max_members=5))  # the bundle has 6 members
    extra = [Member(f"pad/{i}", b"") for i in range(10)]

    def edit(d: dict) -> None:  # listed and signed: only the count is wrong
        d["files"] += [file_entry(m.name, m.data) for m in extra]

    path = write_archive(tmp_path / "b.edgebundle", resigned(bundle, [keys.signer], edit, extra=extra))
    info = refused(UnsafeArchiveError, path, limits=ReadLimits(max_members=15))
    assert "more than 15 members" in str(info.value)


def test_caps_exactly_met_pass(bundle: Path, keys, site) -> None:
    sizes = member_offsets(bundle)
    limits = ReadLimits(
        max_bundle_bytes=bundle.stat().st_size,
        max_manifest_bytes=sizes["manifest.json"][1],
        max_signatures_bytes=sizes["signatures.json"][1],
        max_members=len(sizes),
        max_member_bytes=max(size for _, size in sizes.values()),
        max_total_bytes=sum(len(v) for v in default_members().values()),
    )
    read_bundle(bundle, keys.trust, site.dest, now=NOW, limits=limits)
    assert (site.dest / "model.onnx").read_bytes() == default_members()["model.onnx"]


def test_member_over_member_cap(bundle: Path, refused) -> None:
    refused(UnsafeArchiveError, bundle, limits=ReadLimits(max_member_bytes=2999))  # model.onnx is 3000 bytes


def test_total_over_total_cap(bundle: Path, refused) -> None:
    total = sum(len(v) for v in default_members().values())
    refused(UnsafeArchiveError, bundle, limits=ReadLimits(max_total_bytes=total - 1))


def test_manifest_over_cap(bundle: Path, refused) -> None:
    size = member_offsets(bundle)["manifest.json"][1]
    refused(UnsafeArchiveError, bundle, limits=ReadLimits(max_manifest_bytes=size - 1))


def test_signatures_over_cap(bundle: Path, refused) -> None:
    size = member_offsets(bundle)["signatures.json"][1]
    refused(UnsafeArchiveError, bundle, limits=ReadLimits(max_signatures_bytes=size - 1))


def test_bundle_file_over_cap(bundle: Path, refused) -> None:
    refused(UnsafeArchiveError, bundle, limits=ReadLimits(max_bundle_bytes=bundle.stat().st_size - 1))


class _WriteCounter:
    """Counts the bytes ``sdk.bundle`` writes into files, to prove a bomb was stopped before writing."""

    def __init__(self) -> None:
        self.written = 0

    def open(self, file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        f = open(file, mode, *args, **kwargs)
        if "r" in mode:
            return f
        counter, write = self, f.write

        def counted(data):  # type: ignore[no-untyped-def]
            counter.written += len(data)
            return write(data)

        f.write = counted
        return f


@pytest.mark.parametrize("shape", ["one-huge-member", "many-members"])
def test_gzip_decompression_bomb(tmp_path: Path, keys, refused, monkeypatch, shape: str) -> None:
    cap = 1 << 20
    if shape == "one-huge-member":
        members = {"model.onnx": bytes(64 << 20)}
        limits = ReadLimits(max_total_bytes=cap, max_member_bytes=cap)
    else:
        members = {"model.onnx": b"m", **{f"w/{i}.bin": bytes(300_000) for i in range(40)}}
        limits = ReadLimits(max_total_bytes=cap)
    plain = tmp_path / "plain.edgebundle"
    write_valid_bundle(plain, [keys.signer], members=members, golden={})
    bomb = tmp_path / "bomb.edgebundle"
    bomb.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=9, mtime=0))
    assert bomb.stat().st_size < plain.stat().st_size // 100
    counter = _WriteCounter()
    monkeypatch.setattr(sdk.bundle, "open", counter.open, raising=False)
    refused(UnsafeArchiveError, bomb, limits=limits)
    assert counter.written <= cap


def test_pax_header_bomb_refused_before_it_is_read(tmp_path: Path, bundle: Path, refused) -> None:
    members = read_members(bundle)
    members[0].pax = {"comment": "x" * (32 << 20)}  # a 32 MiB header, a few kB once gzipped
    path = tmp_path / "b.edgebundle"
    path.write_bytes(archive_bytes(members, compress=True))
    assert path.stat().st_size < 200_000
    info = refused(UnsafeArchiveError, path)
    assert "pax header" in str(info.value)


def test_pax_header_chain_refused(tmp_path: Path, bundle: Path, refused) -> None:
    # Thousands of chained pax headers made tarfile recurse until RecursionError.
    m = read_members(bundle)
    data = pax_block({"comment": "c"}) * 5000 + b"".join(file_blocks(x.name, x.data) for x in m) + END_OF_ARCHIVE
    path = tmp_path / "b.edgebundle"
    path.write_bytes(data)
    refused(UnsafeArchiveError, path)


def test_pax_header_within_cap_is_honoured(tmp_path: Path, bundle: Path, keys, site) -> None:
    members = read_members(bundle)
    members[2].pax = {"comment": "built by CI"}
    read_bundle(write_archive(tmp_path / "b.edgebundle", members), keys.trust, site.dest, now=NOW)
    assert (site.dest / members[2].name).read_bytes() == members[2].data


def test_pax_path_override_is_checked(tmp_path: Path, bundle: Path, refused) -> None:
    members = read_members(bundle)
    members[3].pax = {"path": "../../escape"}
    refused(UnsafeArchiveError, write_archive(tmp_path / "b.edgebundle", members))


@pytest.mark.parametrize(
    "records",
    [
        {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": "model.onnx",
            "GNU.sparse.realsize": "3000",
        },
        {"GNU.sparse.map": "0,10", "GNU.sparse.size": "3000"},
        {"GNU.sparse.size": "3000", "GNU.sparse.offset": "0", "GNU.sparse.numbytes": "10"},
    ],
    ids=["sparse-1.0", "sparse-0.1", "sparse-0.0"],
)
def test_pax_sparse_member_refused(tmp_path: Path, bundle: Path, refused, records: dict[str, str]) -> None:
    m = read_members(bundle)
    body = b"".join(file_blocks(x.name, x.data) for x in m[:2])
    body += pax_block(records) + file_blocks("model.onnx", b"\0" * 600) + END_OF_ARCHIVE
    path = tmp_path / "b.edgebundle"
    path.write_bytes(body)
    refused(UnsafeArchiveError, path)


def _gnu_or_global(typeflag: bytes) -> bytes:
    if typeflag == tarfile.XGLTYPE:  # a global header renames every following member
        return pax_block({"path": "model.onnx"}, typeflag)
    if typeflag == tarfile.GNUTYPE_SPARSE:
        return bytes(raw_header("model.onnx", 0, typeflag))
    name = b"tokenizer/" + b"a" * 200 + b"\0"
    return bytes(raw_header("././@LongLink", len(name), typeflag)) + padded(name) + file_blocks("t", b"x")


@pytest.mark.parametrize(
    "typeflag", [tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE]
)
def test_gnu_and_global_headers_refused(tmp_path: Path, bundle: Path, refused, typeflag: bytes) -> None:
    m = read_members(bundle)
    body = b"".join(file_blocks(x.name, x.data) for x in m[:3]) + _gnu_or_global(typeflag)
    body += b"".join(file_blocks(x.name, x.data) for x in m[3:]) + END_OF_ARCHIVE
    path = tmp_path / "b.edgebundle"
    path.write_bytes(body)
    refused(UnsafeArchiveError, path)


def test_negative_member_size_refused(tmp_path: Path, bundle: Path, refused) -> None:
    m = read_members(bundle)
    body = b"".join(file_blocks(x.name, x.data) for x in m)
    body += bytes(raw_header("model.onnx", -4096)) + END_OF_ARCHIVE
    path = tmp_path / "b.edgebundle"
    path.write_bytes(body)
    refused(UnsafeArchiveError, path)


# ---- not a (whole) archive ------------------------------------------------------------------------
def test_truncated_archive(bundle: Path, refused) -> None:
    # tar pads the file to a 10 KiB record, so cut the part that holds members in half.
    end = max(offset + size for offset, size in member_offsets(bundle).values())
    bundle.write_bytes(bundle.read_bytes()[: end // 2])
    refused(UnsafeArchiveError, bundle)


def test_file_cut_in_half_with_big_member(tmp_path: Path, keys, refused) -> None:
    path = tmp_path / "b.edgebundle"
    write_valid_bundle(path, [keys.signer], members={**default_members(), "model.onnx": os.urandom(50_000)})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(UnsafeArchiveError, path)


def test_padding_after_last_member_may_be_cut(bundle: Path, keys, site) -> None:
    # Bytes after the last member's data carry nothing signed; losing them changes nothing.
    end = max(offset + size for offset, size in member_offsets(bundle).values())
    bundle.write_bytes(bundle.read_bytes()[: end + (-end % 512)])  # no end-of-archive blocks
    verified = read_bundle(bundle, keys.trust, site.dest, now=NOW)
    assert (verified.root / "model.onnx").read_bytes() == default_members()["model.onnx"]


@pytest.mark.parametrize("cut", [100, 700, 1500])
def test_truncated_inside_header(bundle: Path, refused, cut: int) -> None:
    bundle.write_bytes(bundle.read_bytes()[:cut])
    refused(UnsafeArchiveError, bundle)


def test_truncated_gzip(bundle: Path, refused) -> None:
    data = gzip.compress(bundle.read_bytes(), mtime=0)
    bundle.write_bytes(data[: len(data) // 2])
    refused(UnsafeArchiveError, bundle)


def test_last_member_cut_short(bundle: Path, refused) -> None:
    offset, size = member_offsets(bundle)[read_members(bundle)[-1].name]
    bundle.write_bytes(bundle.read_bytes()[: offset + size - 1])
    refused(UnsafeArchiveError, bundle)


@pytest.mark.parametrize(
    "content",
    [b"", b"\0" * 10240, b"PK\x03\x04 this is a zip", b'{"name": "json"}', os.urandom(4096)],
    ids=["zero-bytes", "zero-blocks", "zip", "json", "random"],
)
def test_not_a_tar_file(tmp_path: Path, refused, content: bytes) -> None:
    path = tmp_path / "b.edgebundle"
    path.write_bytes(content)
    refused(UnsafeArchiveError, path)


@pytest.mark.parametrize("compress", [bz2.compress, lzma.compress], ids=["bzip2", "xz"])
def test_other_compressions_refused(bundle: Path, refused, compress) -> None:
    bundle.write_bytes(compress(bundle.read_bytes()))
    info = refused(UnsafeArchiveError, bundle)
    assert "gzip" in str(info.value)


def test_bundle_path_missing(tmp_path: Path, refused) -> None:
    refused(BundleError, tmp_path / "nope.edgebundle")


def test_bundle_path_is_a_fifo_does_not_hang(tmp_path: Path, refused) -> None:
    fifo = tmp_path / "b.edgebundle"
    os.mkfifo(fifo)
    done: list[BaseException] = []

    def run() -> None:
        try:
            refused(BundleError, fifo)
        except BaseException as e:  # pragma: no cover - reported below
            done.append(e)
        else:
            done.append(None)  # type: ignore[arg-type]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # unblock the reader so the test process can exit
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_bundle blocked on a FIFO")
    assert done == [None], done


def test_destination_exists(bundle: Path, keys, site) -> None:
    site.dest.mkdir()
    with pytest.raises(BundleError, match="exists"):
        read_bundle(bundle, keys.trust, site.dest, now=NOW)
    assert list(site.dest.iterdir()) == []


def test_unsigned_archive_with_valid_members(bundle: Path, tmp_path: Path, keys, refused) -> None:
    members = read_members(bundle)
    members[1].data = b"[]"
    refused(SignatureError, write_archive(tmp_path / "b.edgebundle", members))


def test_hostile_member_signed_into_manifest_still_refused(bundle: Path, tmp_path: Path, keys, refused) -> None:
    # Even a trusted signer cannot make a link or traversal acceptable.
    link = Member("tokenizer/link", type=tarfile.SYMTYPE, linkname="/etc/shadow")

    def edit(d: dict) -> None:
        d["files"].append(file_entry("tokenizer/link", b""))

    refused(
        UnsafeArchiveError,
        write_archive(tmp_path / "b.edgebundle", resigned(bundle, [keys.signer], edit, extra=[link])),
    )


def test_header_helper_matches_writer(bundle: Path, keys) -> None:
    m = read_members(bundle)
    assert [x.data for x in header(m[0].data, [keys.signer])] == [m[0].data, m[1].data]


@pytest.mark.parametrize(("chain", "ok"), [(4, True), (5, False)])
def test_pax_header_chain_limit(tmp_path: Path, bundle: Path, keys, site, chain: int, ok: bool) -> None:
    m = read_members(bundle)
    data = b"".join(
        pax_block({"comment": "c"}) * (chain if i == 2 else 0) + file_blocks(x.name, x.data) for i, x in enumerate(m)
    )
    path = tmp_path / "b.edgebundle"
    path.write_bytes(data + END_OF_ARCHIVE)
    if ok:
        assert read_bundle(path, keys.trust, site.dest, now=NOW).path(m[2].name).read_bytes() == m[2].data
    else:
        with pytest.raises(UnsafeArchiveError, match="pax headers in a row"):
            read_bundle(path, keys.trust, site.dest, now=NOW)
        site.assert_clean()
