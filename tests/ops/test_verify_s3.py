"""`filefeed verify` against a real S3 server (SeaweedFS): OK, then a deleted, a corrupted and an extra object."""

from __future__ import annotations

import json

import boto3
from botocore.config import Config

from tests.ops.helpers import FEED, cli, raw_props, send_batch, send_users


def test_verify_s3_missing_corrupt_extra(tmp_path, filefeed_factory, servers, unique_prefix):
    props = raw_props("s3", servers, unique_prefix, max_rows_per_file=10)
    srv = filefeed_factory(workers=2, feeds={FEED: props})
    items = send_users(srv, range(6))
    answer = send_batch(srv, items)
    assert answer["status"] == "OK" and answer["sent_items_in_success"] == len(items), answer

    p = cli(srv.env, "verify")
    assert p.returncode == 0, p.stdout + p.stderr
    ok = json.loads(cli(srv.env, "verify", "--json").stdout)
    assert ok["problems"] == [] and ok["checked"] >= 3  # >= 2 data files (10 rows each at most) + the manifest

    s3 = boto3.client("s3", endpoint_url=servers["S3_ENDPOINT"], aws_access_key_id=servers["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=servers["AWS_SECRET_ACCESS_KEY"],
                      region_name=servers.get("AWS_DEFAULT_REGION", "us-east-1"),
                      config=Config(s3={"addressing_style": "path"}))
    bucket = servers["S3_BUCKET"]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=unique_prefix + "/")["Contents"])
    data_keys = [k for k in keys if not k.endswith(".manifest.json")]
    assert len(data_keys) >= 2
    name = lambda key: key[len(unique_prefix) + 1:]  # noqa: E731 - names are relative to the destination prefix

    s3.delete_object(Bucket=bucket, Key=data_keys[0])
    p = cli(srv.env, "verify")
    assert p.returncode == 1 and name(data_keys[0]) in p.stdout and "missing" in p.stdout

    body = s3.get_object(Bucket=bucket, Key=data_keys[1])["Body"].read()
    s3.put_object(Bucket=bucket, Key=data_keys[1], Body=bytes([body[0] ^ 0xFF]) + body[1:])  # same size
    extra_key = data_keys[1].replace("_part00002", "_part00077")
    s3.put_object(Bucket=bucket, Key=extra_key, Body=b"not from filefeed")
    s3.put_object(Bucket=bucket, Key=f"{unique_prefix}/README.txt", Body=b"a partner's own file, not our naming")
    res = json.loads(cli(srv.env, "verify", "--json").stdout)
    found = {(x["problem"], x["name"]) for x in res["problems"]}
    assert found == {("missing", name(data_keys[0])), ("checksum mismatch", name(data_keys[1])),
                     ("extra", name(extra_key))}, res
    assert not res["ok"]
    shallow = json.loads(cli(srv.env, "verify", "--json", "--no-deep").stdout)
    assert {x["problem"] for x in shallow["problems"]} == {"missing", "extra"}  # sizes only: corruption unseen
