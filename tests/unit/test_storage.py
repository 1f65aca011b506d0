"""Roots on object storage, checked offline: the settings refuse a URI fleet cannot open with a message that says
why, sub-folders keep a URI's query, and audit files (appended) stay on a local disk. The S3 round trips themselves
run against a real S3-compatible server in tests/integration/test_s3_*.py."""

from __future__ import annotations

import json
import logging

import pytest

from cluster.config import FleetSettings
from serving.monitoring.alerts import AuditLog, audit_dir_for, audit_folder
from serving.monitoring.predlog import traffic_dir
from serving.storage import check_root, join_uri, list_files, locate, write_whole
from training.data import data_dir
from training.retrain import storage_path
from training.traffic import labels_folder

S3 = "s3://bucket/fleet/data?endpoint_override=127.0.0.1:9000&scheme=http"


@pytest.mark.parametrize("field", ["repository", "data_dir", "train_storage"])
@pytest.mark.parametrize("value, message", [
    ("ftp://host/x", "unknown scheme 'ftp'; use a local path or a URI of file://, s3://"),
    ("s3:///no-bucket", "name the bucket (s3://BUCKET/folder)"),
    ("s3://bucket/x?colour=blue", "Unexpected query parameter in S3 URI: 'colour'"),
])
def test_the_settings_refuse_a_uri_fleet_cannot_open_and_say_why(field, value, message):
    with pytest.raises(ValueError, match=field) as caught:
        FleetSettings(**{field: value})
    assert message in str(caught.value)


def test_the_settings_keep_an_object_store_uri_as_given_and_put_the_audit_files_under_state_dir(tmp_path):
    settings = FleetSettings(repository="s3://bucket/repo?region=eu-west-1", data_dir=S3,
                             state_dir=str(tmp_path / "state"), train_storage="s3://bucket/checkpoints")
    assert (settings.repository, settings.data_dir) == ("s3://bucket/repo?region=eu-west-1", S3)
    options = settings.serving_options()
    assert options.data_dir == S3 and options.audit_dir == str(tmp_path / "state" / "audit")
    local = FleetSettings(data_dir=str(tmp_path / "data"), state_dir=str(tmp_path / "state")).serving_options()
    assert local.audit_dir is None  # <data_dir>/audit, as before
    with pytest.raises(ValueError, match="state_dir must be a local folder"):
        FleetSettings(state_dir="s3://bucket/state")


def test_check_root_opens_nothing_over_the_network():
    # Without `region` pyarrow would ask AWS where the bucket is: the check fills one in instead.
    assert check_root("s3://some-bucket/repo", "repository") == "s3://some-bucket/repo"
    assert check_root("relative/path", "data_dir") == "relative/path"


def test_sub_folders_of_a_uri_keep_its_query_at_the_end(tmp_path):
    assert join_uri(S3, "traffic", "m") == ("s3://bucket/fleet/data/traffic/m?endpoint_override=127.0.0.1:9000"
                                            "&scheme=http")
    assert traffic_dir(S3, "m") == join_uri(S3, "traffic", "m")
    assert labels_folder(S3, "m") == join_uri(S3, "labels", "m")
    assert traffic_dir(str(tmp_path), "m") == str(tmp_path / "traffic" / "m")
    location = locate(S3)
    assert (location.path, location.local) == ("bucket/fleet/data", False)
    assert location.show(location.sub("labels")) == "s3://bucket/fleet/data/labels"


def test_the_jobs_take_uris_as_they_are_and_pin_local_paths_down(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data_dir(S3) == S3 and storage_path("s3://bucket/ckpt") == "s3://bucket/ckpt"
    assert data_dir("rel") == str(tmp_path / "rel") and storage_path("rel") == str(tmp_path / "rel")


def test_files_are_listed_without_hidden_or_in_flight_ones_and_written_whole(tmp_path):
    location = locate(str(tmp_path))
    names = ["a/.x.parquet.tmp", "a/_partial/y.parquet", "a/x.parquet", "b/z.json", "b/z.parquet"]
    for name in names:
        write_whole(location.fs, location.sub(name), lambda target: location.fs.open_output_stream(target).close())
    assert list_files(location.fs, location.path) == [str(tmp_path / "a" / "x.parquet"),
                                                      str(tmp_path / "b" / "z.parquet")]
    assert list_files(location.fs, location.sub("missing")) == []
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == names  # no temp left


def test_audit_files_stay_local_and_are_off_with_a_warning_when_there_is_no_local_place(tmp_path, caplog):
    assert audit_dir_for(S3, str(tmp_path)) == str(tmp_path / "audit")
    assert audit_dir_for(str(tmp_path / "data"), str(tmp_path)) is None
    assert audit_folder(f"file://{tmp_path}/data") == f"{tmp_path}/data/audit"
    log = AuditLog(S3, audit_dir=str(tmp_path / "audit"))
    log.write({"event": "raised"})
    assert json.loads((tmp_path / "audit" / "monitor.jsonl").read_text())["event"] == "raised"
    with caplog.at_level(logging.WARNING, logger="fleet.alerts"):
        off = AuditLog("s3://bucket/elsewhere?region=eu-west-1")
        off.write({"event": "raised"})
    assert off.path is None and off.failures == 0
    assert "on an object store, which cannot append" in caplog.text
