"""The streaming tar reader agrees with `tarfile` on every format shards come in, and fails like it."""

import io
import tarfile

import pytest
import webdataset as wds

from xbt_dist.data.tarstream import iter_tar_files, open_tar_files


def _tar(fmt, members, compress=None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w" if compress is None else f"w:{compress}", format=fmt) as t:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [("000001.jpg", b"\xff\xd8" + bytes(range(256)) * 3), ("000001.txt", "a caption é".encode()),
           ("d" * 120 + "/000002.txt", b"long path"),            # > 100 chars: pax path / GNU longname
           ("p" * 90 + "/q" * 30 + "/000003.cls", b""),          # empty member; ustar prefix split
           ("000004.json", b"{}" * 300)]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_same_members_as_tarfile(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if len(m[0]) < 100]
    raw = _tar(fmt, members)
    assert list(iter_tar_files(io.BytesIO(raw))) == members
    assert list(open_tar_files(io.BytesIO(_tar(fmt, members, "gz")))) == members


def test_webdataset_writer_shards_read_back():
    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        for i in range(3):
            w.write({"__key__": f"{i:06d}", "txt": f"caption {i}", "jpg": bytes([i]) * 700})
    files = list(open_tar_files(io.BytesIO(buf.getvalue())))
    assert sorted(files) == [(f"{i:06d}.{ext}", data) for i in range(3)
                             for ext, data in (("jpg", bytes([i]) * 700), ("txt", f"caption {i}".encode()))]
    keys = [n.split(".")[0] for n, _ in files]
    assert keys == sorted(keys)  # a sample's members are contiguous, samples in write order


def test_truncated_and_corrupt_tars_fail_like_tarfile():
    raw = _tar(tarfile.PAX_FORMAT, MEMBERS)
    with pytest.raises(EOFError):
        list(iter_tar_files(io.BytesIO(raw[:2000])))       # cut inside a member's data
    bad = bytearray(raw)
    bad[raw.index(b"000001.txt")] ^= 0xFF                  # flip a byte of the second header
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_tar_files(io.BytesIO(bytes(bad))))
    with pytest.raises(tarfile.ReadError):
        list(iter_tar_files(io.BytesIO(b"not a tar at all" * 40)))
    assert list(iter_tar_files(io.BytesIO(b""))) == []
