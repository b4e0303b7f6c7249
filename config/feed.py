"""Feed properties: what a user types in the feed form, validated once at creation.

One pydantic model (`FeedProperties`) holds every property under the platform's technical name. `parse_feed_properties`
turns raw values (platform PluginProperty list or an embedded TOML table) into it and reports *every* problem in one
`FeedConfigError`, naming properties and never echoing a value (a value may be a secret).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from config.problems import did_you_mean
from config.profiles import apply_profile

SCHEMES = ("file", "s3", "gs", "sftp")

# Column sources a partner template can pick (README, "Feed properties": `columns`).
COLUMN_SOURCES = (
    "segment_id",
    "operation",
    "identifier_type",
    "identifier",
    "ts",
    "feed_id",
    "datamart_id",
    "session_id",
    "user_point_id",
    "blank",  # an always-empty column a partner's template asks for (e.g. Google's Phone when only emails go out)
)
DEFAULT_COLUMNS = "segment_id,operation,identifier_type,identifier,ts"

TEMPLATE_MACROS = frozenset(
    {"feed_id", "segment_id", "datamart_id", "operation", "date", "time", "batch_id", "part", "ext", "format", "mode"}
)
# Sorts by time inside a segment's folder; every macro that makes a roll unique is present.
DEFAULT_FILE_NAME_TEMPLATE = "{segment_id}/{date}T{time}Z_{operation}_{batch_id}_part{part}.{ext}"

IDENTIFIER_TYPES = ("USER_EMAIL", "USER_ACCOUNT", "USER_DEVICE_TECHNICAL_ID", "USER_AGENT", "USER_POINT")

COMPRESSIONS: dict[str, tuple[str, ...]] = {"csv": ("gzip", "zstd", "none"), "parquet": ("snappy", "zstd", "none")}
DEFAULT_COMPRESSION = {"csv": "gzip", "parquet": "snappy"}

# csv_delimiter values; a tab may arrive as a real tab, `\t` or `tab` (a form field cannot hold a tab easily)
CSV_DELIMITERS = {",": ",", "\t": "\t", "\\t": "\t", "tab": "\t", "|": "|", ";": ";"}
SUCCESS_FILE_NAME = "_SUCCESS"

SECRET_PROPERTIES = frozenset(
    {"aws_secret_access_key", "sftp_password", "sftp_private_key", "gcs_service_account_json"}
)


class FeedConfigError(ValueError):
    """Every problem found in a feed's properties, one message per problem, no values echoed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Destination:
    """A parsed `destination_uri`."""

    scheme: str
    host: str  # bucket for s3/gs, host for sftp, "" for file
    path: str  # prefix (no leading/trailing slash) for s3/gs; absolute path for file/sftp
    user: str = ""
    port: int = 0
    uri: str = ""

    def __str__(self) -> str:  # the URI never carries a secret: passwords in sftp URIs are refused
        return self.uri


@dataclass(frozen=True)
class Column:
    source: str
    header: str


@dataclass(frozen=True)
class IdentifierSelector:
    """One eligible identifier kind: `USER_ACCOUNT:7` (compartment), `USER_DEVICE_TECHNICAL_ID:MOBILE_ADVERTISING_ID`."""

    type: str
    qualifier: str | None = None  # compartment_id for USER_ACCOUNT, registry_type for USER_DEVICE_TECHNICAL_ID


def parse_destination(uri: str) -> Destination:
    """Parse and check a destination URI; raises ValueError with a message a marketer can act on."""
    parts = urlsplit(uri.strip())
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            "must start with s3://, gs://, sftp:// or file:// (e.g. s3://bucket/prefix, sftp://user@host:22/path)"
        )
    if parts.query or parts.fragment:
        raise ValueError("must not contain '?' or '#'")
    path = unquote(parts.path)
    if "\x00" in path or any(seg == ".." for seg in path.split("/")):
        raise ValueError("must not contain '..' or NUL characters")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError("file:// takes an absolute local path: file:///absolute/path")
        if not path.startswith("/"):
            raise ValueError("file:// takes an absolute local path: file:///absolute/path")
        return Destination("file", "", path.rstrip("/") or "/", uri=uri)
    if scheme in ("s3", "gs"):
        bucket = parts.netloc
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]", bucket or ""):
            raise ValueError(f"{scheme}:// needs a valid bucket name: {scheme}://bucket/prefix")
        return Destination(scheme, bucket, path.strip("/"), uri=uri)
    # sftp
    if parts.password is not None:
        raise ValueError("must not carry a password: use the sftp_password or sftp_private_key property")
    if not parts.username or not parts.hostname:
        raise ValueError("sftp:// needs a user and a host: sftp://user@host:22/path")
    try:
        port = parts.port or 22
    except ValueError:
        raise ValueError("sftp:// port must be a number between 1 and 65535") from None
    return Destination("sftp", parts.hostname, path.rstrip("/") or "/", user=unquote(parts.username), port=port, uri=uri)


