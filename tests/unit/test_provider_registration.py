import subprocess

from tests.services import BIN


def test_airflow_lists_the_provider_and_its_connection_type():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "airflow-provider-raydata" in manager.providers
    assert manager.hooks["raydata"].hook_class_name == "airflow_provider_raydata.hooks.ray.RayHook"


def test_connection_uri_gives_a_working_connection_definition(airflow_db):
    import json

    from airflow_provider_raydata.hooks.ray import settings_from_connection

    uri = "raydata://:tok%2Fen@ray-head:10001?namespace=etl&staging_uri=s3%3A%2F%2Fb%2Fstage"
    airflow = str(BIN / "airflow")
    added = subprocess.run(
        [airflow, "connections", "add", "raydata_uri_test", "--conn-uri", uri],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stderr[-2000:]
    shown = subprocess.run(
        [airflow, "connections", "get", "raydata_uri_test", "-o", "json"], capture_output=True, text=True, timeout=120
    )
    conn = json.loads(shown.stdout)[0]
    settings = settings_from_connection(conn["host"], int(conn["port"]), conn["password"], conn["extra_dejson"])
    assert conn["conn_type"] == "raydata"
    assert (settings.address, settings.namespace, settings.staging_uri) == (
        "ray://ray-head:10001",
        "etl",
        "s3://b/stage",
    )
    assert settings.auth_token == "tok/en"


def test_every_connection_setting_the_readme_documents_has_a_labelled_form_field():
    import re

    from airflow_provider_raydata import get_provider_info
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The `raydata` connection") : readme.index("## Choosing a transport")]
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    fields = get_provider_info()["connection-types"][0]["conn-fields"]
    assert documented and set(documented) == set(fields), (documented, sorted(fields))
    assert all(field["label"] for field in fields.values())
