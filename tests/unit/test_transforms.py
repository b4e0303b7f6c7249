"""Email transforms against published test vectors, their call site in identifier extraction, and the new feed
properties' validation (every problem together, profiles as presets that explicit properties override)."""

from __future__ import annotations

import hashlib

import pytest

from config.feed import FeedConfigError, parse_feed_properties
from filefeed.context import build_context
from pipeline.transforms import MISSING_EMAIL, EmailTransform, uid2_normalize

# IAB Tech Lab, UID2 docs, "Normalization and Encoding" (getting-started/gs-normalization-encoding): original value,
# normalised value, SHA-256 hex, Base64 of the digest.
UID2_VECTORS = [
    ("MyEmail@example.com", "myemail@example.com",
     "16c18d336f0b250f0e2d907452ceb9658a74ecdae8bc94864c23122a72cc27a5", "FsGNM28LJQ8OLZB0Us65ZYp07NrovJSGTCMSKnLMJ6U="),
    ("MYEMAIL@example.com", "myemail@example.com",
     "16c18d336f0b250f0e2d907452ceb9658a74ecdae8bc94864c23122a72cc27a5", "FsGNM28LJQ8OLZB0Us65ZYp07NrovJSGTCMSKnLMJ6U="),
    ("My.Email@example.com", "my.email@example.com",
     "e22b53bc6f871274f3a62ab37a3caed7214fc14d676215a96a242fcfada1c81f", "4itTvG+HEnTzpiqzejyu1yFPwU1nYhWpaiQvz62hyB8="),
    ("JANESAOIRSE@example.com", "janesaoirse@example.com",
     "d6670e7a92007f1b5ff785f1fc81e53aa6d3d7bd06bdf5c473cdc7286c284b6d", "1mcOepIAfxtf94Xx/IHlOqbT170GvfXEc83HKGwoS20="),
    ("Jane.Saoirse@example.com", "jane.saoirse@example.com",
     "b196432c7b989a2ca91c83799957c515da53e6c13abf20b78fea94f117e90bf8", "sZZDLHuYmiypHIN5mVfFFdpT5sE6vyC3j+qU8RfpC/g="),
    ("JaneSaoirse+Work@example.com", "janesaoirse+work@example.com",
     "28aaee4815230cd3b4ebd88c515226550666e91ac019929e3adac3f66c288180", "KKruSBUjDNO069iMUVImVQZm6RrAGZKeOtrD9mwogYA="),
    ("JANE.SAOIRSE@gmail.com", "janesaoirse@gmail.com",
     "92ee26057ed9dea2535d6c8b141d48373932476599196e00352254896db5888f", "ku4mBX7Z3qJTXWyLFB1INzkyR2WZGW4ANSJUiW21iI8="),
    ("Jane.Saoirse@gmail.com", "janesaoirse@gmail.com",
     "92ee26057ed9dea2535d6c8b141d48373932476599196e00352254896db5888f", "ku4mBX7Z3qJTXWyLFB1INzkyR2WZGW4ANSJUiW21iI8="),
    ("JaneSaoirse+Work@gmail.com", "janesaoirse@gmail.com",
     "92ee26057ed9dea2535d6c8b141d48373932476599196e00352254896db5888f", "ku4mBX7Z3qJTXWyLFB1INzkyR2WZGW4ANSJUiW21iI8="),
    # the doc's example of a publisher that forgot to normalise
    (None, "JANESaoirse@gmail.com", None, "VpLXEp5N1bj/V1WzjgZsC+FfuYdntAOywSVIO00FD/E="),
]


@pytest.mark.parametrize(("original", "normalized", "hex_digest", "b64"), UID2_VECTORS)
def test_uid2_published_vectors(original, normalized, hex_digest, b64):
    if original is not None:
        assert uid2_normalize(original) == normalized
        assert EmailTransform("sha256_base64", "uid2")({"email": original}) == (b64, None)
        assert EmailTransform("sha256_hex", "uid2")({"email": original}) == (hex_digest, None)
    else:  # not normalised: hashing the raw bytes gives the doc's "wrong" value, so our digest path is the same
        assert EmailTransform("sha256_base64", "uid2")({"email": normalized})[0] != b64
        assert __import__("base64").b64encode(hashlib.sha256(normalized.encode()).digest()).decode() == b64