def parse_columns(spec: str) -> tuple[Column, ...]:
    cols: list[Column] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        source, _, header = item.partition("=")
        source, header = source.strip(), (header.strip() or source.strip())
        if source not in COLUMN_SOURCES:
            raise ValueError(f"unknown column source '{source}' (known: {', '.join(COLUMN_SOURCES)})")
        if not re.fullmatch(r"[^\x00-\x1f,\"]{1,128}", header):
            raise ValueError(f"column header for '{source}' must be 1-128 printable characters without comma or quote")
        cols.append(Column(source, header))
    if not cols:
        raise ValueError("must name at least one column")
    if len({c.header for c in cols}) != len(cols):
        raise ValueError("column headers must be unique")
    return tuple(cols)


def parse_identifier_types(spec: str) -> tuple[IdentifierSelector, ...]:
    out: list[IdentifierSelector] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        type_, _, qualifier = item.partition(":")
        type_ = type_.strip().upper()
        if type_ not in IDENTIFIER_TYPES:
            raise ValueError(f"unknown identifier type '{type_}' (known: {', '.join(IDENTIFIER_TYPES)})")
        out.append(IdentifierSelector(type_, qualifier.strip() or None))
    if not out:
        raise ValueError("must name at least one identifier type")
    return tuple(out)


def check_template(template: str) -> str:
    if template.startswith("/") or "\\" in template or "\x00" in template:
        raise ValueError("must be a relative name (no leading '/', no backslash)")
    if any(seg in ("..", ".") for seg in template.split("/")):
        raise ValueError("must not contain '..' or '.' path segments")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"is not a valid template: {e}") from None
    unknown = sorted({f for f in fields if f not in TEMPLATE_MACROS})
    if unknown:
        raise ValueError(f"unknown macro(s) {', '.join('{' + u + '}' for u in unknown)}; known: "
                         + ", ".join("{" + m + "}" for m in sorted(TEMPLATE_MACROS)))
    if "batch_id" not in fields:
        raise ValueError("must contain {batch_id} so that two rolls never write the same name")
    if "part" not in fields:
        raise ValueError("must contain {part} so that split files never share a name")
    return template


