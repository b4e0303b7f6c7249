"""Partner-ready files through real rolls to a local folder: PGP (decrypted with the gpg command line, read back
with pyarrow), partner profiles (byte-exact headers and hashes), done markers, manifest prefix, size caps, CSV
dialect."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from config.feed import FeedConfigError, parse_feed_properties
from filefeed.context import build_context
from pipeline.encode import EncodeSpec, encode_batches, header_bytes, row_bytes
from pipeline.ledger import last_deliveries
from pipeline.model import STAGED_SCHEMA, Partition
from pipeline.rollover import CRASH_ENV, failed_rolls, pending_rolls, retry_failed, roll_partition
from sinks import open_sink
from sinks.local import LocalSink
from tests.pgp_keys import PgpKeys
from tests.rollover.helpers import destination_files, make_rows, stage_segment

P = Partition("feed-1", "seg-1", "UPSERT")
NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)


def roll(root: Path, dest: Path, **raw: object):
    props = parse_feed_properties({"destination_uri": f"file://{dest}", **raw})
    with open_sink(props) as sink:
        out = roll_partition(root, P, props, sink, now=NOW)
    assert out.status == "published", out.error
    return out, destination_files(dest)


def csv_rows(data: bytes, delimiter: str = ",") -> list[dict[str, str]]:
    table = pcsv.read_csv(io.BytesIO(data), parse_options=pcsv.ParseOptions(delimiter=delimiter),
                          convert_options=pcsv.ConvertOptions(strings_can_be_null=False,
                                                              column_types={"identifier": pa.string(),
                                                                            "ts": pa.string()}))
    return [{k: str(v) for k, v in row.items()} for row in table.to_pylist()]


# -- PGP -------------------------------------------------------------------------------------------------------


def _encryption_subkey_ids(keys: PgpKeys, fingerprint: str) -> set[str]:
    out = keys.gpg("--with-colons", "--list-keys", fingerprint).decode()
    return {line.split(":")[4] for line in out.splitlines() if line.startswith("sub:") and "e" in line.split(":")[11]}


@pytest.mark.parametrize(("file_format", "compression"), [("csv", "gzip"), ("parquet", "snappy"), ("csv", "none")])
def test_pgp_files_decrypt_with_gpg_and_read_back(root: Path, dest: Path, pgp_keys: PgpKeys, file_format: str,
                                                  compression: str) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(2500))
    out, files = roll(root, dest, encryption="pgp", pgp_public_key=pgp_keys.good + pgp_keys.second,
                      file_format=file_format, compression=compression, max_rows_per_file=1000)
    assert len(out.files) == 3 and all(n.endswith(".gpg") for n in out.files)
    ext = {"gzip": "csv.gz.gpg", "snappy": "parquet.gpg", "none": "csv.gpg"}[compression]
    assert all(n.endswith(f"_part0000{i}.{ext}") for i, n in enumerate(out.files, 1))
    rows: list[dict[str, str]] = []
    for name in out.files:
        clear = pgp_keys.decrypt(files[name])
        if file_format == "parquet":
            rows += [{k: str(v) for k, v in r.items()} for r in pq.read_table(io.BytesIO(clear)).to_pylist()]
        else:
            rows += csv_rows(gzip.decompress(clear) if compression == "gzip" else clear)
    assert [r["identifier"] for r in rows] == [f"{i:064x}" for i in range(2500)]
    # encrypted to each recipient's encryption subkey
    packets = pgp_keys.gpg("--list-packets", input=files[out.files[0]]).decode(errors="replace")
    key_ids = set(re.findall(r"pubkey enc packet: .*keyid ([0-9A-F]{16})", packets))
    expected = (_encryption_subkey_ids(pgp_keys, pgp_keys.fingerprints["partner"])
                | _encryption_subkey_ids(pgp_keys, pgp_keys.fingerprints["second"]))
    assert key_ids == expected and len(key_ids) == 2
    # the manifest lists the encrypted bytes and their sha256
    manifest = json.loads(next(v for k, v in files.items() if k.endswith(".manifest.json")))
    for entry in manifest["files"]:
        assert entry["bytes"] == len(files[entry["name"]])
        assert entry["sha256"] == hashlib.sha256(files[entry["name"]]).hexdigest()
    assert manifest["encryption"] == {"type": "pgp", "recipients": [pgp_keys.fingerprints["partner"],
                                                                    pgp_keys.fingerprints["second"]]}
    assert not list((root / P.relpath).rglob("*.csv*")) and not list((root / P.relpath).rglob("*.parquet"))


def test_creation_refuses_expired_revoked_and_sign_only_keys_naming_fingerprints(pgp_keys: PgpKeys) -> None:
    with pytest.raises(FeedConfigError) as e:
        parse_feed_properties({"destination_uri": "file:///tmp/x", "encryption": "pgp",
                               "pgp_public_key": pgp_keys.good + pgp_keys.expired + pgp_keys.revoked
                               + pgp_keys.sign_only, "file_format": "xml"})
    problems = e.value.problems
    fprs = pgp_keys.fingerprints
    assert any(f"key {fprs['expired']} is expired" in p for p in problems)
    assert any(f"key {fprs['revoked']} is revoked" in p for p in problems)
    assert any(f"key {fprs['signer']} has no valid encryption subkey" in p for p in problems)
    assert not any(fprs["partner"] in p for p in problems)
    with pytest.raises(FeedConfigError, match="ASCII-armoured"):
        parse_feed_properties({"destination_uri": "file:///tmp/x", "encryption": "pgp", "pgp_public_key": "AAAA"})


# -- partner profiles --------------------------------------------------------------------------------------------

# "MyEmail@example.com" and "Jane.Saoirse+Work@gmail.com": digests from the UID2 docs' published examples
MYEMAIL_HEX = "16c18d336f0b250f0e2d907452ceb9658a74ecdae8bc94864c23122a72cc27a5"
JANE_UID2_B64 = "ku4mBX7Z3qJTXWyLFB1INzkyR2WZGW4ANSJUiW21iI8="
JANE_TRIM_LOWER_HEX = hashlib.sha256(b"jane.saoirse+work@gmail.com").hexdigest()


@pytest.mark.parametrize(("profile", "expected_name", "expected_bytes"), [
    ("meta", r"seg-1/20240601T120000Z_UPSERT_[0-9T]+-[0-9a-f]+_part00001\.csv",
     f"email\n{MYEMAIL_HEX}\n{JANE_TRIM_LOWER_HEX}\n"),
    ("google_customer_match", r"seg-1/20240601T120000Z_UPSERT_[0-9T]+-[0-9a-f]+_part00001\.csv",
     f"Email,Phone,First Name,Last Name,Country,Zip\n{MYEMAIL_HEX},,,,,\n{JANE_TRIM_LOWER_HEX},,,,,\n"),
    ("ttd_uid2", r"seg-1/20240601T120000Z_UPSERT_[0-9T]+-[0-9a-f]+_part00001\.csv\.gz",
     "email_hash\nFsGNM28LJQ8OLZB0Us65ZYp07NrovJSGTCMSKnLMJ6U=\n" + JANE_UID2_B64 + "\n"),
    ("liveramp", r"seg-1/feed-1_seg-1_20240601T120000Z_[0-9T]+-[0-9a-f]+_file-part-00001\.csv\.gz",
     f"SHA256_EMAIL,SEGMENT_ID\n{MYEMAIL_HEX},seg-1\n{JANE_TRIM_LOWER_HEX},seg-1\n"),
])
def test_profile_headers_hashes_and_names_byte_exact(root: Path, dest: Path, profile: str, expected_name: str,
                                                     expected_bytes: str) -> None:
    raw = {"destination_uri": f"file://{dest}", "partner_profile": profile}
    ctx = build_context("feed-1", {}, raw)
    assert ctx.props is not None and ctx.rules is not None
    ex = ctx.rules.extract([{"type": "USER_EMAIL", "email": " MyEmail@example.com", "hash": "ab" * 32},
                            {"type": "USER_EMAIL", "email": "Jane.Saoirse+Work@gmail.com"},
                            {"type": "USER_EMAIL", "hash": "cd" * 32},  # no clear address: rejected
                            {"type": "USER_ACCOUNT", "user_account_id": "u1", "compartment_id": 1}], 5, "s", "1509")
    assert ex.rejected == 1 and len(ex.rows) == 2
    stage_segment(root, P, "w1-000001.jnl", ex.rows)
    with open_sink(ctx.props) as sink:
        out = roll_partition(root, P, ctx.props, sink, now=NOW)
    (name,) = out.files
    assert re.fullmatch(expected_name, name), name
    assert len(name) <= 250 and name.isascii()
    data = destination_files(dest)[name]
    assert (gzip.decompress(data) if name.endswith(".gz") else data) == expected_bytes.encode()


# -- done markers, manifest prefix -----------------------------------------------------------------------------------


class WatchingSink(LocalSink):
    """A local sink that, when a `_SUCCESS` arrives, records which data files the destination already shows."""

    def __init__(self, props, dest: Path):
        super().__init__(props)
        self.dest = dest
        self.seen_at_marker: list[set[str]] = []

    def publish(self, local_path, name):
        if name.endswith("/_SUCCESS"):
            self.seen_at_marker.append({p.relative_to(self.dest).as_posix() for p in self.dest.rglob("*.csv.gz")})
        return super().publish(local_path, name)


def test_success_file_after_every_file_of_the_roll(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(3000))
    props = parse_feed_properties({"destination_uri": f"file://{dest}", "done_marker": "success_file",
                                   "max_rows_per_file": 1000,
                                   "file_name_template": "{segment_id}/{batch_id}/part{part}.{ext}"})
    sink = WatchingSink(props, dest)
    out = roll_partition(root, P, props, sink, now=NOW)
    folder = out.files[0].rpartition("/")[0]
    files = destination_files(dest)
    assert sorted(files) == sorted([*out.files, f"{folder}/_SUCCESS"]) and files[f"{folder}/_SUCCESS"] == b""
    assert sink.seen_at_marker == [set(out.files)]  # observed at the destination: every file before the marker


def test_no_marker_and_manifest_prefix(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(10))
    out, files = roll(root, dest, done_marker="none")
    assert list(files) == list(out.files)
    stage_segment(root, P, "w1-000002.jnl", make_rows(10, 10))
    props = parse_feed_properties({"destination_uri": f"file://{dest}", "manifest_prefix": "/_manifests/"})
    with open_sink(props) as sink:
        out2 = roll_partition(root, P, props, sink, now=NOW.replace(hour=13))
    manifests = [k for k in destination_files(dest) if k.endswith(".manifest.json")]
    assert manifests == [f"_manifests/seg-1/{out2.roll_ids[0]}.manifest.json"]
    assert json.loads(destination_files(dest)[manifests[0]])["files"][0]["name"] == out2.files[0]


# -- size caps, CSV dialect ------------------------------------------------------------------------------------------


def _batches(rows, size):
    table = pa.Table.from_pylist([dict(zip(STAGED_SCHEMA.names, r, strict=True)) for r in rows], schema=STAGED_SCHEMA)
    return table.to_batches(max_chunksize=size)


def test_max_file_bytes_split_exact_and_deterministic(tmp_path: Path) -> None:
    rows = make_rows(5000)
    rows[7] = ("USER_EMAIL", 'a,"b"', *rows[7][2:])  # a quoted value counts with its quotes
    props = parse_feed_properties({"destination_uri": "file:///tmp/x", "max_file_bytes": 100_000,
                                   "compression": "none"})
    spec = EncodeSpec.from_props(props)
    constants = {"feed_id": "f", "segment_id": "s", "operation": "UPSERT"}
    outputs = []
    for i, size in enumerate((64, 1000, 5000)):
        out = tmp_path / f"o{i}"
        out.mkdir()
        files = encode_batches(_batches(rows, size), spec, constants, out)
        outputs.append([(f.name, (out / f.name).read_bytes()) for f in files])
    assert outputs[0] == outputs[1] == outputs[2]  # same rows, other batching: the same names and bytes
    sizes = [len(data) for _, data in outputs[0]]
    assert len(sizes) > 1 and max(sizes) <= 100_000 and min(sizes[:-1]) > 100_000 - 200
    got = [r for _, data in outputs[0] for r in csv_rows(data)]
    assert len(got) == 5000 and got[7]["identifier"] == 'a,"b"'
    # the split measure is the bytes the files really hold
    projected = _batches(rows, 5000)[0].select(["identifier_type"])
    assert pc.sum(row_bytes(projected)).as_py() == 5000 * (len("USER_EMAIL") + 1)
    assert header_bytes(spec) == len("segment_id,operation,identifier_type,identifier,ts\n")


def test_max_file_bytes_through_a_roll_and_oversized_row(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(400))
    out, files = roll(root, dest, max_file_bytes=10_000, columns="identifier", compression="gzip")
    clear = [gzip.decompress(files[n]) for n in out.files]
    assert all(len(c) <= 10_000 for c in clear) and sum(c.count(b"\n") - 1 for c in clear) == 400
    # a single row bigger than the cap goes alone in its file instead of blocking the roll
    spec = EncodeSpec("csv", "none", parse_feed_properties({"destination_uri": "file:///x", "columns": "identifier"}
                                                           ).column_list, 100, max_file_bytes=1024)
    big = [("USER_EMAIL", "x" * 2000, 1, "s", "d", "u"), ("USER_EMAIL", "y", 1, "s", "d", "u")]
    out_dir = root / "big"
    out_dir.mkdir(parents=True)
    encoded = encode_batches(_batches(big, 10), spec, {}, out_dir)
    assert [f.rows for f in encoded] == [1, 1]


@pytest.mark.parametrize(("delimiter", "raw"), [("\t", "\\t"), ("|", "|"), (";", ";")])
def test_csv_delimiter_and_no_header(root: Path, dest: Path, delimiter: str, raw: str) -> None:
    rows = make_rows(3)
    rows[1] = ("USER_EMAIL", f"a{delimiter}b" if delimiter != "\t" else "a b", *rows[1][2:])
    stage_segment(root, P, "w1-000001.jnl", rows)
    out, files = roll(root, dest, csv_delimiter=raw, compression="none", columns="identifier,ts")
    text = files[out.files[0]].decode()
    assert text.splitlines()[0] == f"identifier{delimiter}ts"
    if delimiter != "\t":
        assert f'"a{delimiter}b"{delimiter}' in text
    assert [r["identifier"] for r in csv_rows(text.encode(), delimiter)] == [r[1] for r in rows]
    manifest = json.loads(next(v for k, v in files.items() if k.endswith(".manifest.json")))
    assert manifest["csv"] == {"delimiter": delimiter, "header": True}


def test_csv_without_header(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(40_000))  # more than one encode chunk
    out, files = roll(root, dest, csv_header=False, compression="none", columns="identifier")
    text = files[out.files[0]].decode()
    assert text.splitlines() == [f"{i:064x}" for i in range(40_000)]


# -- crash and resume ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crash_at", ["encode_file:2", "encode", "publish:1", "manifest"])
def test_pgp_and_size_cap_roll_resumed_after_kill_publishes_recorded_bytes_once(
    root: Path, dest: Path, pgp_keys: PgpKeys, crash_at: str
) -> None:
    repo = Path(__file__).resolve().parents[2]
    stage_segment(root, P, "w1-000001.jnl", make_rows(2500))
    extra = json.dumps({"encryption": "pgp", "pgp_public_key": pgp_keys.good, "max_file_bytes": 60_000})

    def child(crash: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV} | {"PYTHONPATH": str(repo)}
        if crash:
            env[CRASH_ENV] = crash
        return subprocess.run([sys.executable, "-m", "tests.rollover.crash_child", str(root), str(dest),
                               NOW.isoformat(), "csv", "gzip", "1000000", extra], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)

    assert child(crash_at).returncode == 137
    before = destination_files(dest)
    done = child(None)
    assert done.returncode == 0, done.stderr
    files = destination_files(dest)
    assert all(files[name] == data for name, data in before.items())  # nothing published was rewritten
    (entry,) = last_deliveries(root, P)
    assert [f["name"] for f in entry.files] == sorted(n for n in files if n.endswith(".gpg"))
    lines = []
    for f in entry.files:
        assert hashlib.sha256(files[f["name"]]).hexdigest() == f["sha256"]
        clear = gzip.decompress(pgp_keys.decrypt(files[f["name"]]))
        assert len(clear) <= 60_000
        lines += clear.decode().splitlines()[1:]
    assert [line.split(",")[3] for line in lines] == [f"{i:064x}" for i in range(2500)]


def test_roll_whose_key_was_revoked_fails_naming_it_then_retry_uses_the_new_key(root: Path, dest: Path,
                                                                               pgp_keys: PgpKeys) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(50))
    props = parse_feed_properties({"destination_uri": f"file://{dest}", "encryption": "pgp",
                                   "pgp_public_key": pgp_keys.second})
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV} | {
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]), CRASH_ENV: "moves"}
    extra = json.dumps({"encryption": "pgp", "pgp_public_key": pgp_keys.second})
    done = subprocess.run([sys.executable, "-m", "tests.rollover.crash_child", str(root), str(dest), NOW.isoformat(),
                           "csv", "gzip", "1000000", extra], env=env, capture_output=True, timeout=120)
    assert done.returncode == 137
    (roll_id,) = pending_rolls(root, P)
    # the key of the plan was revoked since (the partner's revoked key text, as a feed would get it)
    plan_path = root / P.relpath / "rolling" / roll_id / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["pgp_public_key"] = pgp_keys.revoked
    plan_path.write_text(json.dumps(plan))
    with open_sink(props) as sink:
        out = roll_partition(root, P, props, sink, now=NOW)
    assert out.status == "terminal" and out.error_kind == "encryption"
    assert pgp_keys.fingerprints["revoked"] in (out.error or "")
    assert failed_rolls(root, P) == [roll_id] and destination_files(dest) == {}
    with open_sink(props) as sink:
        again = retry_failed(root, P, sink, props=props)
    assert again.status == "published", again.error
    (name,) = again.files
    clear = gzip.decompress(pgp_keys.decrypt(destination_files(dest)[name]))
    assert len(clear.splitlines()) == 51