def test_other_hashings_and_trim_lower():
    t = {"email": "  Jane.Saoirse+Work@GMAIL.com "}
    clear = b"jane.saoirse+work@gmail.com"  # trim_lower keeps gmail dots and +suffix
    assert EmailTransform("md5_hex")(t) == (hashlib.md5(clear).hexdigest(), None)
    assert EmailTransform("sha1_hex")(t) == (hashlib.sha1(clear).hexdigest(), None)
    assert EmailTransform("sha256_hex")(t) == (hashlib.sha256(clear).hexdigest(), None)
    assert EmailTransform("sha256_base64")(t)[0].endswith("=") and len(EmailTransform("sha256_base64")(t)[0]) == 44


def test_identifier_without_clear_email_is_rejected_with_reason_never_guessed():
    ctx = build_context("42", {}, {"destination_uri": "file:///tmp/x", "email_hashing": "sha256_base64"})
    h = hashlib.sha256(b"myemail@example.com").hexdigest()
    ex = ctx.rules.extract([{"type": "USER_EMAIL", "hash": h}, {"type": "USER_EMAIL", "hash": h, "email": "x y@z"},
                            {"type": "USER_EMAIL", "email": "MyEmail@example.com"}], 1, "s", "1")
    assert [r[1] for r in ex.rows] == ["FsGNM28LJQ8OLZB0Us65ZYp07NrovJSGTCMSKnLMJ6U="]
    rejected = [s for s in ex.stats if s["sync_result"] == "REJECTED"]
    assert [dict((t["key"], t["value"]) for t in s["tags"])["reason"] for s in rejected] == [
        MISSING_EMAIL, "missing_or_malformed_email"]
    assert all("@" not in s["identifier"] for s in rejected)  # the clear address is never echoed
    # the platform default keeps today's rule: the hash as is
    plain = build_context("42", {}, {"destination_uri": "file:///tmp/x"})
    assert [r[1] for r in plain.rules.extract([{"type": "USER_EMAIL", "hash": h}], 1, "s", "1").rows] == [h]


def test_profiles_preset_and_explicit_properties_override():
    p = parse_feed_properties({"destination_uri": "file:///tmp/x", "partner_profile": "ttd_uid2"})
    assert (p.email_hashing, p.email_normalization, p.columns, p.identifier_types) == (
        "sha256_base64", "uid2", "identifier=email_hash", "USER_EMAIL")
    p = parse_feed_properties({"destination_uri": "file:///tmp/x", "partner_profile": "LiveRamp",
                               "max_file_bytes": "2048", "compression": "zstd", "email_hashing": "platform"})
    assert (p.max_file_bytes, p.compression, p.email_hashing, p.extension) == (2048, "zstd", "platform", "csv.zst")
    assert parse_feed_properties({"destination_uri": "file:///tmp/x", "partner_profile": "meta",
                                  "file_format": "parquet"}).compression == "snappy"


def test_new_properties_every_problem_together():
    with pytest.raises(FeedConfigError) as e:
        parse_feed_properties({
            "destination_uri": "file:///tmp/x", "partner_profile": "acme", "email_hashing": "sha512",
            "email_normalization": "nfc", "encryption": "rsa", "done_marker": "flag", "max_file_bytes": "10",
            "manifest_prefix": "../up",
        })
    text = " ".join(e.value.problems)
    for prop in ("partner_profile", "email_hashing", "email_normalization", "encryption", "done_marker",
                 "max_file_bytes", "manifest_prefix"):
        assert prop in text, prop
    with pytest.raises(FeedConfigError) as e:
        parse_feed_properties({"destination_uri": "file:///tmp/x", "encryption": "pgp", "done_marker": "success_file",
                               "manifest_prefix": "m", "columns": "identifier=a;b", "csv_delimiter": ";"})
    text = " ".join(e.value.problems)
    for needle in ("pgp_public_key: is required", "success_file needs a folder per roll",
                   "manifest_prefix: only valid with done_marker = manifest", "contain the csv_delimiter"):
        assert needle in text, needle
    with pytest.raises(FeedConfigError, match="csv_delimiter"):
        parse_feed_properties({"destination_uri": "file:///tmp/x", "csv_delimiter": ":"})


def test_delimiter_spellings_and_done_marker_from_write_manifest():
    for raw in ("\t", "\\t", "TAB"):
        assert parse_feed_properties({"destination_uri": "file:///tmp/x", "csv_delimiter": raw}).csv_delimiter == "\t"
    assert parse_feed_properties({"destination_uri": "file:///tmp/x", "write_manifest": False}).done_marker == "none"
    with pytest.raises(FeedConfigError, match="contradicts"):
        parse_feed_properties({"destination_uri": "file:///tmp/x", "write_manifest": False, "done_marker": "manifest"})
