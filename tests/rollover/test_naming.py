"""File names rendered from the template: deterministic, safe, unique per part."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from config.feed import DEFAULT_FILE_NAME_TEMPLATE
from pipeline.model import Partition
from pipeline.naming import NameContext, UnsafeNameError, check_name, manifest_name, name_pattern, render_name
from pipeline.rollover import make_roll_id

PARTITION = Partition("feed-7", "seg-42", "DELETE")


def context(**overrides: object) -> NameContext:
    values: dict[str, object] = {
        "partition": PARTITION,
        "batch_id": "20240305T071809-abcdef0123",
        "planned_at": datetime(2024, 3, 5, 7, 18, 9, tzinfo=UTC),
        "extension": "csv.gz",
        "file_format": "csv",
        "datamart_id": "1509",
    }
    values.update(overrides)
    return NameContext(**values)  # type: ignore[arg-type]


def test_default_template() -> None:
    assert render_name(DEFAULT_FILE_NAME_TEMPLATE, context(), 1) == (
        "seg-42/20240305T071809Z_DELETE_20240305T071809-abcdef0123_part00001.csv.gz"
    )


def test_every_macro() -> None:
    template = "{feed_id}/{datamart_id}/{segment_id}-{operation}-{date}-{time}-{batch_id}-{part}.{format}.{ext}"
    assert render_name(template, context(), 12) == (
        "feed-7/1509/seg-42-DELETE-20240305-071809-20240305T071809-abcdef0123-00012.csv.csv.gz"
    )


def test_planned_time_is_rendered_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    ctx = context(planned_at=datetime(2024, 3, 5, 8, 18, 9, tzinfo=paris))
    assert render_name("{date}{time}_{batch_id}_{part}", ctx, 1).startswith("20240305071809_")


def test_parts_differ_and_rendering_repeats() -> None:
    names = [render_name(DEFAULT_FILE_NAME_TEMPLATE, context(), p) for p in (1, 2, 3)]
    assert len(set(names)) == 3
    assert names == [render_name(DEFAULT_FILE_NAME_TEMPLATE, context(), p) for p in (1, 2, 3)]


def test_datamart_id_from_row_data_cannot_escape() -> None:
    name = render_name("{datamart_id}/{batch_id}_{part}.csv", context(datamart_id="../../etc"), 1)
    assert ".." not in name.split("/")
    assert name.startswith("_.._etc/") or name.startswith("_")
    assert render_name("{datamart_id}_{batch_id}_{part}", context(datamart_id=""), 1).startswith("unknown_")


@pytest.mark.parametrize(
    "bad",
    [
        "/abs/x.csv",
        "a/../b.csv",
        "a//b.csv",
        ".hidden.csv",
        "dir/.tmp",
        "nul\x00.csv",
        "back\\slash",
        "tab\tname",
        "",
        "x" * 1025,
    ],
)
def test_unsafe_results_are_refused(bad: str) -> None:
    with pytest.raises(UnsafeNameError):
        check_name(bad)


def test_unsafe_template_is_refused_at_render() -> None:
    with pytest.raises(UnsafeNameError):
        render_name("/{batch_id}_{part}", context(), 1)
    with pytest.raises(UnsafeNameError):
        render_name("{nope}_{batch_id}_{part}", context(), 1)


def test_manifest_name_sits_beside_the_files() -> None:
    files = [render_name(DEFAULT_FILE_NAME_TEMPLATE, context(), p) for p in (1, 2)]
    assert manifest_name(files, "20240305T071809-abcdef0123") == "seg-42/20240305T071809-abcdef0123.manifest.json"
    assert manifest_name(["top.csv"], "b1") == "b1.manifest.json"


def test_roll_id_is_time_sortable_and_partition_specific() -> None:
    at = datetime(2024, 1, 2, 3, 4, 5, 123999, tzinfo=UTC)
    rid = make_roll_id(PARTITION, ["w1-1.jnl", "w2-1.jnl"], at)
    assert rid.startswith("20240102T030405123-") and len(rid) == len("20240102T030405123-") + 10
    # within one second, ids sort by time whatever their hashes; an id of an earlier release sorts first
    later = make_roll_id(PARTITION, ["w9-1.jnl"], at.replace(microsecond=124000))
    assert rid < later and "20240102T030405-ffffffffff" < rid
    assert rid == make_roll_id(PARTITION, ["w1-1.jnl", "w2-1.jnl"], at)
    assert rid != make_roll_id(Partition("feed-7", "seg-42", "UPSERT"), ["w1-1.jnl", "w2-1.jnl"], at)
    assert rid != make_roll_id(PARTITION, ["w1-1.jnl"], at)


def test_verify_recognises_roll_ids_of_this_and_earlier_releases() -> None:
    pattern = name_pattern(DEFAULT_FILE_NAME_TEMPLATE, {"segment_id": ["seg-42"]})
    for batch_id in ("20240305T071809123-abcdef0123", "20240305T071809-abcdef0123"):
        name = f"seg-42/20240305T071809Z_UPSERT_{batch_id}_part00001.csv.gz"
        assert pattern.fullmatch(name) and pattern.fullmatch(f"seg-42/{batch_id}.manifest.json")
    assert not pattern.fullmatch("seg-42/20240305T0718091-abcdef0123.manifest.json")
