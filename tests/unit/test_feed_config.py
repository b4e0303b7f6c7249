from __future__ import annotations

import pytest

from config.feed import FeedConfigError, parse_destination, parse_feed_properties, property_values


def test_defaults():
    p = parse_feed_properties({"destination_uri": "s3://bucket-a/some/prefix"})
    assert (p.file_format, p.compression, p.max_rows_per_file, p.max_buffer_age_seconds, p.write_manifest) == (
        "csv", "gzip", 1_000_000, 3600, True)
    assert p.extension == "csv.gz"
    assert [c.header for c in p.column_list] == ["segment_id", "operation", "identifier_type", "identifier", "ts"]
    assert parse_feed_properties({"destination_uri": "gs://b-1/x", "file_format": "PARQUET"}).compression == "snappy"


@pytest.mark.parametrize(
    ("uri", "scheme", "host", "path", "port"),
    [("s3://bucket/prefix/", "s3", "bucket", "prefix", 0), ("gs://my.bucket/a/b", "gs", "my.bucket", "a/b", 0),
     ("sftp://u@example.org/upload", "sftp", "example.org", "/upload", 22),
     ("sftp://u@127.0.0.1:2222/in", "sftp", "127.0.0.1", "/in", 2222), ("file:///srv/out", "file", "", "/srv/out", 0)],
)
def test_destinations(uri, scheme, host, path, port):
    d = parse_destination(uri)
    assert (d.scheme, d.host, d.path, d.port) == (scheme, host, path, port)


@pytest.mark.parametrize("uri", ["http://x/y", "s3://", "file://relative/x", "sftp://host/x", "s3://b/../x",
                                 "sftp://u:pw@h/x", "ftp://h/x", "file:///a/../b"])
def test_bad_destinations(uri):
    with pytest.raises(ValueError):
        parse_destination(uri)


def test_every_problem_reported_together_without_values():
    with pytest.raises(FeedConfigError) as e:
        parse_feed_properties({"destination_uri": "ftp://x", "file_format": "xml", "max_rows_per_file": "-3",
                               "columns": "nope", "file_name_template": "../{zz}", "aws_secret_access_key": "S3CR3T"})
    names = " ".join(e.value.problems)
    for prop in ("destination_uri", "file_format", "max_rows_per_file", "columns", "file_name_template"):
        assert prop in names
    assert "S3CR3T" not in str(e.value)


def test_cross_field_problems():
    with pytest.raises(FeedConfigError) as e:
        parse_feed_properties({"destination_uri": "sftp://u@h/x", "file_format": "parquet", "compression": "gzip"})
    text = str(e.value)
    assert "compression" in text and "sftp_password or sftp_private_key" in text


def test_integers_as_strings_and_platform_properties():
    raw = property_values([
        {"technical_name": "destination_uri", "property_type": "STRING", "value": {"value": "file:///tmp/x"}},
        {"technical_name": "max_rows_per_file", "property_type": "STRING", "value": {"value": "500"}},
        {"technical_name": "write_manifest", "property_type": "BOOLEAN", "value": {"value": False}},
        {"technical_name": "empty", "property_type": "STRING", "value": {}},
    ])
    p = parse_feed_properties(raw)
    assert p.max_rows_per_file == 500 and p.write_manifest is False


@pytest.mark.parametrize("tpl", ["/abs/{batch_id}{part}", "{unknown}{batch_id}{part}", "a/../{batch_id}{part}",
                                 "{segment_id}.csv"])
def test_bad_templates(tpl):
    with pytest.raises(FeedConfigError):
        parse_feed_properties({"destination_uri": "file:///tmp/x", "file_name_template": tpl})


def test_columns_rename():
    p = parse_feed_properties({"destination_uri": "file:///tmp/x", "columns": "identifier=Email, ts"})
    assert [(c.source, c.header) for c in p.column_list] == [("identifier", "Email"), ("ts", "ts")]


def test_identifier_types_override_and_selected_resources():
    p = parse_feed_properties({"destination_uri": "file:///tmp/x"})
    sel = p.identifier_selectors([{"type": "USER_EMAIL"}, {"type": "USER_DEVICE_TECHNICAL_ID",
                                                            "registry_type": "MOBILE_ADVERTISING_ID"}])
    assert [(s.type, s.qualifier) for s in sel] == [("USER_EMAIL", None),
                                                     ("USER_DEVICE_TECHNICAL_ID", "MOBILE_ADVERTISING_ID")]
    p2 = parse_feed_properties({"destination_uri": "file:///tmp/x", "identifier_types": "user_account:7"})
    assert [(s.type, s.qualifier) for s in p2.identifier_selectors([{"type": "USER_EMAIL"}])] == [("USER_ACCOUNT", "7")]