def check_cron(expression: str) -> str:
    """A five-field cron expression (minute hour day month weekday), read in UTC; cronsim says what is wrong."""
    expression = " ".join(expression.split())
    if len(expression.split(" ")) != 5:
        raise ValueError("must be a cron expression of 5 fields in UTC, e.g. '0 2 * * *' (every day at 02:00 UTC)")
    try:
        CronSim(expression, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as e:
        raise ValueError(f"is not a valid cron expression ({e}); e.g. '0 2 * * *' (every day at 02:00 UTC)") from None
    return expression


class FeedProperties(BaseModel):
    """Every feed property, by the platform's technical name."""

    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)

    destination_uri: str
    file_format: Literal["csv", "parquet"] = "csv"
    compression: str | None = None  # resolved per format by the model validator
    file_name_template: str = DEFAULT_FILE_NAME_TEMPLATE
    columns: str = DEFAULT_COLUMNS
    max_rows_per_file: int = Field(default=1_000_000, ge=1, le=100_000_000)
    max_buffer_age_seconds: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    write_manifest: bool = True
    identifier_types: str | None = None
    # pipeline/snapshot.py and pipeline/schedule.py: what each delivery holds, and when deliveries happen
    delivery_mode: Literal["delta", "snapshot"] = "delta"
    delivery_schedule: str | None = None

    # file shape (README "Feed properties"): presets, identifier transforms, encryption, markers, caps, CSV dialect
    partner_profile: Literal["liveramp", "google_customer_match", "meta", "ttd_uid2"] | None = None
    email_hashing: Literal["platform", "sha256_hex", "sha256_base64", "md5_hex", "sha1_hex"] = "platform"
    email_normalization: Literal["trim_lower", "uid2"] = "trim_lower"
    encryption: Literal["none", "pgp"] = "none"
    pgp_public_key: str | None = None
    done_marker: Literal["manifest", "success_file", "none"] | None = None  # None: from write_manifest
    manifest_prefix: str | None = None
    max_file_bytes: int | None = Field(default=None, ge=1024, le=1 << 40)
    csv_delimiter: str = ","
    csv_header: bool = True

    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    s3_sse: Literal["AES256", "aws:kms"] | None = None
    s3_kms_key_id: str | None = None

    sftp_password: SecretStr | None = None
    sftp_private_key: SecretStr | None = None
    sftp_host_key: str | None = None

    gcs_endpoint_url: str | None = None
    gcs_service_account_json: SecretStr | None = None
    gcs_project: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _profile(cls, data: Any) -> Any:
        return apply_profile(data) if isinstance(data, dict) else data

    @field_validator("partner_profile", "email_hashing", "email_normalization", "encryption", "done_marker",
                     mode="before")
    @classmethod
    def _lower_choice(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("csv_delimiter", mode="before")
    @classmethod
    def _delimiter(cls, v: Any) -> Any:
        if isinstance(v, str) and (v if v == "\t" else v.strip().lower()) in CSV_DELIMITERS:
            return CSV_DELIMITERS[v if v == "\t" else v.strip().lower()]
        raise ValueError("must be one of ',', '\\t' (tab), '|', ';'")

    @field_validator("pgp_public_key")
    @classmethod
    def _pgp_key(cls, v: str | None) -> str | None:
        # A field validator (not the cross-checks) so that key problems are listed even when another field fails.
        if v is None or not v.strip():
            return None
        from pipeline.pgp import inspect_keys  # gpg runs only for feeds that give a key

        report = inspect_keys(v.strip())
        if report.problems:
            raise ValueError("; ".join(report.problems))
        return v.strip()

    @field_validator("manifest_prefix")
    @classmethod
    def _manifest_prefix(cls, v: str | None) -> str | None:
        if v is None or not v.strip("/ "):
            return None
        v = v.strip().strip("/")
        if "{" in v or "}" in v:
            raise ValueError("is a plain folder (no macros): manifests keep their folder below it")
        if "\\" in v or "\x00" in v or any(seg in ("", ".", "..") or seg.startswith(".") for seg in v.split("/")):
            raise ValueError("must be a relative folder without '..', empty or dot-prefixed segments")
        return v

    @field_validator("delivery_schedule")
    @classmethod
    def _schedule(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        return check_cron(v)

    @field_validator("file_format", "compression", "s3_sse", "delivery_mode", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            return v if v in ("AES256", "aws:kms") else v.lower()
        return v

    @field_validator("destination_uri")
    @classmethod
    def _destination(cls, v: str) -> str:
        parse_destination(v)
        return v.strip()

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: str) -> str:
        parse_columns(v)
        return v

    @field_validator("identifier_types")
    @classmethod
    def _identifier_types(cls, v: str | None) -> str | None:
        if v is not None and v.strip():
            parse_identifier_types(v)
            return v
        return None

    @field_validator("file_name_template")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_template(v)

    @field_validator("s3_endpoint_url", "gcs_endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if not re.match(r"^https?://[^/\s]+", v.strip()):
            raise ValueError("must be an http:// or https:// URL")
        return v.strip().rstrip("/")

    @model_validator(mode="after")
    def _cross_checks(self) -> FeedProperties:
        problems: list[str] = []
        allowed = COMPRESSIONS[self.file_format]
        if self.compression is None:
            object.__setattr__(self, "compression", DEFAULT_COMPRESSION[self.file_format])
        elif self.compression not in allowed:
            problems.append(
                f"compression: '{self.compression}' is not valid for {self.file_format} (use one of {', '.join(allowed)})"
            )
        dest = parse_destination(self.destination_uri)
        if dest.scheme == "sftp":
            if self.sftp_password is None and self.sftp_private_key is None:
                problems.append("sftp_password or sftp_private_key: one is required for an sftp:// destination")
        if dest.scheme == "s3":
            if bool(self.aws_access_key_id) != bool(self.aws_secret_access_key):
                problems.append("aws_access_key_id and aws_secret_access_key: give both or neither")
            if self.s3_kms_key_id and self.s3_sse != "aws:kms":
                problems.append("s3_kms_key_id: only valid with s3_sse = aws:kms")
        problems.extend(self._file_shape_problems())
        if problems:
            raise ValueError(" | ".join(problems))
        return self

    def _file_shape_problems(self) -> list[str]:
        problems: list[str] = []
        if self.encryption == "pgp":
            if not self.pgp_public_key:
                problems.append("pgp_public_key: is required with encryption = pgp")
        elif self.pgp_public_key:
            problems.append("pgp_public_key: only valid with encryption = pgp")
        if self.done_marker is None:
            object.__setattr__(self, "done_marker", "manifest" if self.write_manifest else "none")
        elif self.done_marker == "manifest" and not self.write_manifest:
            problems.append("done_marker: 'manifest' contradicts write_manifest = false (drop one of them)")
        if self.manifest_prefix and self.done_marker != "manifest":
            problems.append("manifest_prefix: only valid with done_marker = manifest")
        if self.done_marker == "success_file" and "{batch_id}" not in self.file_name_template.rpartition("/")[0]:
            problems.append("done_marker: success_file needs a folder per roll: put {batch_id} in a folder of "
                            "file_name_template (e.g. {segment_id}/{batch_id}/part{part}.{ext})")
        if self.file_format == "parquet" and (self.csv_delimiter != "," or not self.csv_header):
            problems.append("csv_delimiter, csv_header: only valid with file_format = csv")
        if self.csv_delimiter != ",":
            try:
                clashing = [c.header for c in parse_columns(self.columns) if self.csv_delimiter in c.header]
            except ValueError:
                clashing = []  # reported by the columns validator
            if clashing:
                problems.append(f"columns: header(s) {', '.join(clashing)} contain the csv_delimiter")
        return problems

    # -- derived views, cheap and cached by callers -------------------------------------------------------------
    @property
    def destination(self) -> Destination:
        return parse_destination(self.destination_uri)

    @property
    def column_list(self) -> tuple[Column, ...]:
        return parse_columns(self.columns)

    @property
    def extension(self) -> str:
        if self.file_format == "parquet":
            base = "parquet"
        else:
            base = {"gzip": "csv.gz", "zstd": "csv.zst", "none": "csv"}[self.compression or "gzip"]
        return f"{base}.gpg" if self.encryption == "pgp" else base

    def identifier_selectors(self, selected_identifying_resources: list[dict] | None) -> tuple[IdentifierSelector, ...]:
        """The `identifier_types` property wins; else the feed's selected identifying resources; else all types."""
        if self.identifier_types:
            return parse_identifier_types(self.identifier_types)
        out: list[IdentifierSelector] = []
        for res in selected_identifying_resources or []:
            t = str(res.get("type", "")).upper()
            if t == "USER_ACCOUNT":
                q = res.get("compartment_id")
                out.append(IdentifierSelector(t, str(q) if q not in (None, "") else None))
            elif t == "USER_DEVICE_TECHNICAL_ID":
                q = res.get("registry_type")
                out.append(IdentifierSelector(t, str(q) if q else None))
            elif t in IDENTIFIER_TYPES:
                out.append(IdentifierSelector(t))
            # USER_PROFILE and unknown types carry no identifier we deliver: ignored
        if not out:
            out = [IdentifierSelector(t) for t in IDENTIFIER_TYPES]
        return tuple(out)


def _format_errors(e: ValidationError) -> list[str]:
    problems: list[str] = []
    for err in e.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ())) or "properties"
        msg = str(err.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err.get("type") == "missing":
            msg = "is required"
        if loc == "properties" and " | " in msg:
            problems.extend(msg.split(" | "))
        else:
            problems.append(f"{loc}: {msg}")
    return problems


def property_values(platform_properties: list[dict]) -> dict[str, Any]:
    """Flatten the platform's PluginProperty list into {technical_name: value}."""
    out: dict[str, Any] = {}
    for prop in platform_properties or []:
        name = prop.get("technical_name")
        value = prop.get("value") or {}
        if not name or not isinstance(value, dict):
            continue
        if "value" in value:
            v = value["value"]
        elif "url" in value:
            v = value["url"]
        else:
            continue
        if v is None or (isinstance(v, str) and v == ""):
            continue
        out[name] = v
    return out


def unknown_properties(raw: dict[str, Any]) -> list[str]:
    """One line per name in `raw` that is no feed property (a typo, or a property of another plugin version), with
    the closest known name. Known names are the model's fields, whoever added them."""
    known = FeedProperties.model_fields
    return [f"{name}: unknown property{did_you_mean(name, known)}" for name in sorted(raw) if name not in known]


def parse_feed_properties(raw: dict[str, Any], *, strict: bool = False) -> FeedProperties:
    """Validate raw property values; raise FeedConfigError listing every problem at once. `strict`: an unknown
    property is one of them (a file the operator typed); else it is ignored (the platform may send properties of
    other plugin versions: callers warn with `unknown_properties`)."""
    problems = unknown_properties(raw) if strict else []
    try:
        props = FeedProperties.model_validate(raw)
    except ValidationError as e:
        raise FeedConfigError(problems + _format_errors(e)) from None
    if problems:
        raise FeedConfigError(problems)
    return props
