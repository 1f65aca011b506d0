"""`fleet render serve-config`: a Serve config Ray's own schema accepts, with fleet's settings and no secret."""

from __future__ import annotations

import hashlib

import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.cli import main
from cluster.config import FleetSettings
from cluster.serve_config import IMPORT_PATH, render_serve_config


def test_the_serve_config_carries_every_setting_and_digests_only(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEET_CONFIG", str(tmp_path / "none.yaml"))
    keys = tmp_path / "keys.txt"
    keys.write_text("key-from-file\n")
    settings = FleetSettings(repository=str(tmp_path / "repo"), port=9123, api_keys=["key-one"],
                             api_keys_file=str(keys), admin_token="the-admin-token", http_server="serve",
                             max_batch_rows=64, data_dir=str(tmp_path / "data"))
    doc = render_serve_config(settings)
    ServeDeploySchema.model_validate(doc)
    text = yaml.safe_dump(doc)
    assert "key-one" not in text and "key-from-file" not in text and "the-admin-token" not in text
    assert "keys.txt" not in text
    app, = doc["applications"]
    assert app["import_path"] == IMPORT_PATH and app["route_prefix"] == "/"
    args = app["args"]
    digest = {k: "sha256:" + hashlib.sha256(k.encode()).hexdigest() for k in ("key-one", "key-from-file")}
    assert sorted(args["api_keys"]) == sorted(digest.values())
    assert args["admin_token"] == "sha256:" + hashlib.sha256(b"the-admin-token").hexdigest()
    # what the builder on the cluster reads back: the same settings, the digests not hashed twice
    again = FleetSettings(**args)
    assert again.serving_options() == settings.model_copy(update={"api_keys_file": None}).serving_options()
    assert doc["proxy_location"] == "EveryNode"  # Serve's own ingress in front (http_server: serve)
    assert doc["http_options"] == {"host": "127.0.0.1", "port": 9123}
    assert app["runtime_env"]["env_vars"]["FLEET_DATA_DIR"] == str(tmp_path / "data")


def test_fleet_render_writes_the_file_serve_deploy_reads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEET_CONFIG", str(tmp_path / "none.yaml"))
    out = tmp_path / "fleet-serve.yaml"
    assert main(["render", "serve-config", "--repository", str(tmp_path / "repo"), "--port", "8123",
                 "-o", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(doc)
    assert doc["proxy_location"] == "Disabled"  # fleet's own listeners (the default http_server)
    assert doc["applications"][0]["args"]["port"] == 8123
    assert "serve deploy" in capsys.readouterr().out
